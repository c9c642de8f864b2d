"""Replay every input the fuzzers crashed on (tests/fixtures/fuzz/, described in its README).

Each file must now be answered as documented: the reader's InputError, an ACK from the
HL7 handler, a context (with its problems) from the EHR mapping. The table names the
answer each one gets; a fixture without a row fails, so nothing is kept undescribed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecgbridge.errors import DecodeError, InputError, WaveformError
from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg
from ecgbridge.mapping.ehr_context import context_from_resources
from ecgbridge.mapping.vendor import read_xml
from tests.fuzz.targets import (
    check_dicom_bytes,
    check_ehr,
    check_hl7_inbound,
    check_hl7_parse,
    check_hl7_wire,
    check_xml,
    inbound_context,
    load_json,
)

FUZZ = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz"

#: file -> (the error the reader raises | the MSA-1 of the ACK | a problem the EHR context names, or "").
EXPECTED: dict[str, type[InputError] | str] = {
    "dicom-unknown-vr-in-bare-dataset.dcm": DecodeError,
    "dicom-unparseable-sequence-item.dcm": DecodeError,
    "dicom-waveform-sequence-not-a-sequence.dcm": DecodeError,
    "hl7-non-ascii-field-separator.hl7": "AR",
    "hl7-five-encoding-characters-short-msh.hl7": "AR",
    "xml-philips-duration-overflow.xml": WaveformError,
    "xml-philips-resolution-beyond-float32.xml": WaveformError,
    "ehr-naive-acquisition-time-year-1.json": "ECG acquisition time out of range",
    "ehr-aware-acquisition-time-beyond-utc-range.json": "ECG acquisition time out of range",
    "ehr-fhir-datetime-beyond-utc-range.json": "",
    "ehr-window-before-year-1.json": "",
    "ehr-coding-not-a-list.json": "",
    "ehr-coding-code-not-a-string.json": "",
    "ehr-component-not-a-list.json": "",
    "ehr-status-not-a-string.json": "",
    "ehr-value-beyond-float-range.json": "creatinine: 1 value not a finite number ignored",
}


def test_every_fixture_is_described() -> None:
    kept = {p.name for p in FUZZ.iterdir() if p.name != "README.md"}
    assert kept == set(EXPECTED)
    readme = (FUZZ / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in kept)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("dicom-")))
def test_dicom_crashers_are_refused(name: str) -> None:
    data = (FUZZ / name).read_bytes()
    check_dicom_bytes(data)
    with pytest.raises(EXPECTED[name]):  # type: ignore[arg-type]
        to_ecg(read_bytes(data, force=True))


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("hl7-")))
def test_hl7_crashers_are_answered(name: str) -> None:
    from ecgbridge.gateway.hl7_inbound import handle_message

    raw = (FUZZ / name).read_bytes()
    check_hl7_wire(raw)
    check_hl7_parse(raw)
    check_hl7_inbound(raw)
    ack = handle_message(raw, "10.1.2.3:40001", inbound_context()).decode("ascii")
    assert ack.startswith("MSH|^~\\&|") and re.search(rf"\rMSA\|{EXPECTED[name]}[|\r]", ack), ack


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("xml-")))
def test_xml_crashers_are_refused(name: str) -> None:
    data = (FUZZ / name).read_bytes()
    check_xml(data)
    with pytest.raises(EXPECTED[name]):  # type: ignore[arg-type]
        read_xml(data)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("ehr-")))
def test_ehr_crashers_become_problems(name: str) -> None:
    kwargs = load_json((FUZZ / name).read_bytes())
    check_ehr(kwargs)
    context = context_from_resources(**kwargs)
    expected = EXPECTED[name]
    assert isinstance(expected, str)
    assert not expected or any(p.startswith(expected) for p in context.problems), context.problems
