"""HL7 v2 result write-back end to end: DICOM C-STORE -> worker -> ORU^R01 over MLLP -> test EHR.

Real parts only: a redis-server, real ``ecgbridge gateway`` and ``ecgbridge worker``
processes, pynetdicom as the cart sending the real Mortara ECG, and python-hl7's
asyncio MLLP server as the EHR (``tests.support.hl7_receiver``), which is not our code.

One deployment serves the whole module (starting a worker costs more than every test
here together): each scenario has its own receiver, destination and route, picked by
the cart's calling AE title, so the tests cannot see each other's messages. Delivery
gives up after 3 attempts with short backoff, so dead-lettering takes seconds.

The first tests drive ``gateway.mllp_client`` against the receiver directly (no
deployment), for the outcomes that need no worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ecgbridge.core.settings import Hl7Destination
from ecgbridge.errors import PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE
from ecgbridge.mapping.hl7_oru import LOCAL_CODING_SYSTEM, validate_er7
from ecgbridge.outbound.hl7_sender import control_id
from ecgbridge.outbound.mllp_client import send_oru
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.peers import need
from tests.support.processes import REPO, RedisServer, redis_binary, wait_for
from tests.support.stack import Stack, send_dicom

pytestmark = pytest.mark.integration

MESSAGE = (
    "MSH|^~\\&|ECGBRIDGE||TESTEHR||20240301102000+0000||ORU^R01^ORU_R01|CTRL-0001|P|2.5.1\r"
    "PID|1||MRN-1||Doe^Jane\r"
    "OBR|1|||34534-8^12 lead EKG panel^LN\r"
    "OBX|1|NM|NORM^Normal ECG probability^ECGBRIDGE|1|0.5000|1^^UCUM|||||P\r"
)
AR_TEXT = "Patient MRN-7784512 is not registered at this facility"


def _destination(receiver: Hl7Receiver, **kw: Any) -> Hl7Destination:
    return Hl7Destination(
        name="ehr",
        type="hl7",
        host="127.0.0.1",
        port=receiver.port,
        **{"ack_timeout_s": 2.0, "connect_timeout_s": 2.0, **kw},
    )


# --------------------------------------------------------------------------- client only


def test_client_accepts_aa_and_ca_and_frames_the_message_exactly() -> None:
    for code in ("AA", "CA"):
        with Hl7Receiver(code) as ehr:
            assert send_oru(_destination(ehr), MESSAGE) == "ACK:EHR00001"
            assert ehr.received == [MESSAGE]  # the bytes inside the frame, unchanged


def test_client_maps_every_failure_to_retry_or_reject() -> None:
    with Hl7Receiver("AE", error_text="database locked") as ehr:
        with pytest.raises(TransientDeliveryError, match="AE: database locked"):
            send_oru(_destination(ehr), MESSAGE)
    with Hl7Receiver("AR", error_text=AR_TEXT) as ehr:
        with pytest.raises(PermanentDeliveryError, match="not registered at this facility"):
            send_oru(_destination(ehr), MESSAGE)
    with Hl7Receiver("wrong_id") as ehr:
        with pytest.raises(TransientDeliveryError, match="ACK for another message"):
            send_oru(_destination(ehr), MESSAGE)
    with Hl7Receiver("close") as ehr:
        with pytest.raises(TransientDeliveryError, match="closed the connection before an ACK"):
            send_oru(_destination(ehr), MESSAGE)
    with Hl7Receiver("silent") as ehr:
        with pytest.raises(TransientDeliveryError, match="no ACK .* within 0.5 s"):
            send_oru(_destination(ehr, ack_timeout_s=0.5), MESSAGE)
    gone = Hl7Receiver().start()
    closed_port = gone.port
    gone.stop()  # nothing listens there any more
    with pytest.raises(TransientDeliveryError, match="could not connect"):
        send_oru(Hl7Destination(name="ehr", type="hl7", host="127.0.0.1", port=closed_port), MESSAGE)


def test_client_sends_non_ascii_as_utf8() -> None:
    with Hl7Receiver("AA") as ehr:
        message = MESSAGE.replace("Doe^Jane", "Müller^Zoë")
        send_oru(_destination(ehr), message)
        assert ehr.received == [message]


# --------------------------------------------------------------------------- the deployment

SCENARIOS: dict[str, dict[str, Any]] = {
    "aa": {"mode": "AA"},
    "order": {"mode": "AA"},
    "retry": {"mode": "AA", "first": ["AE", "AE"]},
    "ordered": {"mode": "AA", "first": ["AE", "AE"]},
    "ar": {"mode": "AR", "error_text": AR_TEXT},
    "silent": {"mode": "silent"},
    "close": {"mode": "close"},
}
MAX_ATTEMPTS = 3


def _ae(key: str) -> str:
    return f"CART_{key.upper()}"


@dataclass
class Deployment:
    stack: Stack
    receivers: dict[str, Hl7Receiver]
    ecg_path: Path

    def send(self, key: str, **attributes: Any) -> str:
        """C-STORE the real ECG as cart ``key``; returns the SOP Instance UID."""
        ds: Dataset = dcmread(self.ecg_path)
        ds.SOPInstanceUID = generate_uid()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        assert send_dicom(self.stack.port, [ds], ae_title=_ae(key)) == [0x0000]
        return str(ds.SOPInstanceUID)

    def wait(self, sop_uid: str, state: str, timeout_s: float = 90.0) -> Any:
        store = self.stack.store()

        def done() -> Any:
            rows = [r for r in store.list(limit=1000) if r.sop_instance_uid == sop_uid]
            return rows[0] if rows and rows[0].state == state else None

        try:
            return wait_for(done, timeout_s, 0.3, f"message {sop_uid} in state {state}")
        except AssertionError as exc:
            rows = [(r.id[:8], r.state, r.error) for r in store.list(limit=50)]
            raise AssertionError(f"{exc}; messages: {rows}\n{self.stack.logs()}") from None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, waveform_ecg_path: Path) -> Iterator[Deployment]:
    if redis_binary() is None:
        need("no redis-server binary (apt-get install redis-server)")
    receivers = {key: Hl7Receiver(**spec).start() for key, spec in SCENARIOS.items()}
    redis_server = RedisServer().start()
    destinations = [
        {
            "name": f"ehr-{key}",
            "type": "hl7",
            "host": "127.0.0.1",
            "port": r.port,
            "ack_timeout_s": 1.5 if key == "silent" else 20,
            "connect_timeout_s": 5,
            "receiving_application": "TESTEHR",
            "receiving_facility": "TEST",
        }
        for key, r in receivers.items()
    ]
    routes = [
        {
            "name": f"route-{key}",
            "match": {"calling_ae_titles": [_ae(key)]},
            "models": ["diagnosis"],
            "destinations": [f"ehr-{key}"],
        }
        for key in receivers
    ]
    stack = Stack(
        tmp=tmp_path_factory.mktemp("hl7-stack"),
        broker_url=redis_server.url,
        extra={
            "destinations": destinations,
            "routes": routes,
            "delivery": {"max_attempts": MAX_ATTEMPTS, "backoff_initial_s": 0.5, "backoff_max_s": 1},
        },
    )
    try:
        stack.start_worker()
        stack.start_gateway()
        yield Deployment(stack, receivers, waveform_ecg_path)
    finally:
        stack.stop()
        redis_server.stop()
        for r in receivers.values():
            r.stop()


def _cli(stack: Stack, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "messages", *args, "--json", "--config", str(stack.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def _parts(segment: Any, field: int) -> list[str]:
    """Components of one field, padded (python-hl7 returns a bare str for a simple field)."""
    return (str(segment(field)).split("^") + [""] * 9)[:10]


def _obx(message: hl7.Message, value_type: str) -> list[Any]:
    return [s for s in message.segments("OBX") if str(s(2)) == value_type]


def test_aa_delivers_exactly_one_valid_oru(deployment: Deployment) -> None:
    ehr = deployment.receivers["aa"]
    sop = deployment.send("aa", PatientName="Doe^Janet", PatientID="MRN7784512")
    row = deployment.wait(sop, "delivered")

    assert len(ehr.received) == 1, ehr.answers
    raw = ehr.received[0]
    validate_er7(raw)  # hl7apy, strict, v2.5.1 (raises otherwise)
    message = hl7.parse(raw)
    msh = message.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(10)) == control_id(row.id, "ehr-aa")
    assert str(message.segment("PID")(3)).split("^")[0] == "MRN7784512"
    assert str(message.segment("OBR")(25)) == "P"

    result = deployment.stack.store().get_result(row.id).result
    findings = [f for out in result["outputs"] for f in out["findings"]]
    probabilities = [s for s in _obx(message, "NM") if _parts(s, 3)[2] == LOCAL_CODING_SYSTEM]
    assert len(probabilities) == 5
    assert {_parts(s, 3)[0]: float(str(s(5))) for s in probabilities} == pytest.approx(
        {f["code"]: round(f["probability"], 4) for f in findings}, abs=1e-4
    )
    impressions = [s for s in _obx(message, "CWE") if _parts(s, 3)[0] == "8601-7"]
    assert {_parts(s, 5)[0] for s in impressions} == {f["snomed"] for f in findings if f["present"]}
    tiers = [s for s in _obx(message, "CWE") if _parts(s, 3)[0].endswith("-tier")]
    assert {_parts(s, 3)[0] for s in tiers} == {f"{f['code']}-tier" for f in findings if f["tier"]}
    assert all(_parts(s, 5)[2] == "SCT" for s in impressions)
    notes = [message.unescape(str(s(3))) for s in message.segments("NTE")]
    assert NOT_FOR_CLINICAL_USE in notes

    (delivery,) = deployment.stack.store().deliveries(row.id)
    assert (delivery.state, delivery.attempts, delivery.remote_ref) == ("delivered", 1, "ACK:EHR00001")
    logs = deployment.stack.full_logs()
    assert "MRN7784512" not in logs and "Janet" not in logs, "PHI in the logs"


def test_result_carries_the_order_it_was_recorded_for(deployment: Deployment) -> None:
    from ecgbridge.mapping.dicom_waveform import to_ecg

    attrs = {"PlacerOrderNumberImagingServiceRequest": "PLC-1001", "FillerOrderNumberImagingServiceRequest": "FIL-2002"}
    probe = dcmread(deployment.ecg_path)
    for keyword, value in attrs.items():
        setattr(probe, keyword, value)
    study = to_ecg(probe).study
    assert (study.placer_order_number, study.filler_order_number) == ("PLC-1001", "FIL-2002"), (
        "mapping.dicom_waveform no longer reads the DICOM order numbers: the result cannot find its order"
    )
    deployment.stack.store().upsert_order(
        placer_order_number="PLC-1001",
        filler_order_number="FIL-2002",
        order_control="NW",
        details={
            "placer_order_number": "PLC-1001",
            "filler_order_number": "FIL-2002",
            "ordering_provider": "1234^Smith^John",
            "universal_service_id": "93000^EKG 12 lead^CPT",
            "visit_number": "V-77^^^MAIN",
            "patient_class": "E",
        },
    )
    sop = deployment.send("order", **attrs)
    deployment.wait(sop, "delivered")
    (raw,) = deployment.receivers["order"].received
    validate_er7(raw)
    message = hl7.parse(raw)
    orc, obr, pv1 = message.segment("ORC"), message.segment("OBR"), message.segment("PV1")
    assert (str(orc(2)), str(orc(3)), str(obr(2)), str(obr(3))) == ("PLC-1001", "FIL-2002", "PLC-1001", "FIL-2002")
    assert str(orc(12)) == str(obr(16)) == "1234^Smith^John"
    assert str(obr(4)) == "93000^EKG 12 lead^CPT"
    assert (str(pv1(2)), str(pv1(19))) == ("E", "V-77^^^MAIN")


def test_ae_twice_then_aa_is_delivered_after_retries_with_one_control_id(deployment: Deployment) -> None:
    ehr = deployment.receivers["retry"]
    sop = deployment.send("retry")
    row = deployment.wait(sop, "delivered")
    assert ehr.answers == ["AE", "AE", "AA"]
    ids = {str(hl7.parse(raw).segment("MSH")(10)) for raw in ehr.received}
    assert ids == {control_id(row.id, "ehr-retry")}  # a retry is the same message to the EHR
    (delivery,) = deployment.stack.store().deliveries(row.id)
    assert (delivery.state, delivery.attempts) == ("delivered", 3)
    kinds = [e.kind for e in deployment.stack.store().events(row.id)]
    assert kinds.count("delivery_retry") == 2


def test_ar_fails_the_delivery_with_the_err_text(deployment: Deployment) -> None:
    sop = deployment.send("ar")
    row = deployment.wait(sop, "failed")
    assert len(deployment.receivers["ar"].received) == 1  # not retried: resending cannot help
    shown = _cli(deployment.stack, "show", row.id)
    assert shown["message"]["state"] == "failed"
    assert AR_TEXT in shown["message"]["error"]
    (delivery,) = shown["deliveries"]
    assert delivery["state"] == "failed" and delivery["attempts"] == 1
    assert AR_TEXT in delivery["last_error"]
    assert any(e["kind"] == "delivery_failed" for e in shown["errors"])


def test_a_later_ecg_of_the_patient_waits_while_the_earlier_one_is_retried(deployment: Deployment) -> None:
    """The EHR refuses the first ORU twice (AE: retried after a backoff); the patient's next ECG, analysed
    meanwhile, must not overtake it (``ordering: per_patient``, the HL7 default)."""
    ehr = deployment.receivers["ordered"]
    first = deployment.send("ordered", PatientID="MRN-ORDER-1")
    second = deployment.send("ordered", PatientID="MRN-ORDER-1")
    rows = [deployment.wait(first, "delivered"), deployment.wait(second, "delivered")]
    assert rows[0].patient_key and rows[0].patient_key == rows[1].patient_key  # keyed by the DICOM listener
    assert "MRN-ORDER-1" not in rows[0].patient_key
    ids = [str(hl7.parse(raw).segment("MSH")(10)) for raw in ehr.received]
    assert ids == [control_id(rows[0].id, "ehr-ordered")] * 3 + [control_id(rows[1].id, "ehr-ordered")], ehr.answers
    kinds = [e.kind for e in deployment.stack.store().events(rows[1].id)]
    assert "delivery_waiting" in kinds and "delivery_retry" not in kinds


@pytest.mark.parametrize(("key", "why"), [("silent", "no ACK"), ("close", "closed the connection")])
def test_no_answer_is_retried_then_dead_lettered(deployment: Deployment, key: str, why: str) -> None:
    sop = deployment.send(key)
    row = deployment.wait(sop, "failed", timeout_s=120)
    assert len(deployment.receivers[key].received) == MAX_ATTEMPTS
    (delivery,) = deployment.stack.store().deliveries(row.id)
    assert delivery.state == "dead" and delivery.attempts == MAX_ATTEMPTS
    listed = {m["id"]: m for m in _cli(deployment.stack, "list")}
    assert listed[row.id]["state"] == "failed"
    assert "dead-lettered" in listed[row.id]["error"] and why in listed[row.id]["error"]
