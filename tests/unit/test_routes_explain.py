"""Route explanations: the matching route, the first failed criterion of every other one, in words.

Real parts: a SQLite store in tmp_path, HL7 messages taken by the real HL7 handler (so the
facts re-read from the stored bytes are compared with what the listener routed on), the
DICOM / HL7 / vendor fixtures, and the CLI.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from ecgbridge.cli import main
from ecgbridge.core.explain import explain, explain_bytes, explain_message, facts_from_bytes, facts_from_message
from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.routing import MessageFacts, explain_routing, match_route, route_failure
from ecgbridge.core.settings import Route, RouteMatch, Settings, default_settings
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import DecodeError, InputError, UnsupportedInputError
from ecgbridge.gateway.hl7_inbound import handle_message
from ecgbridge.mapping.codes import SOP_12_LEAD_ECG, SOP_GENERAL_ECG
from ecgbridge.mapping.hl7_common import frame

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
DICOM_12 = FIXTURES / "dicom" / "ptbxl_00622_mi_12lead.dcm"
HL7_NA = FIXTURES / "hl7" / "ptbxl_00024_na_100hz.hl7"
HL7_ED = FIXTURES / "hl7" / "ptbxl_00024_ed_dicom.hl7"
HL7_8859 = FIXTURES / "hl7" / "cinc2021_E07506_ma_2500ms_8859-1.hl7"
PHILIPS = FIXTURES / "vendor" / "129DYPRG.XML"

ROUTES = [
    Route(name="carts", match=RouteMatch(sources=["dicom"], calling_ae_titles=["CART1", "CART2"])),
    Route(name="general-ecg", match=RouteMatch(sources=["dicom"], sop_class_uids=[SOP_GENERAL_ECG])),
    Route(name="ward-app", match=RouteMatch(sources=["hl7"], sending_applications=["MUSE"])),
    Route(name="ward-facility", match=RouteMatch(sources=["hl7"], sending_facilities=["ICU"])),
    Route(name="orders", match=RouteMatch(sources=["hl7"], message_types=["ORM^O01"])),
    Route(name="obx", match=RouteMatch(sources=["hl7"], obx_codes=["11524-6", "X-ECG"])),
    Route(name="files", match=RouteMatch(sources=["file"])),
]


class RecordingDispatcher:
    """Takes what Intake enqueues (no broker in unit tests)."""

    def __init__(self) -> None:
        self.analysed: list[str] = []

    def analyse(self, message_id: str) -> None:
        self.analysed.append(message_id)

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> MessageStore:
    s = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    s.create_schema()
    return s


def _settings(routes: list[Route]) -> Settings:
    data = default_settings().model_dump(exclude={"source_file"})
    data["routes"] = [r.model_dump() for r in routes]
    return Settings.model_validate(data)


# ----- the explanation itself -----------------------------------------------------------------
def test_each_criterion_that_fails_is_named_in_words() -> None:
    dicom = MessageFacts("dicom", "CART9", SOP_12_LEAD_ECG)
    assert route_failure(ROUTES[0], dicom) == "calling AE CART9 is not one of [CART1, CART2]"
    assert route_failure(ROUTES[1], dicom) == (
        f"SOP class {SOP_12_LEAD_ECG} (12-lead ECG Waveform Storage) is not listed in [{SOP_GENERAL_ECG}]"
    )
    hl7 = MessageFacts(
        "hl7",
        sending_application="CART",
        sending_facility="WARD",
        message_type="ORU^R01",
        obx_codes=("CHN", "TIM", "WAV", "WAV"),
    )
    assert route_failure(ROUTES[0], hl7) == "source hl7 is not one of [dicom]"
    assert route_failure(ROUTES[2], hl7) == "sending application (MSH-3) CART is not one of [MUSE]"
    assert route_failure(ROUTES[3], hl7) == "sending facility (MSH-4) WARD is not one of [ICU]"
    assert route_failure(ROUTES[4], hl7) == "message type (MSH-9) ORU^R01 is not one of [ORM^O01]"
    assert route_failure(ROUTES[5], hl7) == "no OBX code of [11524-6, X-ECG] in the message (it has [CHN, TIM, WAV])"
    assert route_failure(ROUTES[0], MessageFacts("dicom")) == "calling AE (none) is not one of [CART1, CART2]"
    assert route_failure(ROUTES[6], MessageFacts("file")) is None


def test_the_first_match_wins_and_later_routes_are_not_tried() -> None:
    routes = [*ROUTES, Route(name="everything")]
    explained = explain_routing(routes, MessageFacts("dicom", "CART2", SOP_12_LEAD_ECG))
    assert explained.matched is routes[0]
    assert [v.outcome for v in explained.verdicts] == ["matched"] + ["not_tried"] * (len(routes) - 1)
    assert all(v.reason == "not tried: an earlier route matched" for v in explained.verdicts[1:])

    explained = explain_routing(routes, MessageFacts("hl7", message_type="ORU^R01", obx_codes=("X-ECG",)))
    assert explained.matched is not None and explained.matched.name == "obx"
    by_name = {v.route: v for v in explained.verdicts}
    assert by_name["carts"].reason == "source hl7 is not one of [dicom]"
    assert by_name["files"].outcome == "not_tried" and by_name["everything"].outcome == "not_tried"
    text = "\n".join(explained.lines())
    assert "matches route 'obx'" in text and "routes[0] carts: source hl7 is not one of [dicom]" in text
    assert json.loads(json.dumps(explained.to_dict()))["matched"] == "obx"


def test_no_route_matches_says_unrouted() -> None:
    explained = explain_routing(ROUTES[:2], MessageFacts("dicom", "CART9", SOP_12_LEAD_ECG))
    assert explained.matched is None
    assert explained.lines()[0].startswith("no route matches")
    assert all(v.outcome == "failed" for v in explained.verdicts)


def _reference_match(routes: list[Route], facts: MessageFacts) -> Route | None:
    """The matching rule as it was written before explanations existed."""
    for route in routes:
        m = route.match
        if facts.source not in m.sources:
            continue
        if m.calling_ae_titles and (facts.calling_ae_title or "").strip() not in m.calling_ae_titles:
            continue
        if m.sop_class_uids and facts.sop_class_uid not in m.sop_class_uids:
            continue
        if m.sending_applications and facts.sending_application not in m.sending_applications:
            continue
        if m.sending_facilities and facts.sending_facility not in m.sending_facilities:
            continue
        if m.message_types and facts.message_type not in m.message_types:
            continue
        if m.obx_codes and not set(m.obx_codes) & set(facts.obx_codes):
            continue
        return route
    return None


def test_match_route_is_the_explanations_answer_and_unchanged() -> None:
    rng = random.Random(7)
    pick = rng.choice
    for _ in range(2000):
        routes = [
            Route(
                name=f"r{i}",
                match=RouteMatch(
                    sources=rng.sample(["dicom", "hl7", "file"], rng.randint(1, 3)),
                    calling_ae_titles=rng.sample(["CART1", "CART2"], rng.randint(0, 2)),
                    sop_class_uids=rng.sample([SOP_12_LEAD_ECG, SOP_GENERAL_ECG], rng.randint(0, 1)),
                    sending_applications=rng.sample(["CART", "MUSE"], rng.randint(0, 1)),
                    sending_facilities=rng.sample(["WARD", "ICU"], rng.randint(0, 1)),
                    message_types=rng.sample(["ORU^R01", "ORM^O01"], rng.randint(0, 1)),
                    obx_codes=rng.sample(["WAV", "X"], rng.randint(0, 1)),
                ),
            )
            for i in range(rng.randint(0, 4))
        ]
        facts = MessageFacts(
            pick(["dicom", "hl7", "file"]),
            pick([None, "CART1", " CART2 ", "CART9"]),
            pick([None, SOP_12_LEAD_ECG, SOP_GENERAL_ECG]),
            pick([None, "CART", "MUSE"]),
            pick([None, "WARD", "ICU"]),
            pick([None, "ORU^R01", "ORM^O01"]),
            tuple(rng.sample(["WAV", "X", "TIM"], rng.randint(0, 3))),
        )
        expected = _reference_match(routes, facts)
        assert match_route(routes, facts) is expected
        assert explain_routing(routes, facts).matched is expected


# ----- facts from uploaded bytes ----------------------------------------------------------------
def test_a_dicom_file_is_explained_as_a_c_store_from_the_given_calling_ae() -> None:
    explained = explain_bytes(ROUTES, DICOM_12.read_bytes(), name=DICOM_12.name, calling_ae_title="CART2")
    assert explained.subject.facts == MessageFacts("dicom", "CART2", SOP_12_LEAD_ECG)
    assert explained.matched is not None and explained.matched.name == "carts"
    assert explained.subject.notes == ()

    anonymous = facts_from_bytes(DICOM_12.read_bytes())
    assert anonymous.facts.calling_ae_title is None
    assert any("--calling-ae" in n for n in anonymous.notes)
    as_inbox = explain_bytes(ROUTES, DICOM_12.read_bytes(), source="file")
    assert as_inbox.subject.facts == MessageFacts("file")  # the inbox routes files by source only
    assert as_inbox.matched is not None and as_inbox.matched.name == "files"


@pytest.mark.parametrize("path", [HL7_NA, HL7_8859, HL7_ED], ids=lambda p: p.name)
def test_an_hl7_file_is_read_as_the_listener_reads_it(path: Path) -> None:
    for data in (path.read_bytes(), frame(path.read_bytes())):  # unframed (the fixtures) and MLLP-framed
        subject = facts_from_bytes(data, name=path.name)
        facts = subject.facts
        assert (facts.source, facts.sending_application, facts.sending_facility, facts.message_type) == (
            "hl7",
            "CART",
            "WARD",
            "ORU^R01",
        )
        expected = ("ECGFILE",) if path == HL7_ED else ("CHN", "TIM", "WAV")
        assert tuple(dict.fromkeys(facts.obx_codes)) == expected
        assert subject.notes == ()


def test_an_ecg_xml_file_is_an_inbox_file() -> None:
    explained = explain_bytes(ROUTES, PHILIPS.read_bytes(), name=PHILIPS.name)
    assert explained.subject.facts == MessageFacts("file")
    assert explained.matched is not None and explained.matched.name == "files"
    with pytest.raises(InputError, match="XML: ECG XML arrives as a file"):
        facts_from_bytes(PHILIPS.read_bytes(), source="dicom")


def test_unreadable_files_raise_an_input_error_saying_what_is_wrong() -> None:
    with pytest.raises(UnsupportedInputError, match="junk.bin is not a format ecgbridge receives"):
        facts_from_bytes(b"not an ecg at all, just text", name="junk.bin")
    with pytest.raises(DecodeError, match="is empty"):
        facts_from_bytes(b"", name="empty.dcm")
    cut = FIXTURES / "dicom" / "cinc2021_E07506_cut.dcm"
    with pytest.raises(DecodeError, match="cinc2021_E07506_cut.dcm is not a readable DICOM file: .*truncated"):
        facts_from_bytes(cut.read_bytes(), name=cut.name)
    with pytest.raises(InputError, match="not a readable HL7 v2 message"):
        facts_from_bytes(b"MSH|^~\\&|CART|WARD|||20260101||ORU^R01|1|P|9.9\r", name="bad.hl7")
    with pytest.raises(InputError, match="not well-formed XML"):
        facts_from_bytes(b"<AnnotatedECG><unclosed>", name="broken.xml")
    with pytest.raises(InputError, match="HL7 v2 message: it arrives over MLLP"):
        facts_from_bytes(HL7_NA.read_bytes(), source="file")


def test_a_readable_file_whose_ecg_the_listener_would_refuse_says_so() -> None:
    truncated = FIXTURES / "dicom" / "cinc2021_E07506_truncated.dcm"
    subject = facts_from_bytes(truncated.read_bytes(), calling_ae_title="CART1")
    assert subject.facts.sop_class_uid == SOP_12_LEAD_ECG
    assert any("WaveformError" in n and "never reach routing" in n for n in subject.notes)


# ----- facts from a stored message ----------------------------------------------------------------
def test_a_stored_hl7_message_gives_the_facts_the_listener_routed_on(store: MessageStore) -> None:
    routes = [ROUTES[2], Route(name="from-cart", match=RouteMatch(sources=["hl7"], sending_applications=["CART"]))]
    intake = Intake(_settings(routes), store, RecordingDispatcher())  # type: ignore[arg-type]
    captured: list[MessageFacts] = []
    admit = intake.admit

    def spy(arrival: Arrival, **kwargs: Any) -> Any:
        captured.append(arrival.facts)
        return admit(arrival, **kwargs)

    intake.admit = spy  # type: ignore[method-assign]
    ack = handle_message(HL7_8859.read_bytes(), "10.1.2.3:40001", intake)
    assert b"MSA|AA" in ack
    (row,) = store.list()
    assert row.route == "from-cart"

    explained = explain_message(routes, store, row.id[:8])
    assert explained.subject.facts == captured[0]
    assert explained.subject.message_id == row.id and explained.subject.recorded_route == "from-cart"
    assert explained.matched is not None and explained.matched.name == "from-cart"
    assert explained.routing.verdicts[0].reason == "sending application (MSH-3) CART is not one of [MUSE]"
    assert not any("changed since" in n for n in explained.notes)

    # the rules change: the explanation says what they decide now, and that it differs
    later = explain_message(routes[:1], store, row.id)
    assert later.matched is None
    assert any("it would now get no route (unrouted)" in n for n in later.notes)


def test_a_stored_dicom_message_uses_its_calling_ae_and_sop_class(store: MessageStore) -> None:
    sha, size = store.save_blob(DICOM_12.read_bytes())
    mid = store.record_message(
        source="dicom",
        remote="CART2@10.0.0.5",
        sop_class_uid=SOP_12_LEAD_ECG,
        blob_sha256=sha,
        blob_size=size,
        state="unrouted",
    )
    subject = facts_from_message(store, mid)
    assert subject.facts == MessageFacts("dicom", "CART2", SOP_12_LEAD_ECG)
    explained = explain(ROUTES, subject)
    assert explained.matched is not None and explained.matched.name == "carts"
    assert any("it would now get route 'carts'" in n for n in explained.notes)


def test_a_rejected_or_unknown_message(store: MessageStore) -> None:
    sha, size = store.save_blob(b"MSH|^~\\&|CART|WARD|||20260101||ORU^R01|1|P|2.5.1\rOBR|1\r")
    mid = store.record_message(
        source="hl7",
        remote="CART@10.0.0.7",
        blob_sha256=sha,
        blob_size=size,
        state="rejected",
        error="WaveformError: no waveform",
        message_type="ORU^R01",
    )
    subject = facts_from_message(store, mid)
    assert subject.facts.sending_application == "CART"
    assert any("rejected when it arrived (WaveformError: no waveform)" in n for n in subject.notes)
    with pytest.raises(InputError, match="no message with id 'nope'"):
        facts_from_message(store, "nope")


def test_an_order_message_is_never_routed_and_says_so(store: MessageStore) -> None:
    orm = (
        "MSH|^~\\&|HIS|HOSP|ECGBRIDGE|CARDIO|20260301101500||ORM^O01^ORM_O01|C1|P|2.5.1\r"
        "PID|1||MRN1^^^HOSP^MR||Doe^Jane\rORC|NW|PL1^HIS\rOBR|1|PL1^HIS||93000^EKG^CPT\r"
    )
    explained = explain_bytes(ROUTES, orm.encode(), name="order.hl7")
    assert explained.subject.facts.message_type == "ORM^O01"
    assert any("not an ECG result" in n and "never routes it" in n for n in explained.subject.notes)
    assert "Doe" not in json.dumps(explained.to_dict())  # no patient data in the facts
    transfer = orm.replace("ORM^O01^ORM_O01", "ADT^A02^ADT_A02")
    refused = facts_from_bytes(transfer.encode())
    assert any("refuses this message (AR): unsupported event 'A02'" in n for n in refused.notes)


# ----- the command line -----------------------------------------------------------------------------
def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "data_dir: ./data\n"
        "routes:\n"
        "  - name: carts\n"
        "    match: {sources: [dicom], calling_ae_titles: [CART1, CART2]}\n"
        "  - name: hl7-only\n"
        "    match: {sources: [hl7]}\n"
    )
    return cfg


def test_cli_routes_list_and_explain_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["routes", "list", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1. carts" in out and "calling AE in [CART1, CART2]" in out and "2. hl7-only" in out

    assert main(["routes", "explain", str(DICOM_12), "--calling-ae", "CART9", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "no route matches" in out
    assert "routes[0] carts: calling AE CART9 is not one of [CART1, CART2]" in out
    assert "routes[1] hl7-only: source dicom is not one of [hl7]" in out

    assert main(["routes", "explain", str(HL7_NA), "--json", "--config", str(cfg)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matched"] == "hl7-only"
    assert data["routes"][0] == {
        "route": "carts",
        "index": 0,
        "outcome": "failed",
        "reason": "source hl7 is not one of [dicom]",
    }
    assert data["facts"]["sending_application"] == "CART"

    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"\x00\x01 nothing")
    assert main(["routes", "explain", str(bad), "--config", str(cfg)]) == 1
    assert "junk.bin is not a format ecgbridge receives" in capsys.readouterr().err


def test_cli_explains_a_stored_message_and_names_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ecgbridge.core.settings import load_settings

    cfg = _config(tmp_path)
    settings = load_settings(cfg)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    sha, size = store.save_blob(DICOM_12.read_bytes())
    mid = store.record_message(
        source="dicom",
        remote="CART1@10.0.0.5",
        sop_class_uid=SOP_12_LEAD_ECG,
        blob_sha256=sha,
        blob_size=size,
        route="carts",
    )
    assert main(["routes", "explain", mid[:8], "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert f"message {mid}" in captured.out and "matches route 'carts'" in captured.out
    assert "routes[1] hl7-only: not tried: an earlier route matched" in captured.out
    assert f"store: {settings.database_url} (config: {cfg})" in captured.err

    assert main(["routes", "explain", "0000nothere", "--config", str(cfg)]) == 1
    assert "neither a file nor the id" in capsys.readouterr().err
    assert main(["routes", "explain", mid, "--calling-ae", "X", "--config", str(cfg)]) == 1
    assert "apply to files only" in capsys.readouterr().err
