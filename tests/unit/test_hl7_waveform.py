"""HL7 v2 waveform ORU^R01 <-> Ecg, and the shared HL7 helpers (mapping.hl7_common).

Round trips use real records (PhysioNet/CinC E07506 at 500 Hz, PTB-XL at 100 Hz) and the
real DICOM fixture; the bad-input cases are small hand-written messages, each checking
that the error names the OBX (set-id and segment position) and carries an ERR location.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.errors import DecodeError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient
from ecgbridge.mapping.hl7_common import (
    ErrorLocation,
    decode_bytes,
    error_location,
    escape,
    field_text,
    hl7_charset,
    hl7_timestamp,
    msh_facts,
    obx_codes,
    parse_er7,
    parse_hl7_timestamp,
    python_codec,
    read_er7,
    segments,
    strip_mllp,
    unescape,
)
from ecgbridge.mapping.hl7_waveform import lead_for_channel_name, parse_oru_waveform
from ecgbridge.mapping.readers import read_ecg_bytes
from ecgbridge.mapping.wfdb_record import read_wfdb
from tests.support.hl7_waveform_writer import MAX_OBX5_CHARS, build_oru_ed, build_oru_waveform

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SENT = datetime(2026, 11, 20, 9, 30, tzinfo=timezone(timedelta(hours=1)))
PATIENT = Patient(id="PAT-1", id_issuer="HOSP", name="Doe^Jane", birth_date="1970-02-03", sex="female")


# ----------------------------------------------------------------------- helpers


def _with_identity(ecg: Ecg, patient: Patient = PATIENT) -> Ecg:
    return replace(ecg, patient=patient, study=replace(ecg.study, acquired_at=SENT))


@pytest.fixture(scope="module")
def e07506() -> Ecg:
    """A real 500 Hz, 10 s, 12-lead ECG in mV."""
    return _with_identity(read_wfdb(FIXTURES / "wfdb" / "E07506"))


def _build(ecg: Ecg, **kwargs: object) -> str:
    kwargs.setdefault("control_id", "CTRL-1")
    kwargs.setdefault("sent_at", SENT)
    return build_oru_waveform(ecg, **kwargs)  # type: ignore[arg-type]


def _assert_same(parsed: Ecg, original: Ecg, lsb_mv: float) -> None:
    """Same leads (by name) and samples within one LSB."""
    assert set(parsed.leads) == set(original.leads)
    assert parsed.fs == original.fs
    for lead in original.leads:
        diff = np.max(np.abs(parsed.lead(lead).astype(np.float64) - original.lead(lead)))
        assert diff <= lsb_mv + 1e-6, f"lead {lead} differs by {diff} mV"


HEAD = (
    "MSH|^~\\&|CART|WARD|ECGBRIDGE||20240101120000+0100||ORU^R01^ORU_R01|T1|P|2.5.1",
    "PID|1||P1^^^HOSP^MR||Doe^Jane||19700101|F",
    "OBR|1|PL1|FI1|34534-8^12 lead EKG panel^LN|||20240101115900+0100",
)
#: Three channels I, II, V1 at 500 Hz, 1 uV per unit, full CD each.
CD3 = "~".join(
    f"{n}&{lead}^^1&uV&microvolt&UCUM^1&0&0^500^-32768&32767" for n, lead in ((1, "I"), (2, "II"), (3, "V1"))
)


def _msg(*lines: str, head: tuple[str, ...] = HEAD) -> str:
    return "\r".join(head + lines)


def _obx(set_id: int, value_type: str, value: str, sub: str = "1", code: str = "WAV") -> str:
    return f"OBX|{set_id}|{value_type}|{code}^x^99X|{sub}|{value}||||||F"


def _na(rows: list[list[int]]) -> str:
    return "~".join("^".join(str(v) for v in row) for row in rows)


def _ma(rows: list[list[int]]) -> str:
    return "~".join("^".join(str(v) for v in col) for col in zip(*rows))


ROWS3 = [[100, 200, 300, 400], [-10, -20, -30, -40], [0, 5, 10, 15]]


def _raises(exc_type: type[Exception], message: str, *fragments: str) -> Exception:
    with pytest.raises(exc_type) as info:
        parse_oru_waveform(message)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return info.value


# ------------------------------------------------------------ real-record round trips


@pytest.mark.parametrize("form", ["NA", "MA"])
def test_round_trip_real_500hz_record(e07506: Ecg, form: str) -> None:
    text = _build(e07506, form=form, placer_order_number="PL-9", filler_order_number="FI-9")
    parsed = parse_oru_waveform(text.encode("utf-8"))
    _assert_same(parsed, e07506, lsb_mv=0.001)
    assert parsed.leads == STANDARD_LEADS
    assert parsed.signals.shape == (12, 5000) and parsed.signals.dtype == np.float32
    assert parsed.source_format == "hl7" and parsed.units == "mV"
    assert parsed.patient == PATIENT
    assert parsed.study.placer_order_number == "PL-9"
    assert parsed.study.filler_order_number == "FI-9"
    assert parsed.study.acquired_at == SENT and parsed.study.acquired_at.utcoffset() == timedelta(hours=1)
    assert parsed.study.sop_instance_uid is None
    assert parsed.flags == ()


@pytest.mark.parametrize("record", ["00024_lr", "00622_lr", "00730_lr"])
@pytest.mark.parametrize("form,sensitivity", [("NA", 1.0), ("MA", 2.5)])
def test_round_trip_ptbxl(record: str, form: str, sensitivity: float) -> None:
    ecg = _with_identity(read_wfdb(FIXTURES / "wfdb" / record))
    parsed = read_ecg_bytes(_build(ecg, form=form, sensitivity_uv=sensitivity).encode(), hint="hl7")
    _assert_same(parsed, ecg, lsb_mv=sensitivity / 1000)
    assert parsed.fs == 100.0


def test_full_length_message_is_split_into_obx_within_the_field_limit(e07506: Ecg) -> None:
    text = _build(e07506, form="NA")
    er7 = read_er7(text)
    waves = [s for s in segments(er7.message) if s.name == "OBX" and field_text(s, 2) == "NA"]
    assert len(waves) > 1
    assert all(len(er7.deferred_value(s) or "") <= MAX_OBX5_CHARS for s in waves)
    assert len(text) > 200_000  # really full length: 12 x 5,000 samples


def test_leads_are_read_by_name_not_position(e07506: Ecg) -> None:
    order = [9, 3, 0, 11, 5, 1, 7, 2, 10, 4, 8, 6]
    shuffled = replace(e07506, signals=e07506.signals[order], leads=tuple(e07506.leads[i] for i in order))
    text = _build(shuffled, form="MA")
    first_cd = next(s for s in text.split("\r") if s.startswith("OBX|1|CD|"))
    assert "|1&V4^V4^" in first_cd
    parsed = parse_oru_waveform(text)
    assert parsed.leads == STANDARD_LEADS
    _assert_same(parsed, e07506, lsb_mv=0.001)


def test_eight_lead_cart_derives_limb_leads(e07506: Ecg) -> None:
    eight = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    ecg = replace(e07506, signals=np.stack([e07506.lead(x) for x in eight]), leads=eight)
    parsed = parse_oru_waveform(_build(ecg))
    assert parsed.leads == STANDARD_LEADS
    assert "derived_leads:III,aVR,aVL,aVF" in parsed.flags
    np.testing.assert_allclose(parsed.lead("III"), parsed.lead("II") - parsed.lead("I"), atol=1e-6)


def test_missing_leads_are_flagged() -> None:
    ecg = Ecg(signals=np.array(ROWS3, dtype=np.float32) / 1000, leads=("I", "II", "V1"), fs=500.0, patient=PATIENT)
    parsed = parse_oru_waveform(_build(ecg))
    assert "missing_leads:V2,V3,V4,V5,V6" in parsed.flags
    assert "derived_leads:III,aVR,aVL,aVF" in parsed.flags


def test_build_output_validates_strictly_with_hl7apy(e07506: Ecg) -> None:
    for form in ("NA", "MA"):
        text = _build(e07506, form=form, accept_ack_type="AL", application_ack_type="NE")
        assert "\n" not in text and text.startswith("MSH|^~\\&|CART|WARD|ECGBRIDGE|")
        message = parse_er7(text, validate=True)  # hl7apy STRICT + Message.validate()
        assert message.name == "ORU_R01"
        ids = [s.name for s in segments(message)]
        assert ids[:4] == ["MSH", "PID", "OBR", "OBX"]
        facts = msh_facts(message)
        assert facts["message_type"] == "ORU^R01" and facts["control_id"] == "CTRL-1"
        assert facts["accept_ack_type"] == "AL" and facts["application_ack_type"] == "NE"
        assert facts["charset"] == "UNICODE UTF-8" and facts["version"] == "2.5.1"
        assert obx_codes(message) == ("CHN", "TIM", "WAV")


def test_build_refuses_what_it_cannot_write(e07506: Ecg) -> None:
    with pytest.raises(ValueError, match="form"):
        _build(e07506, form="XX")
    with pytest.raises(ValueError, match="patient.id"):
        _build(replace(e07506, patient=Patient()))
    with pytest.raises(ValueError, match="control_id"):
        _build(e07506, control_id="")
    with pytest.raises(ValueError, match="naive"):
        _build(e07506, sent_at=datetime(2026, 1, 1))


# ------------------------------------------------------------ sensitivity and units


def test_sensitivity_correction_and_baseline_are_applied() -> None:
    # (value - baseline) * sensitivity * correction: (300 - 100) * 0.5 uV * 2 = 200 uV
    cd = "1&I^^0.5&uV&microvolt&UCUM^2&100&0^250~2&II^^1&mV^1&0&0^250"
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", cd, code="CHN"), _obx(2, "NA", "300^100~1^-1")))
    np.testing.assert_allclose(parsed.lead("I"), [0.2, 0.0], atol=1e-7)
    np.testing.assert_allclose(parsed.lead("II"), [1.0, -1.0], atol=1e-7)
    assert parsed.fs == 250.0


def test_sticky_defaults_apply_to_later_channels() -> None:
    cd = "1&I^^2&uV^1&0&0^500^-1000&1000~2&II~3&V1"
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", cd), _obx(2, "MA", _ma(ROWS3[:1] * 3))))
    np.testing.assert_allclose(parsed.lead("V1"), np.array(ROWS3[0]) * 0.002, atol=1e-7)


def test_missing_units_are_assumed_microvolt_and_flagged() -> None:
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", "1&I^^^^500~2&II"), _obx(2, "NA", "1000~2000")))
    assert "units_assumed:uV" in parsed.flags
    np.testing.assert_allclose(parsed.lead("II"), [2.0])


def test_non_voltage_units_are_refused() -> None:
    error = _raises(
        WaveformError,
        _msg(_obx(4, "CD", "1&I^^1&mm[Hg]&millimetre of mercury^^500~2&II"), _obx(5, "NA", "1~2")),
        "OBX 4 (segment 4)",
        "mm[Hg]",
        "not a voltage unit",
    )
    assert error_location(error) == ErrorLocation("OBX", 1, 5, 1)


def test_lead_names_codes_and_electrode_pairs() -> None:
    assert lead_for_channel_name("AVR") == "aVR"
    assert lead_for_channel_name("Lead II") == "II"
    assert lead_for_channel_name("MDC_ECG_LEAD_AVF") == "aVF"
    assert lead_for_channel_name("131329") == "I"
    assert lead_for_channel_name("5.6.3-9-64") == "aVF"
    assert lead_for_channel_name("ECG V5") == "V5"
    assert lead_for_channel_name("Resp") is None
    # channel 3 named by its waveform source electrodes (LL - RA is lead II), 4 unknown: dropped
    cd = "1&MDC_ECG_LEAD_I^^1&uV^^500~2&ignored^V1~3^LL&RA~4&Pleth"
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", cd), _obx(2, "NA", "1~2~3~4")))
    assert set(parsed.leads) >= {"I", "II", "V1"}
    assert "dropped_channels:Pleth" in parsed.flags


def test_timestamps_continuation_and_gap() -> None:
    ok = _msg(
        _obx(1, "CD", CD3),
        _obx(2, "TS", "20240101115900.000+0100", code="TIM"),
        _obx(3, "NA", _na([r[:2] for r in ROWS3])),
        _obx(4, "TS", "20240101115900.004+0100", code="TIM"),  # 2 samples at 500 Hz later
        _obx(5, "NA", _na([r[2:] for r in ROWS3])),
    )
    parsed = parse_oru_waveform(ok)
    np.testing.assert_allclose(parsed.lead("I"), np.array(ROWS3[0]) / 1000, atol=1e-7)
    assert parsed.study.acquired_at == datetime(2024, 1, 1, 11, 59, tzinfo=timezone(timedelta(hours=1)))
    gap = ok.replace("20240101115900.004", "20240101115901.000")
    _raises(WaveformError, gap, "OBX 4 (segment 7)", "gaps")


def test_observation_time_from_obr_when_there_is_no_ts() -> None:
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3))))
    assert parsed.study.acquired_at == datetime(2024, 1, 1, 11, 59, tzinfo=timezone(timedelta(hours=1)))
    assert parsed.study.placer_order_number == "PL1" and parsed.study.filler_order_number == "FI1"


def test_channels_split_over_sub_id_groups() -> None:
    message = _msg(
        _obx(1, "CD", "1&I^^1&uV^^500~2&II", sub="1"),
        _obx(2, "CD", "1&V1^^1&uV^^500", sub="2"),
        _obx(3, "NA", _na(ROWS3[:2]), sub="1"),
        _obx(4, "NA", _na(ROWS3[2:]), sub="2"),
    )
    parsed = parse_oru_waveform(message)
    np.testing.assert_allclose(parsed.lead("V1"), np.array(ROWS3[2]) / 1000, atol=1e-7)


# ------------------------------------------------------------------- bad waveforms


def test_cd_and_na_disagree_names_the_obx() -> None:
    error = _raises(
        WaveformError,
        _msg(_obx(1, "CD", CD3), _obx(2, "TS", "20240101"), _obx(3, "NA", _na(ROWS3[:2]))),
        "OBX 3 (segment 6)",
        "lists 3 channels",
        "NA data has 2 channel blocks",
    )
    assert error_location(error) == ErrorLocation("OBX", 3, 5)
    assert error.hl7_ack_code == "AE"


def test_interleaved_single_block_na_gets_a_hint() -> None:
    flat = "^".join(str(v) for col in zip(*ROWS3) for v in col)
    _raises(
        WaveformError,
        _msg(_obx(1, "CD", CD3), _obx(2, "NA", flat)),
        "OBX 2 (segment 5)",
        "1 channel blocks",
        "channel-block",
        "are MA",
    )


def test_ma_time_sample_with_wrong_channel_count() -> None:
    data = _ma(ROWS3).split("~")
    data[2] = "1^2"
    error = _raises(
        WaveformError,
        _msg(_obx(1, "CD", CD3), _obx(7, "MA", "~".join(data))),
        "OBX 7 (segment 5)",
        "lists 3 channels",
        "time sample 3",
        "has 2 values",
    )
    assert error_location(error) == ErrorLocation("OBX", 2, 5, 3)


def test_na_blocks_of_different_lengths() -> None:
    rows = [r[:] for r in ROWS3]
    rows[1] = rows[1][:3]
    _raises(WaveformError, _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(rows))), "differ in length", "channel 2: 3")


def test_waveform_without_channel_definition() -> None:
    error = _raises(
        WaveformError,
        _msg(_obx(1, "TS", "20240101"), _obx(2, "NA", _na(ROWS3))),
        "OBX 2 (segment 5)",
        "no channel definition",
    )
    assert error_location(error) == ErrorLocation("OBX", 2, 2)


def test_waveform_sub_id_without_channel_definition() -> None:
    _raises(
        WaveformError,
        _msg(_obx(1, "CD", CD3, sub="1"), _obx(2, "NA", _na(ROWS3), sub="1"), _obx(3, "NA", _na(ROWS3), sub="2")),
        "OBX 3 (segment 6)",
        "sub-ID 2",
        "no channel definition",
    )


def test_channel_definition_without_data() -> None:
    _raises(
        WaveformError,
        _msg(
            _obx(1, "CD", CD3, sub="1"), _obx(2, "CD", "1&V2^^1&uV^^500", sub="2"), _obx(3, "NA", _na(ROWS3), sub="1")
        ),
        "OBX 2 (segment 5)",
        "sub-ID 2 has no waveform data",
    )


def test_unequal_sampling_rates() -> None:
    cd = CD3.replace("~3&V1^^1&uV&microvolt&UCUM^1&0&0^500", "~3&V1^^1&uV&microvolt&UCUM^1&0&0^250")
    error = _raises(
        WaveformError,
        _msg(_obx(1, "CD", cd), _obx(2, "NA", _na(ROWS3))),
        "OBX 1 (segment 4)",
        "channel 3 (V1)",
        "250 Hz differs from 500 Hz",
    )
    assert error_location(error) == ErrorLocation("OBX", 1, 5, 3)


def test_missing_sampling_rate() -> None:
    _raises(
        WaveformError,
        _msg(_obx(1, "CD", "1&I^^1&uV~2&II"), _obx(2, "NA", "1~2")),
        "OBX 1 (segment 4)",
        "no sampling frequency",
    )


@pytest.mark.parametrize("bad,shown", [("12x", "'12x'"), ("", "empty"), ("nan", "'nan'"), ("1\\T\\2", "'1\\\\T\\\\2'")])
def test_non_numeric_sample(bad: str, shown: str) -> None:
    rows = [[str(v) for v in r] for r in ROWS3]
    rows[1][2] = bad
    data = "~".join("^".join(r) for r in rows)
    _raises(
        WaveformError,
        _msg(_obx(1, "CD", CD3), _obx(2, "NA", data)),
        "OBX 2 (segment 5)",
        "sample 3 of channel 2",
        f"is not a number ({shown})",
    )


def test_sample_outside_declared_range() -> None:
    cd = CD3.replace("-32768&32767", "-100&100", 1)
    _raises(
        WaveformError,
        _msg(_obx(1, "CD", cd), _obx(2, "NA", _na(ROWS3))),
        "lead I: sample 2 = 200 is outside the declared range -100..100",
    )


def test_duplicate_lead() -> None:
    cd = CD3.replace("3&V1", "3&I")
    _raises(WaveformError, _msg(_obx(1, "CD", cd), _obx(2, "NA", _na(ROWS3))), "lead I is defined twice")


def test_two_waveforms_in_one_message() -> None:
    second = ("OBR|2|PL2|FI2|34534-8^12 lead EKG panel^LN", _obx(3, "CD", CD3), _obx(4, "NA", _na(ROWS3)))
    _raises(
        UnsupportedInputError,
        _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3)), *second),
        "2 waveforms",
        "one ECG per ORU^R01",
    )


def test_no_waveform_at_all() -> None:
    message = _msg(
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min^^UCUM|||||F",
        "OBX|2|ED|PDF^Report^99X||^Application^PDF^Base64^" + base64.b64encode(b"%PDF-1.4 x").decode() + "||||||F",
    )
    error = _raises(
        UnsupportedInputError, message, "ORU^R01 carries no waveform", "CD+NA/MA", "ED", "found OBX value types ED, NM"
    )
    assert error.hl7_ack_code == "AR"
    _raises(UnsupportedInputError, _msg(), "found no OBX segment")


def test_not_an_oru() -> None:
    head = (HEAD[0].replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01"),) + HEAD[1:]
    error = _raises(UnsupportedInputError, _msg(head=head), "MSH-9 is ORM^O01")
    assert error_location(error) == ErrorLocation("MSH", 1, 9)


def test_not_hl7_and_bad_charset() -> None:
    with pytest.raises(DecodeError, match="does not start with MSH"):
        parse_oru_waveform(b"\x00\x01garbage")
    with pytest.raises(DecodeError, match="empty input"):
        parse_oru_waveform(b"")
    latin = _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3))).replace("Doe^Jane", "Doe^Jérôme")
    lying = latin.replace("|2.5.1", "|2.5.1||||||UNICODE UTF-8", 1).encode("latin-1")
    with pytest.raises(DecodeError, match=r"MSH-18 declares UNICODE UTF-8 but byte 0xE9") as info:
        parse_oru_waveform(lying)
    assert error_location(info.value) == ErrorLocation("MSH", 1, 18)


# ------------------------------------------------------------ encapsulated files


def test_ed_with_base64_dicom_uses_the_hl7_identity() -> None:
    dicom = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()
    reference = to_ecg(read_bytes(dicom))
    text = build_oru_ed(
        dicom, "DICOM", control_id="ED-1", patient=PATIENT, acquired_at=SENT, placer_order_number="PL-ED", sent_at=SENT
    )
    parse_er7(text, validate=True)
    parsed = parse_oru_waveform(text.encode())
    np.testing.assert_array_equal(parsed.signals, reference.signals)
    assert parsed.leads == reference.leads and parsed.fs == reference.fs == 500.0
    # HL7 wins for the patient and the order; the DICOM keeps its UIDs and acquisition time.
    assert parsed.patient == PATIENT
    assert parsed.study.sop_instance_uid == reference.study.sop_instance_uid is not None
    assert parsed.study.study_instance_uid == reference.study.study_instance_uid
    assert parsed.study.acquired_at == reference.study.acquired_at
    assert parsed.study.placer_order_number == "PL-ED"
    assert parsed.source_format == "hl7"
    assert "embedded:dicom" in parsed.flags and "patient_id_overrides_embedded" in parsed.flags


def test_ed_embedded_dicom_fills_what_hl7_lacks() -> None:
    dicom = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()
    reference = to_ecg(read_bytes(dicom))
    text = build_oru_ed(dicom, "DICOM", control_id="ED-2", patient=Patient(id=reference.patient.id), sent_at=SENT)
    parsed = parse_oru_waveform(text)
    assert parsed.patient.name == reference.patient.name
    assert parsed.patient.sex == reference.patient.sex
    assert "patient_id_overrides_embedded" not in parsed.flags


def test_ed_with_broken_payloads() -> None:
    def ed(value: str) -> str:
        return _msg("OBX|3|ED|ECG^x^99X||" + value + "||||||F")

    _raises(DecodeError, ed("^Application^DICOM^Base64^!!!notbase64"), "OBX 3 (segment 4)", "not valid Base64")
    cut = base64.b64encode((FIXTURES / "dicom" / "cinc2021_E07506_cut.dcm").read_bytes()).decode()
    _raises(DecodeError, ed("^Application^DICOM^Base64^" + cut), "OBX 3 (segment 4): embedded DICOM")
    _raises(UnsupportedInputError, ed("^Application^DICOM^Zip^AAAA"), "ED encoding 'ZIP'")


@pytest.mark.parametrize("name", ["liryc_hl7aecg_example.xml", "129DYPRG.XML", "3191723_ZZDEMOPTONLY_1-04_orig.xml"])
def test_ed_with_xml_ecg(name: str) -> None:
    vendor = pytest.importorskip("ecgbridge.mapping.vendor", reason="mapping.vendor (XML readers) not present")
    path = FIXTURES / "vendor" / name
    if not path.exists():
        pytest.skip(f"vendor XML fixture {name} not present")
    data = path.read_bytes()
    reference = vendor.read_xml(data)
    parsed = parse_oru_waveform(build_oru_ed(data, "XML", control_id="X-1", patient=PATIENT, sent_at=SENT))
    np.testing.assert_array_equal(parsed.signals, reference.signals)
    assert parsed.patient.id == PATIENT.id
    assert f"embedded:{reference.source_format}" in parsed.flags


# --------------------------------------------------------------- charsets and names


@pytest.mark.parametrize("encoding,msh18", [("UTF-8", "UNICODE UTF-8"), ("ISO-8859-1", "8859/1")])
def test_non_ascii_names_survive(encoding: str, msh18: str) -> None:
    ecg = Ecg(
        signals=np.array(ROWS3, dtype=np.float32) / 1000,
        leads=("I", "II", "V1"),
        fs=500.0,
        patient=replace(PATIENT, name="Müller-Lüdenscheidt^Zoë^Ærø"),
    )
    text = _build(ecg, encoding=encoding)
    assert f"|{msh18}" in text.split("\r")[0]
    raw = text.encode(python_codec(msh18))
    assert decode_bytes(raw)[1] == msh18
    parsed = parse_oru_waveform(raw)
    assert parsed.patient.name == "Müller-Lüdenscheidt^Zoë^Ærø"


def test_without_msh18_utf8_then_latin1() -> None:
    message = _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3))).replace("Doe^Jane", "Doe^Jérôme")
    assert parse_oru_waveform(message.encode("utf-8")).patient.name == "Doe^Jérôme"
    assert parse_oru_waveform(message.encode("latin-1")).patient.name == "Doe^Jérôme"
    assert decode_bytes(message.encode("latin-1"))[1] == "8859/1"


def test_escaped_delimiters_in_names_and_framing_and_line_feeds() -> None:
    ecg = Ecg(
        signals=np.array(ROWS3, dtype=np.float32) / 1000,
        leads=("I", "II", "V1"),
        fs=500.0,
        patient=replace(PATIENT, id="A|B&C", name="O&Brien^Mary~Ann"),
    )
    text = _build(ecg)
    assert "O\\T\\Brien^Mary\\R\\Ann" in text and "A\\F\\B\\T\\C" in text
    framed = b"\x0b" + text.replace("\r", "\r\n").encode() + b"\x1c\r"
    parsed = parse_oru_waveform(framed)
    assert parsed.patient.name == "O&Brien^Mary~Ann" and parsed.patient.id == "A|B&C"


def test_patient_fields() -> None:
    head = (HEAD[0], "PID|1||^^^X~P2^^^HOSP2^MR||Smith^John^Q^Jr^Dr||1970|U") + HEAD[2:]
    parsed = parse_oru_waveform(_msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3)), head=head))
    assert parsed.patient.id is None and "no_patient_id" in parsed.flags
    assert parsed.patient.name == "Smith^John^Q^Dr^Jr"  # DICOM PN order
    assert parsed.patient.birth_date is None and "invalid_birth_date" in parsed.flags
    assert parsed.patient.sex == "unknown"


# ---------------------------------------------------------------- committed fixtures


def test_committed_fixtures_are_what_the_generator_writes() -> None:
    from tests.fixtures.hl7.make_hl7_fixtures import messages

    for name, (text, codec) in messages().items():
        path = FIXTURES / "hl7" / name
        data = path.read_bytes()
        assert len(data) < 200_000, f"{name} is {len(data):,} bytes"
        assert data == text.encode(codec), f"{name} differs from a rebuild: run make_hl7_fixtures"
        parse_er7(data, validate=True)
        ecg = parse_oru_waveform(data)
        assert ecg.leads == STANDARD_LEADS and ecg.patient.id


def test_fixture_contents() -> None:
    na = parse_oru_waveform((FIXTURES / "hl7" / "ptbxl_00024_na_100hz.hl7").read_bytes())
    wfdb = read_wfdb(FIXTURES / "wfdb" / "00024_lr")
    assert na.fs == 100.0 and na.signals.shape == (12, 1000)
    _assert_same(na, wfdb, lsb_mv=0.001)
    ma = parse_oru_waveform((FIXTURES / "hl7" / "cinc2021_E07506_ma_2500ms_8859-1.hl7").read_bytes())
    assert ma.signals.shape == (12, 1250) and ma.patient.name == "Zoë^Ærøskøbing"
    e07506 = read_wfdb(FIXTURES / "wfdb" / "E07506")
    for lead in STANDARD_LEADS:
        assert np.max(np.abs(ma.lead(lead) - e07506.lead(lead)[:1250])) <= 0.0025 + 1e-6


def test_conformance_statement_examples_are_real() -> None:
    """The examples in deploy/conformance/hl7.md parse, and the ORU is what the builder writes."""
    doc = (Path(__file__).resolve().parents[2] / "deploy" / "conformance" / "hl7.md").read_text("utf-8")
    blocks = [b.split("```", 1)[0].strip() for b in doc.split("```\n")[1:] if b.startswith("MSH|")]
    oru, orm = (b.replace("\n", "\r") for b in blocks)
    ecg = parse_oru_waveform(oru)
    assert ecg.signals.shape == (12, 4) and ecg.lead("I")[0] == pytest.approx(0.019)
    assert ecg.study.placer_order_number == "ORD-778899" and ecg.study.filler_order_number == "ECG-5566"
    tz = timezone(timedelta(hours=1))
    source = read_wfdb(FIXTURES / "wfdb" / "E07506")
    source = replace(
        source,
        signals=source.signals[:, :4],
        patient=Patient(id="123456", id_issuer="HOSP", name="Doe^Jane", birth_date="1958-04-12", sex="female"),
        study=replace(source.study, acquired_at=datetime(2026, 11, 20, 9, 29, 50, tzinfo=tz)),
    )
    assert oru == build_oru_waveform(
        source,
        control_id="CART0001-000042",
        sending_application="CART01",
        sending_facility="CARDIO",
        receiving_facility="HOSP",
        placer_order_number="ORD-778899",
        filler_order_number="ECG-5566",
        sent_at=datetime(2026, 11, 20, 9, 30, 5, tzinfo=tz),
    )
    ma_line = next(line for line in doc.splitlines() if line.startswith("OBX|3|MA|"))
    np.testing.assert_allclose(parse_oru_waveform(oru.replace(oru.split("\r")[-1], ma_line)).signals, ecg.signals)
    order = parse_er7(orm)
    assert msh_facts(order)["message_type"] == "ORM^O01"
    pv1 = next(s for s in segments(order) if s.name == "PV1")
    assert field_text(pv1, 19) == "V-4455"


# ------------------------------------------------------------- mapping.hl7_common


def test_decode_bytes_and_charsets() -> None:
    assert strip_mllp(b"\x0bMSH|x\x1c\r") == b"MSH|x"
    with pytest.raises(DecodeError, match="inside the message"):
        strip_mllp(b"\x0bMSH|a\x1c\r\x0bMSH|b\x1c\r")
    assert python_codec("8859/1") == "latin-1" and python_codec("unicode utf-8") == "utf-8"
    assert hl7_charset("UTF-8") == "UNICODE UTF-8" and hl7_charset("latin-1") == "8859/1"
    with pytest.raises(DecodeError, match="UNICODE UTF-16"):
        python_codec("UNICODE UTF-16")
    with pytest.raises(DecodeError, match="table 0211"):
        python_codec("KLINGON")
    text = _msg().replace("|2.5.1", "|2.5.1||||||ASCII", 1)
    with pytest.raises(DecodeError, match="declares ASCII but byte 0xC3"):
        decode_bytes(text.replace("Jane", "Jäne").encode("utf-8"))
    assert decode_bytes("\ufeff" + text) == (text, "ASCII")


def test_read_er7_defers_arrays_and_keeps_wire_order() -> None:
    message = _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3)), "ZXX|1|local")
    er7 = read_er7(message, find_groups=False)
    assert er7.segment_ids == ("MSH", "PID", "OBR", "OBX", "OBX", "ZXX")
    assert [s.name for s in segments(er7.message)] == list(er7.segment_ids)
    na = segments(er7.message)[4]
    assert field_text(na, 5).startswith("ecgbridge-deferred-")
    assert er7.deferred_value(na) == _na(ROWS3)
    grouped = read_er7(message)  # hl7apy groups: the Z-segment fits nowhere
    assert grouped.dropped == ("ZXX",)
    parse_er7(message, validate=True)  # Z-segments are allowed


def test_validation_errors_name_the_place() -> None:
    no_obr4 = _msg(_obx(1, "CD", CD3)).replace("|34534-8^12 lead EKG panel^LN|", "||")
    with pytest.raises(DecodeError, match="OBR.OBR_4") as info:
        parse_er7(no_obr4, validate=True)
    assert error_location(info.value) == ErrorLocation("OBR", 1, 4)
    parse_er7(no_obr4)  # tolerant by default
    stray = "\r".join(HEAD + ("EVN|A01|20240101",))
    with pytest.raises(DecodeError, match=r"segment 4 \(EVN\) does not fit"):
        parse_er7(stray, validate=True)
    with pytest.raises(DecodeError, match="MSH-12"):
        parse_er7(HEAD[0].replace("2.5.1", "").rstrip("|"))
    with pytest.raises(DecodeError, match="'3.0' is not one ecgbridge reads"):
        parse_er7(HEAD[0].replace("2.5.1", "3.0"))
    with pytest.raises(DecodeError, match="segment 2 does not start with a segment id"):
        parse_er7(HEAD[0] + "\rnot a segment")
    bad_date = _msg().replace("||19700101|", "||1970-01-01|")
    with pytest.raises(DecodeError, match=r"PID-7 \(segment occurrence 1\) is not a valid value") as info:
        parse_er7(bad_date, validate=True)
    assert error_location(info.value) == ErrorLocation("PID", 1, 7)
    assert "1970" not in str(info.value)  # values (PHI) stay in .detail


def test_older_versions_parse_and_validate_as_251() -> None:
    head = (HEAD[0].replace("ORU^R01^ORU_R01", "ORU^R01").replace("2.5.1", "2.3"),) + HEAD[1:]
    message = _msg(_obx(1, "CD", CD3), _obx(2, "NA", _na(ROWS3)), head=head)
    assert {"I", "II", "V1", "aVF"} <= set(parse_oru_waveform(message).leads)
    read_er7(message, validate=True, validate_as="2.5.1")
    assert msh_facts(parse_er7(message))["version"] == "2.3"


def test_msh_facts_and_obx_codes() -> None:
    head = ("MSH|^~\\&|CART^1.2.3^ISO|WARD|ECGBRIDGE|HOSP|20240101||ORU^R01|C\\F\\9|P|2.5.1|||AL|ER||8859/1",) + HEAD[
        1:
    ]
    message = parse_er7(_msg(_obx(1, "CD", CD3, code="CHN"), _obx(2, "NA", _na(ROWS3)), head=head))
    facts = msh_facts(message)
    assert facts == {
        "sending_application": "CART",
        "sending_facility": "WARD",
        "receiving_application": "ECGBRIDGE",
        "receiving_facility": "HOSP",
        "message_type": "ORU^R01",
        "message_structure": None,
        "control_id": "C|9",
        "processing_id": "P",
        "version": "2.5.1",
        "field_separator": "|",
        "encoding_characters": "^~\\&",
        "charset": "8859/1",
        "accept_ack_type": "AL",
        "application_ack_type": "ER",
    }
    assert obx_codes(message) == ("CHN", "WAV")


def test_timestamps() -> None:
    when = datetime(2024, 3, 5, 7, 8, 9, 123400, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    assert hl7_timestamp(when) == "20240305070809.1234-0530"
    assert parse_hl7_timestamp(hl7_timestamp(when)) == when
    assert hl7_timestamp(datetime(2024, 1, 1, tzinfo=UTC)) == "20240101000000+0000"
    with pytest.raises(ValueError, match="naive"):
        hl7_timestamp(datetime(2024, 1, 1))
    assert hl7_timestamp(datetime(2024, 1, 1), naive_ok=True) == "20240101000000"
    assert parse_hl7_timestamp("2024") == datetime(2024, 1, 1)
    assert parse_hl7_timestamp("202401021230").tzinfo is None
    assert parse_hl7_timestamp("") is None and parse_hl7_timestamp('""') is None
    for bad in ("2024-01-01", "20241301x", "20240101+2500"):
        with pytest.raises(ValueError):
            parse_hl7_timestamp(bad)


def test_escape_round_trip() -> None:
    text = "a|b^c&d~e\\f\rg\nh"
    escaped = escape(text)
    assert escaped == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\X0A\\h"
    assert unescape(escaped) == text
    assert escape("x#y", "^~\\&#") == "x\\P\\y"
    assert unescape("\\H\\bold\\N\\ \\X4A6F\\ \\Zlocal\\ line\\.br\\two") == "bold Jo  line\ntwo"
    assert (
        unescape("#x#", {"FIELD": "|", "COMPONENT": "^", "REPETITION": "~", "ESCAPE": "#", "SUBCOMPONENT": "&"})
        == "#x#"
    )
