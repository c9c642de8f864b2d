"""The Sender interface: a destination type added by one module (tests/support/toy_sender.py) and its config.

Nothing in ecgbridge knows the toy type: the settings loader validates it by ``type``
through the registry, the worker's delivery job sends through it, and retry, failure
and idempotence follow the same rules as for FHIR and HL7.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ecgbridge.core.settings import load_settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.errors import ConfigError, TransientDeliveryError
from ecgbridge.worker.delivery import DeliveryClaimed, deliver_message
from ecgbridge.worker.jobs import WorkerContext, analyse_message
from tests.support import toy_sender

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"


def _config(tmp_path: Path, outbox: Path, extra: str = "") -> Path:
    path = tmp_path / "ecgbridge.yaml"
    path.write_text(
        f"""data_dir: {tmp_path / "data"}
destinations:
  - name: research-share
    type: toy
    folder: {outbox}
{extra}
routes:
  - name: all-ecg
    destinations: [research-share]
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def analysed(tmp_path: Path) -> tuple[WorkerContext, str, Path]:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    settings = load_settings(_config(tmp_path, outbox))
    ctx = WorkerContext.create(settings)
    ctx.store.create_schema()
    sha, size = ctx.store.save_blob(FIXTURE.read_bytes())
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    assert analyse_message(ctx, mid) == ["research-share"]
    return ctx, mid, outbox


def test_a_toy_destination_type_loads_from_the_config(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, tmp_path / "outbox"))
    dest = settings.destination("research-share")
    assert isinstance(dest, toy_sender.ToyDestination) and dest.folder == tmp_path / "outbox"


def test_a_toy_destination_with_a_wrong_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = _config(tmp_path, tmp_path / "outbox", extra="    colour: blue")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert any(p.startswith(f"{path}:6: destinations[0].colour: unknown setting") for p in info.value.problems)


def test_an_unknown_destination_type_lists_the_registered_ones(tmp_path: Path) -> None:
    path = _config(tmp_path, tmp_path / "outbox").read_text().replace("type: toy", "type: carrier-pigeon")
    (tmp_path / "bad.yaml").write_text(path)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "bad.yaml")
    assert "'carrier-pigeon' is not a destination type" in str(info.value)
    assert "fhir, hl7" in str(info.value) and "toy" in str(info.value)


def test_the_worker_delivers_through_the_toy_sender_once(analysed: tuple[WorkerContext, str, Path]) -> None:
    ctx, mid, outbox = analysed
    ref = deliver_message(ctx, mid, "research-share")
    assert ref == f"toy:{mid}.json"
    written = json.loads((outbox / f"{mid}.json").read_text())
    assert written["message_id"] == mid and "not for clinical use" in written["label"].lower()
    assert len(written["attachments"]) == 2  # the PDF and the PNG, read from the blob store
    (outbox / f"{mid}.json").unlink()
    assert deliver_message(ctx, mid, "research-share") == ref  # redelivered task: nothing sent again
    assert not (outbox / f"{mid}.json").exists()
    assert ctx.store.delivery(mid, "research-share").state == DeliveryState.DELIVERED
    assert ctx.store.get(mid).state == MessageState.DELIVERED


def test_a_transient_failure_stays_pending_for_the_retry(analysed: tuple[WorkerContext, str, Path]) -> None:
    ctx, mid, outbox = analysed
    (outbox / "fail-next").touch()
    with pytest.raises(TransientDeliveryError, match="busy"):
        deliver_message(ctx, mid, "research-share")
    row = ctx.store.delivery(mid, "research-share")
    assert row.state == DeliveryState.PENDING and row.attempts == 1 and "busy" in row.last_error
    assert deliver_message(ctx, mid, "research-share") == f"toy:{mid}.json"
    assert ctx.store.delivery(mid, "research-share").attempts == 2


def test_a_permanent_failure_fails_the_delivery_with_an_error_record(analysed: tuple[WorkerContext, str, Path]) -> None:
    ctx, mid, outbox = analysed
    (outbox / "refuse").touch()
    assert deliver_message(ctx, mid, "research-share") is None
    assert ctx.store.delivery(mid, "research-share").state == DeliveryState.FAILED
    assert ctx.store.get(mid).state == MessageState.FAILED
    assert any(e.kind == "delivery_failed" and "refuses" in e.detail for e in ctx.store.events(mid))


def test_a_delivery_another_task_is_sending_is_not_sent_twice(analysed: tuple[WorkerContext, str, Path]) -> None:
    """Two tasks for one delivery (one re-enqueued while the other runs): only the claimant sends."""
    ctx, mid, outbox = analysed
    assert ctx.store.claim_delivery(mid, "research-share", "task-A", lease_s=60) == 0.0  # task A is sending
    with pytest.raises(DeliveryClaimed) as info:
        deliver_message(ctx, mid, "research-share", claim="task-B")
    assert 55 < info.value.retry_after_s <= 60
    assert not (outbox / f"{mid}.json").exists(), "task B sent what task A is sending"
    assert deliver_message(ctx, mid, "research-share", claim="task-A") == f"toy:{mid}.json"  # A's own claim holds
    row = ctx.store.delivery(mid, "research-share")
    assert (row.state, row.attempts, row.claimed_by) == (DeliveryState.DELIVERED, 1, None)  # the outcome released it
    assert deliver_message(ctx, mid, "research-share", claim="task-B") == f"toy:{mid}.json"  # done: nothing sent


def test_a_claim_whose_task_died_lapses(analysed: tuple[WorkerContext, str, Path]) -> None:
    ctx, mid, outbox = analysed
    assert ctx.store.claim_delivery(mid, "research-share", "killed-task", lease_s=1.5) == 0.0
    assert ctx.store.claim_delivery(mid, "research-share", "task-B", lease_s=60) > 0  # held (a busy machine: 1.5 s)
    time.sleep(1.6)
    assert deliver_message(ctx, mid, "research-share", claim="task-B") == f"toy:{mid}.json"
    assert (outbox / f"{mid}.json").exists()


def test_a_busy_destination_is_tried_again_later_without_spending_an_attempt(
    analysed: tuple[WorkerContext, str, Path],
) -> None:
    from ecgbridge.worker.delivery import DeliveryClaimed

    ctx, mid, outbox = analysed
    (outbox / "busy-next").touch()
    with pytest.raises(DeliveryClaimed):
        deliver_message(ctx, mid, "research-share", claim="task-A")
    row = ctx.store.delivery(mid, "research-share")
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)  # nothing sent, nothing spent
    assert deliver_message(ctx, mid, "research-share", claim="task-A") == f"toy:{mid}.json"
    assert ctx.store.delivery(mid, "research-share").attempts == 1
