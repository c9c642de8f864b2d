"""``GET /metrics`` on a real store: what a Prometheus scrape reads, parsed as Prometheus parses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.settings import FhirDestination, Hl7Destination, Settings
from ecgbridge.core.states import DeliveryState
from ecgbridge.core.store import MessageRow, MessageStore, ResultRow, record_timings
from ecgbridge.gateway.console import metrics
from ecgbridge.gateway.console.context import ConsoleContext

PATIENT = "DOE^JANE"  # must never reach a label
SOP = "1.2.826.0.1.3680043.8.498.99999"


def _store(tmp_path: Path) -> MessageStore:
    store = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    store.create_schema()
    now = datetime.now(UTC)

    def message(source: str, state: str, route: str | None, age_s: float) -> str:
        mid = store.record_message(
            source=source,
            blob_sha256="0" * 64,
            blob_size=1,
            state=state,
            route=route,
            remote=f"{PATIENT}@10.0.0.9",
            sop_instance_uid=SOP,
        )
        with store.session() as s, s.begin():
            s.execute(update(MessageRow).where(MessageRow.id == mid).values(received_at=now - timedelta(seconds=age_s)))
        return mid

    message("dicom", "queued", "carts", 600)
    message("dicom", "queued", "carts", 60)
    message("hl7", "rejected", None, 30)
    message("hl7", "rejected", None, 20)
    message("file", "unrouted", None, 10)
    done = message("dicom", "delivered", "carts", 3600)
    dead = message("hl7", "failed", "wards", 1800)
    waiting = message("hl7", "analysed", "wards", 900)
    for mid in (done, dead, waiting):
        store.save_result(mid, {"outputs": []}, "diagnosis@1")
    with store.session() as s, s.begin():
        s.execute(
            update(ResultRow).where(ResultRow.message_id == waiting).values(created_at=now - timedelta(seconds=300))
        )
    store.update_delivery(done, "ehr-fhir", state=DeliveryState.DELIVERED)
    store.update_delivery(dead, "ehr-fhir", state=DeliveryState.PENDING)
    store.update_delivery(dead, "ehr-fhir", state=DeliveryState.DEAD)
    store.add_event(dead, "dead_letter", "ehr-fhir: 503 Service Unavailable")
    store.update_delivery(waiting, "ehr-fhir", state=DeliveryState.PENDING)
    for detail in (
        "complete",
        "complete",
        "unavailable: HTTP 503",
        "no_patient",
        "not_configured",
        "partial: no weight",
    ):
        store.add_event(done, "ehr_context", detail, level="info")
    record_timings(store, done, {"total": 2.0, "analysis": 0.3}, {"diagnosis": 0.2, "ecgbridge-measurements": 0.02})
    record_timings(store, dead, {"total": 4.0, "analysis": 0.7}, {"diagnosis": 0.6})
    return store


def _context(store: MessageStore, **kw: object) -> ConsoleContext:
    settings = Settings(
        data_dir=store.blobs.root.parent,
        destinations=[
            FhirDestination(name="ehr-fhir", base_url="https://ehr.invalid/fhir"),
            Hl7Destination(name="lis-hl7", host="lis.invalid", port=2575),
        ],
    )
    listeners = {"dicom": lambda: True, "mllp": lambda: False, "inbox": _broken}
    return ConsoleContext(LiveSettings(settings), store, None, AccountStore(store), listeners=listeners, **kw)  # type: ignore[arg-type]


def _broken() -> bool:
    raise RuntimeError("listener thread gone")


def _scrape(ctx: ConsoleContext, accept: str | None = None) -> tuple[str, str]:
    app = FastAPI()
    app.include_router(metrics.router)
    app.state.ctx = ctx
    with TestClient(app) as client:
        response = client.get("/metrics", headers={"accept": accept} if accept else {})
    assert response.status_code == 200
    return response.text, response.headers["content-type"]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def scraped(tmp_path: Path) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    started = datetime(2024, 5, 10, 8, 0, tzinfo=UTC)
    text, content_type = _scrape(_context(_store(tmp_path), started_at=started))
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    return text, _samples(text)


def test_messages_per_listener_and_state(scraped: tuple[str, dict]) -> None:
    _, samples = scraped
    assert _value(samples, "ecgbridge_messages_received_total", source="dicom") == 3
    assert _value(samples, "ecgbridge_messages_received_total", source="hl7") == 4
    assert _value(samples, "ecgbridge_messages_received_total", source="file") == 1
    assert _value(samples, "ecgbridge_messages_rejected_total", source="hl7") == 2
    assert _value(samples, "ecgbridge_messages_rejected_total", source="dicom") == 0
    assert _value(samples, "ecgbridge_messages", source="dicom", state="queued") == 2
    assert _value(samples, "ecgbridge_messages", source="file", state="unrouted") == 1
    assert _value(samples, "ecgbridge_messages", source="file", state="processed") == 0  # every series, 0 included
    assert _value(samples, "ecgbridge_route_messages", route="carts", state="queued") == 2
    assert _value(samples, "ecgbridge_route_messages", route="(none)", state="rejected") == 2
    assert _value(samples, "ecgbridge_messages_analysed_total") == 3


def test_queues_deliveries_and_dead_letters(scraped: tuple[str, dict]) -> None:
    _, samples = scraped
    assert _value(samples, "ecgbridge_analysis_queue_depth") == 2
    assert 600 <= _value(samples, "ecgbridge_analysis_queue_oldest_age_seconds") < 660
    assert _value(samples, "ecgbridge_delivery_queue_depth", destination="ehr-fhir") == 1
    assert 300 <= _value(samples, "ecgbridge_delivery_queue_oldest_age_seconds", destination="ehr-fhir") < 360
    # a configured destination with no traffic yet has its series at 0 (so increase() sees the first one)
    assert _value(samples, "ecgbridge_delivery_queue_depth", destination="lis-hl7") == 0
    assert _value(samples, "ecgbridge_dead_letters_total", destination="lis-hl7") == 0
    assert _value(samples, "ecgbridge_deliveries", destination="ehr-fhir", state="delivered") == 1
    assert _value(samples, "ecgbridge_deliveries", destination="ehr-fhir", state="dead") == 1
    assert _value(samples, "ecgbridge_deliveries", destination="ehr-fhir", state="pending") == 1
    assert _value(samples, "ecgbridge_deliveries_delivered_total", destination="ehr-fhir") == 1
    assert _value(samples, "ecgbridge_delivery_attempts_total", destination="ehr-fhir") == 4
    assert _value(samples, "ecgbridge_dead_letters_total", destination="ehr-fhir") == 1


def test_ehr_context_listeners_and_start_time(scraped: tuple[str, dict]) -> None:
    _, samples = scraped
    for status, n in {"complete": 2, "partial": 1, "unavailable": 1, "no_patient": 1, "not_configured": 1}.items():
        assert _value(samples, "ecgbridge_ehr_context_total", status=status) == n
    assert _value(samples, "ecgbridge_listener_up", listener="dicom", source="dicom") == 1
    assert _value(samples, "ecgbridge_listener_up", listener="mllp", source="hl7") == 0
    assert _value(samples, "ecgbridge_listener_up", listener="inbox", source="file") == 0  # its check raised
    assert _value(samples, "ecgbridge_console_start_time_seconds") == datetime(2024, 5, 10, 8, tzinfo=UTC).timestamp()
    assert _value(samples, "ecgbridge_store_up") == 1


def test_analysis_durations_are_histograms(scraped: tuple[str, dict]) -> None:
    text, samples = scraped
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["ecgbridge_model_duration_seconds"].type == "histogram"
    model = "ecgbridge_model_duration_seconds"
    assert _value(samples, f"{model}_bucket", model="diagnosis", le="0.1") == 0
    assert _value(samples, f"{model}_bucket", model="diagnosis", le="0.25") == 1
    assert _value(samples, f"{model}_bucket", model="diagnosis", le="1.0") == 2
    assert _value(samples, f"{model}_bucket", model="diagnosis", le="+Inf") == 2
    assert _value(samples, f"{model}_count", model="diagnosis") == 2
    assert _value(samples, f"{model}_sum", model="diagnosis") == pytest.approx(0.8)
    assert _value(samples, f"{model}_count", model="ecgbridge-measurements") == 1
    stage = "ecgbridge_analysis_duration_seconds"
    assert _value(samples, f"{stage}_bucket", stage="total", le="2.5") == 1
    assert _value(samples, f"{stage}_bucket", stage="total", le="5.0") == 2
    assert _value(samples, f"{stage}_sum", stage="analysis") == pytest.approx(1.0)


def test_no_patient_data_in_the_exposition(scraped: tuple[str, dict]) -> None:
    text, _ = scraped
    assert PATIENT not in text and "DOE" not in text and SOP not in text and "10.0.0.9" not in text
    assert "ehr.invalid" not in text and "Service Unavailable" not in text  # neither endpoints nor errors


def test_openmetrics_when_asked(tmp_path: Path) -> None:
    text, content_type = _scrape(_context(_store(tmp_path)), accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")
    assert 'ecgbridge_messages_received_total{source="hl7"} 4.0' in text


def test_a_store_that_does_not_answer_still_gives_a_scrape(tmp_path: Path) -> None:
    store = MessageStore(f"sqlite:///{tmp_path / 'never-created.db'}", tmp_path)  # no tables
    text, _ = _scrape(_context(store))
    samples = _samples(text)
    assert _value(samples, "ecgbridge_store_up") == 0
    assert _value(samples, "ecgbridge_listener_up", listener="dicom", source="dicom") == 1
    assert not any(name == "ecgbridge_messages_received_total" for name, _ in samples)


def test_the_console_serves_metrics_without_a_login(tmp_path: Path) -> None:
    from ecgbridge.gateway.console.app import create_app

    with TestClient(create_app(_context(_store(tmp_path)))) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and "ecgbridge_messages_received_total" in response.text
