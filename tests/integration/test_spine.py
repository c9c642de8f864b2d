"""The spine end to end: DICOM C-STORE -> store -> Redis -> Celery worker -> FHIR server.

Real parts only: a redis-server started for the test, `ecgbridge gateway` and
`ecgbridge worker` processes, pynetdicom as the sending cart, Medplum's FHIR
server as the EHR; assertions are made on what the FHIR server returns.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import redis
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.processes import REPO, wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

SOP_CT = "1.2.840.10008.5.1.4.1.1.2"


def _reports(fhir, sop_uid: str) -> list[dict]:
    bundle = fhir.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{sop_uid}")
    return [e["resource"] for e in bundle.get("entry", [])]


def _messages_json(stack) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "messages", "list", "--json", "--config", str(stack.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_dicom_ecg_to_one_fhir_report_even_when_sent_twice(make_stack, fhir_server, waveform_ecg_path, database_url):
    stack = make_stack(fhir_base_url=fhir_server.base_url, database_url=database_url)
    stack.start_worker()
    stack.start_gateway()
    ds = dcmread(waveform_ecg_path)
    ds.PatientName, ds.PatientID = "Doe^Janet", "MRN7784512"  # distinctive, to look for in the logs
    assert send_dicom(stack.port, [ds]) == [0x0000]
    assert send_dicom(stack.port, [ds]) == [0x0000]  # the cart resends the same instance

    (first,) = stack.wait_state("delivered", count=1, timeout_s=90)  # one message: the resend is not analysed
    reports = _reports(fhir_server, ds.SOPInstanceUID)
    assert len(reports) == 1, reports
    report = reports[0]
    assert report["code"]["coding"][0]["code"] == "34534-8"
    assert report["category"][0]["coding"][0]["code"] == "EC"
    assert "NOT FOR CLINICAL USE" in report["conclusion"]
    observations = [fhir_server.read(*ref["reference"].split("/")) for ref in report["result"]]
    assert all(obs["resourceType"] == "Observation" for obs in observations)
    probabilities = [o for o in observations if o["valueQuantity"]["code"] == "1"]
    assert len(probabilities) == 5  # one per diagnosis class
    assert all(0.0 <= o["valueQuantity"]["value"] <= 1.0 for o in probabilities)
    measured = {o["code"]["coding"][0]["code"]: o["valueQuantity"] for o in observations if o not in probabilities}
    assert {"8867-4", "8633-0"} <= set(measured)  # heart rate and QRS duration, LOINC with UCUM units
    assert measured["8867-4"]["code"] == "/min" and measured["8633-0"]["code"] == "ms"

    logs = stack.full_logs()
    assert "MRN7784512" not in logs and "Janet" not in logs, "PHI in the logs"

    assert [e.kind for e in stack.store().events(first.id)].count("duplicate_received") == 1
    items = _messages_json(stack)
    assert [m["state"] for m in items] == ["delivered"]
    assert set(items[0]["findings"]) == {"NORM", "MI", "STTC", "CD", "HYP"}


def test_fhir_server_down_then_back_delivers_once(make_stack, fhir_server, waveform_ecg_path):
    stack = make_stack(fhir_base_url=fhir_server.base_url)
    fhir_server.stop()
    try:
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]
        store = stack.store()
        wait_for(
            lambda: any(d.attempts >= 2 and d.state == "pending" for m in store.list() for d in store.deliveries(m.id)),
            60,
            0.3,
            "two failed delivery attempts",
        )
    finally:
        fhir_server.start()
    stack.wait_state("delivered", timeout_s=60)
    assert len(_reports(fhir_server, ds.SOPInstanceUID)) == 1
    view = stack.store().view(stack.store().list()[0].id)
    assert any(e["kind"] == "delivery_retry" for e in view.events)


@pytest.mark.parametrize("broker_lost_task", [False, True], ids=["task-kept", "broker-lost-task"])
def test_gateway_killed_after_ack_is_analysed_and_delivered_exactly_once(
    make_stack, fhir_server, redis_server, waveform_ecg_path, broker_lost_task
):
    stack = make_stack(fhir_base_url=fhir_server.base_url)
    gateway = stack.start_gateway()  # no worker yet: nothing runs the task
    ds = dcmread(waveform_ecg_path)
    ds.SOPInstanceUID = generate_uid()
    assert send_dicom(stack.port, [ds]) == [0x0000]
    gateway.kill()  # SIGKILL right after the acknowledgement
    if broker_lost_task:
        redis.Redis.from_url(redis_server.url).flushall()
    assert [m.state for m in stack.store().list()] == ["queued"]

    stack.start_worker()
    stack.start_gateway()  # its recovery sweep re-enqueues what is not done
    stack.wait_state("delivered", timeout_s=90)
    assert len(_reports(fhir_server, ds.SOPInstanceUID)) == 1
    store = stack.store()
    (row,) = store.list()
    assert len(store.deliveries(row.id)) == 1
    assert store.get_result(row.id) is not None


def test_non_ecg_sop_class_is_refused_at_negotiation(make_stack, waveform_ecg_path):
    from pynetdicom import AE

    stack = make_stack()
    stack.start_gateway()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(SOP_CT)
    ae.add_requested_context(dcmread(waveform_ecg_path).SOPClassUID)
    assoc = ae.associate("127.0.0.1", stack.port, ae_title="ECGBRIDGE")
    assert assoc.is_established
    try:
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert SOP_CT in rejected and SOP_CT not in accepted
    finally:
        assoc.release()


def test_truncated_waveform_gets_failure_status_and_error_record(make_stack, waveform_ecg_path):
    stack = make_stack()
    stack.start_gateway()
    ds = dcmread(waveform_ecg_path)
    bad = copy.deepcopy(ds)
    bad.SOPInstanceUID = generate_uid()
    bad.WaveformSequence[0].WaveformData = bad.WaveformSequence[0].WaveformData[:1000]
    good = copy.deepcopy(ds)
    good.SOPInstanceUID = generate_uid()
    statuses = send_dicom(stack.port, [bad, good])  # same association: it must survive the failure
    assert 0xC000 <= statuses[0] <= 0xCFFF
    assert statuses[1] == 0x0000
    store = stack.store()
    rejected = [m for m in store.list() if m.state == "rejected"]
    assert len(rejected) == 1 and rejected[0].sop_instance_uid == bad.SOPInstanceUID
    assert "byte" in (rejected[0].error or "")
    assert store.events(rejected[0].id), "no error record for the rejected message"
    assert store.read_blob(rejected[0].blob_sha256)  # the bytes are kept for inspection


def test_dataset_without_patient_id_is_analysed_and_flagged(make_stack, waveform_ecg_path):
    stack = make_stack()
    stack.start_worker()
    stack.start_gateway()
    ds = dcmread(waveform_ecg_path)
    ds.SOPInstanceUID = generate_uid()
    del ds.PatientID
    assert send_dicom(stack.port, [ds]) == [0x0000]
    (row,) = stack.wait_state("analysed")
    assert "no_patient_id" in row.flags
    assert stack.store().get_result(row.id) is not None


def test_calling_ae_allowlist_and_unrouted_messages(make_stack, waveform_ecg_path):
    stack = make_stack(
        dicom_options={"allowed_calling_ae_titles": ["CART1", "CART2"]},
        extra={"routes": [{"name": "cart1-only", "match": {"calling_ae_titles": ["CART1"]}, "models": ["diagnosis"]}]},
    )
    stack.start_gateway()
    ds = dcmread(waveform_ecg_path)

    from pynetdicom import AE

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", stack.port, ae_title="ECGBRIDGE")
    assert assoc.is_rejected

    ds.SOPInstanceUID = generate_uid()
    assert send_dicom(stack.port, [ds], ae_title="CART2") == [0x0000]  # allowed, but no route takes it
    (row,) = stack.store().list()
    assert row.state == "unrouted" and row.route is None
    assert any(e.kind == "unrouted" for e in stack.store().events(row.id))


def test_permanent_fhir_refusal_marks_the_message_failed_with_the_operation_outcome(make_stack, waveform_ecg_path):
    from tests.support.fhir_server import FhirServer

    with FhirServer(bearer="the-right-token") as guarded:  # we send no token: 401 OperationOutcome
        stack = make_stack(fhir_base_url=guarded.base_url)
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]
        (row,) = stack.wait_state("failed", timeout_s=60)
    store = stack.store()
    (delivery,) = store.deliveries(row.id)
    assert delivery.state == "failed" and delivery.attempts == 1  # not retried: retrying cannot help
    assert "401" in row.error
    assert any(e.kind == "delivery_failed" for e in store.events(row.id))
    assert store.get_result(row.id) is not None  # the analysis itself is kept


def test_fhir_bearer_token_is_read_from_the_environment(make_stack, waveform_ecg_path, monkeypatch):
    from tests.support.fhir_server import FhirServer

    with FhirServer(bearer="tok-123") as guarded:
        stack = make_stack(fhir_base_url=guarded.base_url, fhir_auth={"type": "bearer", "token_env": "TEST_EHR_TOKEN"})
        monkeypatch.setenv("TEST_EHR_TOKEN", "tok-123")
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]
        stack.wait_state("delivered", timeout_s=60)
        assert len(_reports(guarded, ds.SOPInstanceUID)) == 1
