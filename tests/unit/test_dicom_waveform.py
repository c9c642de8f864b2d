"""Tests for mapping.dicom_waveform (why: a wrong lead, unit or group is a wrong diagnosis).

The main subject is a real cart's file (pydicom's Mortara ``waveform_ecg.dcm``), edited
in memory to build each failure the reader must catch, plus the committed fixtures.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from ecgbridge.errors import DecodeError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.codes import MDC_LEAD_CODES, SCPECG_LEAD_CODES, SOP_12_LEAD_ECG
from ecgbridge.mapping.dicom_waveform import (
    lead_for_channel,
    median_beat,
    read_bytes,
    standardise_leads,
    to_ecg,
    validate_for_storage,
)
from ecgbridge.mapping.ecg import STANDARD_LEADS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dicom"
MORTARA_PATH = get_testdata_file("waveform_ecg.dcm")
EIGHT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.fixture(scope="module")
def mortara_bytes() -> bytes:
    return Path(MORTARA_PATH).read_bytes()


@pytest.fixture()
def mortara(mortara_bytes: bytes) -> Dataset:
    """A fresh, decoded copy each test may edit."""
    return read_bytes(mortara_bytes)


@pytest.fixture(scope="module")
def mortara_ecg(mortara_bytes: bytes):
    return to_ecg(read_bytes(mortara_bytes))


def _group(ds: Dataset, label: str) -> Dataset:
    return next(g for g in ds.WaveformSequence if g.MultiplexGroupLabel == label)


def _raw(group: Dataset) -> np.ndarray:
    n, c = int(group.NumberOfWaveformSamples), int(group.NumberOfWaveformChannels)
    return np.frombuffer(group.WaveformData, dtype="<i2").reshape(n, c).copy()


def _set_columns(
    group: Dataset, columns: list[int], extra: np.ndarray | None = None, extra_channel: Dataset | None = None
) -> None:
    """Keep (and reorder to) ``columns`` of a group; optionally append one channel."""
    raw = _raw(group)[:, columns]
    channels = [group.ChannelDefinitionSequence[i] for i in columns]
    if extra is not None and extra_channel is not None:
        raw = np.column_stack([raw, extra.astype("<i2")])
        channels.append(extra_channel)
    group.ChannelDefinitionSequence = channels
    group.NumberOfWaveformChannels = len(channels)
    group.WaveformData = np.ascontiguousarray(raw.astype("<i2")).tobytes()


def _column_of(group: Dataset, lead: str) -> int:
    return next(i for i, ch in enumerate(group.ChannelDefinitionSequence) if lead_for_channel(ch) == lead)


# ------------------------------------------------------------------ the real ECG


def test_mortara_rhythm_group_twelve_leads_in_mv(mortara_ecg) -> None:
    ecg = mortara_ecg
    assert ecg.leads == STANDARD_LEADS
    assert ecg.fs == 1000.0
    assert ecg.signals.shape == (12, 10000)
    assert ecg.signals.dtype == np.float32
    assert ecg.duration_s == pytest.approx(10.0)
    assert ecg.units == "mV" and ecg.source_format == "dicom"
    peaks = np.abs(ecg.signals).max(axis=1)
    assert np.all(peaks > 0.2) and np.all(peaks < 10.0), peaks
    assert ecg.flags == ()


def test_mortara_values_are_sensitivity_scaled_uv_converted_to_mv(mortara: Dataset, mortara_ecg) -> None:
    rhythm = _group(mortara, "RHYTHM")
    raw = _raw(rhythm)
    column = _column_of(rhythm, "V5")
    sensitivity = float(rhythm.ChannelDefinitionSequence[column].ChannelSensitivity)
    np.testing.assert_allclose(mortara_ecg.lead("V5"), raw[:, column] * sensitivity / 1000.0, atol=1e-6)


def test_mortara_identifiers(mortara_ecg) -> None:
    patient, study = mortara_ecg.patient, mortara_ecg.study
    assert patient.id == "642341"
    assert patient.name == "Anonymous"
    assert patient.birth_date == "1971-01-23"
    assert patient.sex == "female"
    assert study.sop_class_uid == SOP_12_LEAD_ECG
    assert study.sop_instance_uid == "1.3.6.1.4.1.20029.40.20130125105919.5407.1.1"
    assert study.study_instance_uid == "1.3.76.13.65829.2.20130125082826.1072139.2"
    assert study.series_instance_uid == "1.3.6.1.4.1.20029.40.20130125105919.5407.1"
    assert study.accession_number == "03028041970546"
    assert study.acquired_at == datetime(2013, 1, 25, 10, 59, 19)
    assert study.acquired_at.tzinfo is None
    assert study.device == "Mortara Instrument, Inc. el250"


def test_rhythm_chosen_by_label_not_position(mortara: Dataset, mortara_ecg) -> None:
    mortara.WaveformSequence = list(reversed(mortara.WaveformSequence))
    assert mortara.WaveformSequence[0].MultiplexGroupLabel == "MEDIAN BEAT"
    np.testing.assert_array_equal(to_ecg(mortara).signals, mortara_ecg.signals)


def test_unlabelled_groups_longest_non_beat_wins(mortara: Dataset, mortara_ecg) -> None:
    del mortara.WaveformSequence[0].MultiplexGroupLabel
    ecg = to_ecg(mortara)
    assert ecg.signals.shape == (12, 10000)
    assert "multiplex_group:1" in ecg.flags


def test_median_beat_exposed_separately(mortara: Dataset) -> None:
    beat = median_beat(mortara)
    assert beat is not None
    assert beat.signals.shape == (12, 1200)
    assert beat.leads == STANDARD_LEADS
    assert "multiplex_group:MEDIAN BEAT" in beat.flags


def test_median_beat_none_without_beat_group(mortara: Dataset) -> None:
    del mortara.WaveformSequence[1]
    assert median_beat(mortara) is None


def test_median_only_is_refused_with_a_clear_message(mortara: Dataset) -> None:
    del mortara.WaveformSequence[0]
    with pytest.raises(WaveformError, match="only a median beat, no rhythm"):
        to_ecg(mortara)
    assert median_beat(mortara) is not None


# ---------------------------------------------------------- leads by code, not position


def test_shuffled_channels_give_the_same_lead_signals(mortara: Dataset, mortara_ecg) -> None:
    rhythm = _group(mortara, "RHYTHM")
    order = list(np.random.default_rng(7).permutation(12))
    assert order != list(range(12))
    _set_columns(rhythm, order)
    shuffled = to_ecg(mortara)
    assert shuffled.leads == STANDARD_LEADS
    for lead in STANDARD_LEADS:
        np.testing.assert_array_equal(shuffled.lead(lead), mortara_ecg.lead(lead))


def test_swapped_definitions_follow_the_codes(mortara: Dataset, mortara_ecg) -> None:
    """Swap the definitions of V1 and V6 but not the data: the names must follow the codes."""
    rhythm = _group(mortara, "RHYTHM")
    seq = rhythm.ChannelDefinitionSequence
    v1, v6 = _column_of(rhythm, "V1"), _column_of(rhythm, "V6")
    seq[v1], seq[v6] = seq[v6], seq[v1]
    ecg = to_ecg(mortara)
    np.testing.assert_array_equal(ecg.lead("V1"), mortara_ecg.lead("V6"))
    np.testing.assert_array_equal(ecg.lead("V6"), mortara_ecg.lead("V1"))


@pytest.mark.parametrize("style", ["mdc_colon", "mdc_numeric", "meaning_only"])
def test_mdc_codes_and_code_meanings_identify_leads(mortara: Dataset, mortara_ecg, style: str) -> None:
    colon = {lead: code for code, lead in MDC_LEAD_CODES.items() if ":" in code}
    numeric = {lead: code for code, lead in MDC_LEAD_CODES.items() if ":" not in code}
    for channel in _group(mortara, "RHYTHM").ChannelDefinitionSequence:
        source = channel.ChannelSourceSequence[0]
        lead = SCPECG_LEAD_CODES[source.CodeValue]
        if style == "meaning_only":
            source.CodeValue, source.CodingSchemeDesignator = "X-LOCAL", "99LOCAL"
            source.CodeMeaning = f"LEAD {lead.upper()}"  # case-insensitive match
        else:
            source.CodingSchemeDesignator = "MDC"
            source.CodeValue = (colon if style == "mdc_colon" else numeric)[lead]
    np.testing.assert_array_equal(to_ecg(mortara).signals, mortara_ecg.signals)


def test_unknown_extra_channel_is_dropped_and_flagged(mortara: Dataset, mortara_ecg) -> None:
    rhythm = _group(mortara, "RHYTHM")
    extra = copy.deepcopy(rhythm.ChannelDefinitionSequence[0])
    extra.ChannelSourceSequence[0].CodeValue = "5.6.3-9-99"
    extra.ChannelSourceSequence[0].CodeMeaning = "Respiration, impedance"
    _set_columns(rhythm, list(range(12)), extra=np.full(10000, 123), extra_channel=extra)
    ecg = to_ecg(mortara)
    assert ecg.leads == STANDARD_LEADS
    np.testing.assert_array_equal(ecg.signals, mortara_ecg.signals)
    assert "dropped_channels:Respiration impedance" in ecg.flags


def test_duplicate_lead_is_refused(mortara: Dataset) -> None:
    rhythm = _group(mortara, "RHYTHM")
    rhythm.ChannelDefinitionSequence[_column_of(rhythm, "V2")].ChannelSourceSequence[0].CodeValue = "5.6.3-9-3"
    with pytest.raises(WaveformError, match="lead V1 appears twice"):
        to_ecg(mortara)


# ------------------------------------------------------------ derived and missing leads


def test_eight_lead_file_derives_limb_leads(mortara: Dataset, mortara_ecg) -> None:
    rhythm = _group(mortara, "RHYTHM")
    _set_columns(rhythm, [_column_of(rhythm, lead) for lead in EIGHT])
    ecg = to_ecg(mortara)
    assert ecg.leads == STANDARD_LEADS
    assert "derived_leads:III,aVR,aVL,aVF" in ecg.flags
    assert not any(f.startswith("missing_leads") for f in ecg.flags)
    i, ii = mortara_ecg.lead("I").astype(np.float64), mortara_ecg.lead("II").astype(np.float64)
    np.testing.assert_allclose(ecg.lead("III"), ii - i, atol=1e-6)
    np.testing.assert_allclose(ecg.lead("aVR"), -(i + ii) / 2, atol=1e-6)
    np.testing.assert_allclose(ecg.lead("aVL"), i - ii / 2, atol=1e-6)
    np.testing.assert_allclose(ecg.lead("aVF"), ii - i / 2, atol=1e-6)
    # The cart's own limb leads agree with the derivation to within one LSB (1.25 uV).
    for lead in ("III", "aVR", "aVL", "aVF"):
        np.testing.assert_allclose(ecg.lead(lead), mortara_ecg.lead(lead), atol=0.00126)


def test_missing_leads_kept_and_flagged(mortara: Dataset, mortara_ecg) -> None:
    rhythm = _group(mortara, "RHYTHM")
    keep = [i for i in range(12) if lead_for_channel(rhythm.ChannelDefinitionSequence[i]) not in ("V3", "V4")]
    _set_columns(rhythm, keep)
    ecg = to_ecg(mortara)
    assert ecg.leads == tuple(lead for lead in STANDARD_LEADS if lead not in ("V3", "V4"))
    assert "missing_leads:V3,V4" in ecg.flags
    np.testing.assert_array_equal(ecg.lead("V5"), mortara_ecg.lead("V5"))


def test_fewer_than_two_leads_is_refused(mortara: Dataset) -> None:
    rhythm = _group(mortara, "RHYTHM")
    _set_columns(rhythm, [_column_of(rhythm, "V1")])
    with pytest.raises(WaveformError, match="fewer than 2 usable ECG leads"):
        to_ecg(mortara)


def test_standardise_leads_orders_and_casts() -> None:
    signals, leads, flags = standardise_leads({"V2": np.ones(5), "V1": np.zeros(5)})
    assert leads == ("V1", "V2")
    assert signals.dtype == np.float32
    assert flags == ("missing_leads:I,II,III,aVR,aVL,aVF,V3,V4,V5,V6",)


# ------------------------------------------------------------------------ units


def _set_units(group: Dataset, code: str | None, meaning: str, scale: float) -> None:
    for channel in group.ChannelDefinitionSequence:
        channel.ChannelSensitivity = float(channel.ChannelSensitivity) * scale
        if code is None:
            del channel.ChannelSensitivityUnitsSequence
        else:
            unit = channel.ChannelSensitivityUnitsSequence[0]
            unit.CodeValue, unit.CodeMeaning = code, meaning


@pytest.mark.parametrize(
    ("code", "meaning", "scale"),
    [("mV", "millivolt", 1e-3), ("V", "volt", 1e-6), ("uV", "microvolt", 1.0), ("LOCAL", "Millivolt", 1e-3)],
)
def test_units_are_converted_to_mv(mortara: Dataset, mortara_ecg, code: str, meaning: str, scale: float) -> None:
    _set_units(_group(mortara, "RHYTHM"), code, meaning, scale)
    ecg = to_ecg(mortara)
    np.testing.assert_allclose(ecg.signals, mortara_ecg.signals, rtol=1e-5, atol=1e-7)
    assert ecg.flags == ()


def test_missing_units_assume_uv_and_say_so(mortara: Dataset, mortara_ecg) -> None:
    _set_units(_group(mortara, "RHYTHM"), None, "", 1.0)
    ecg = to_ecg(mortara)
    np.testing.assert_allclose(ecg.signals, mortara_ecg.signals, atol=1e-7)
    assert "units_assumed:uV" in ecg.flags


def test_non_voltage_units_are_refused(mortara: Dataset) -> None:
    _set_units(_group(mortara, "RHYTHM"), "mm[Hg]", "millimeter of mercury", 1.0)
    with pytest.raises(WaveformError, match="not a voltage unit"):
        to_ecg(mortara)


def test_nan_after_scaling_is_refused(mortara: Dataset) -> None:
    rhythm = _group(mortara, "RHYTHM")
    rhythm.ChannelDefinitionSequence[_column_of(rhythm, "V4")].ChannelSensitivity = "NaN"
    with pytest.raises(WaveformError, match="lead V4: .* NaN or infinite"):
        to_ecg(mortara)


# --------------------------------------------------------------- consistency checks


def test_truncated_waveform_data_names_the_byte_counts(mortara: Dataset) -> None:
    rhythm = _group(mortara, "RHYTHM")
    rhythm.WaveformData = rhythm.WaveformData[:120000]
    with pytest.raises(WaveformError) as info:
        to_ecg(mortara)
    message = str(info.value)
    assert "truncated" in message
    assert "expected 240000 bytes" in message and "got 120000" in message


def test_extra_waveform_bytes_are_refused(mortara: Dataset) -> None:
    rhythm = _group(mortara, "RHYTHM")
    rhythm.WaveformData = rhythm.WaveformData + b"\x00" * 24
    with pytest.raises(WaveformError, match="longer than declared: expected 240000 bytes"):
        to_ecg(mortara)


def test_channel_count_must_match_definitions(mortara: Dataset) -> None:
    _group(mortara, "RHYTHM").NumberOfWaveformChannels = 11
    with pytest.raises(WaveformError, match="NumberOfWaveformChannels is 11"):
        to_ecg(mortara)


@pytest.mark.parametrize("value", ["0", "-500"])
def test_sampling_frequency_must_be_positive(mortara: Dataset, value: str) -> None:
    _group(mortara, "RHYTHM").SamplingFrequency = value
    with pytest.raises(WaveformError, match="SamplingFrequency must be > 0"):
        to_ecg(mortara)


def test_missing_sampling_frequency_is_named(mortara: Dataset) -> None:
    del _group(mortara, "RHYTHM").SamplingFrequency
    with pytest.raises(WaveformError, match="missing SamplingFrequency"):
        to_ecg(mortara)


def test_no_waveform_sequence(mortara: Dataset) -> None:
    del mortara.WaveformSequence
    with pytest.raises(WaveformError, match="WaveformSequence"):
        to_ecg(mortara)


def test_wrong_sop_class_is_unsupported(mortara: Dataset) -> None:
    mortara.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    with pytest.raises(UnsupportedInputError, match="1.2.840.10008.5.1.4.1.1.2"):
        to_ecg(mortara)
    with pytest.raises(UnsupportedInputError):
        validate_for_storage(mortara)


def test_validate_for_storage_accepts_a_good_file(mortara: Dataset) -> None:
    assert validate_for_storage(mortara) is None


# ------------------------------------------------------------------ decoding bytes


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, b"\x00" * 128 + b"DICM" + b"\xff" * 40])
def test_garbage_bytes_are_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        read_bytes(data)


def test_file_cut_mid_sequence_is_a_decode_error(mortara_bytes: bytes) -> None:
    with pytest.raises(DecodeError, match="truncated"):
        read_bytes(mortara_bytes[: len(mortara_bytes) // 2])


def test_bare_dataset_needs_force(mortara_bytes: bytes) -> None:
    """A data set without preamble and file meta (as some senders store it)."""
    group_length = int.from_bytes(mortara_bytes[140:144], "little")  # (0002,0000) UL value
    bare = mortara_bytes[144 + group_length :]
    assert bare[:2] == b"\x08\x00"  # starts at group 0008
    with pytest.raises(DecodeError, match="DICM"):
        read_bytes(bare)
    assert to_ecg(read_bytes(bare, force=True)).leads == STANDARD_LEADS


# ------------------------------------------------------------- patient and study


def test_missing_patient_id_is_flagged_not_refused(mortara: Dataset) -> None:
    del mortara.PatientID
    ecg = to_ecg(mortara)
    assert ecg.patient.id is None
    assert "no_patient_id" in ecg.flags


def test_empty_patient_id_is_flagged(mortara: Dataset) -> None:
    mortara.PatientID = ""
    assert "no_patient_id" in to_ecg(mortara).flags


@pytest.mark.parametrize(
    ("code", "sex"), [("M", "male"), ("F", "female"), ("O", "other"), ("", "unknown"), (None, "unknown")]
)
def test_patient_sex_mapping(mortara: Dataset, code: str | None, sex: str) -> None:
    if code is None:
        del mortara.PatientSex
    else:
        mortara.PatientSex = code
    assert to_ecg(mortara).patient.sex == sex


def test_timezone_offset_makes_an_aware_datetime(mortara: Dataset) -> None:
    mortara.TimezoneOffsetFromUTC = "+0100"
    when = to_ecg(mortara).study.acquired_at
    assert when == datetime(2013, 1, 25, 10, 59, 19, tzinfo=timezone(timedelta(hours=1)))


def test_content_date_time_when_no_acquisition_datetime(mortara: Dataset) -> None:
    del mortara.AcquisitionDateTime
    mortara.ContentTime = "081500.25"
    mortara.TimezoneOffsetFromUTC = "-0500"
    when = to_ecg(mortara).study.acquired_at
    assert when == datetime(2013, 1, 25, 8, 15, 0, 250000, tzinfo=timezone(timedelta(hours=-5)))


def test_bad_birth_date_is_dropped_and_flagged(mortara: Dataset) -> None:
    mortara.PatientBirthDate = "19711399"
    ecg = to_ecg(mortara)
    assert ecg.patient.birth_date is None
    assert "invalid_birth_date" in ecg.flags


# ---------------------------------------------------------- the order it was recorded for
# Why: the HL7 ORU and the FHIR report name the order (ORC/OBR placer and filler numbers) only
# when the reader finds the numbers; a cart fed by a modality worklist puts them in the
# Request Attributes Sequence, others at the top level. Each case is written to a real file.

PLACER = "PlacerOrderNumberImagingServiceRequest"
FILLER = "FillerOrderNumberImagingServiceRequest"


def _request(**numbers: str) -> Dataset:
    """One Request Attributes / Referenced Request item holding ``numbers`` (keyword -> value)."""
    item = Dataset()
    item.RequestedProcedureID = "RP-1"
    for keyword, value in numbers.items():
        setattr(item, keyword, value)
    return item


def _written(ds: Dataset) -> Dataset:
    """``ds`` through a DICOM file and back: the attributes as a cart sends them, not Python objects."""
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return read_bytes(out.getvalue())


def _orders(ds: Dataset) -> tuple[str | None, str | None]:
    study = to_ecg(_written(ds)).study
    return study.placer_order_number, study.filler_order_number


def test_order_numbers_none_in_the_mortara_file(mortara: Dataset) -> None:
    assert _orders(mortara) == (None, None)
    assert to_ecg(mortara).study.accession_number == "03028041970546"  # kept apart, never taken for the placer


def test_order_numbers_at_the_top_level(mortara: Dataset) -> None:
    setattr(mortara, PLACER, "PLC-1001")
    setattr(mortara, FILLER, "FIL-2002")
    assert _orders(mortara) == ("PLC-1001", "FIL-2002")


def test_order_numbers_in_the_request_attributes_sequence(mortara: Dataset) -> None:
    mortara.RequestAttributesSequence = [_request(**{PLACER: "PLC-3003", FILLER: "FIL-4004"})]
    assert _orders(mortara) == ("PLC-3003", "FIL-4004")


def test_order_numbers_from_the_first_request_item_that_has_one(mortara: Dataset) -> None:
    mortara.RequestAttributesSequence = [
        _request(),
        _request(**{PLACER: "PLC-5005"}),
        _request(**{PLACER: "PLC-6006", FILLER: "FIL-6006"}),
    ]
    assert _orders(mortara) == ("PLC-5005", "FIL-6006")


def test_order_numbers_in_the_referenced_request_sequence(mortara: Dataset) -> None:
    mortara.ReferencedRequestSequence = [_request(**{PLACER: "PLC-7007", FILLER: "FIL-8008"})]
    assert _orders(mortara) == ("PLC-7007", "FIL-8008")


def test_order_numbers_top_level_first_and_an_empty_one_falls_through(mortara: Dataset) -> None:
    setattr(mortara, PLACER, "PLC-TOP")
    setattr(mortara, FILLER, "")
    mortara.RequestAttributesSequence = [_request(**{PLACER: "PLC-SEQ", FILLER: "FIL-SEQ"})]
    assert _orders(mortara) == ("PLC-TOP", "FIL-SEQ")


def test_order_numbers_padded_are_trimmed_and_blank_are_none(mortara: Dataset) -> None:
    setattr(mortara, PLACER, " PLC-9009 ")
    mortara.RequestAttributesSequence = [_request(**{FILLER: "   "})]
    assert _orders(mortara) == ("PLC-9009", None)


# ---------------------------------------------------------- the committed fixtures


def _fixture(name: str) -> Dataset:
    return read_bytes((FIXTURES / name).read_bytes())


@pytest.mark.parametrize(
    "name",
    [
        "ptbxl_00024_norm_12lead.dcm",
        "ptbxl_00622_mi_12lead.dcm",
        "ptbxl_00730_cd_12lead.dcm",
        "cinc2021_E07506_12lead.dcm",
    ],
)
def test_fixture_12lead_files_read(name: str) -> None:
    ecg = to_ecg(_fixture(name))
    assert ecg.leads == STANDARD_LEADS
    assert ecg.fs == 500.0 and ecg.signals.shape == (12, 5000)
    assert ecg.flags == ()
    assert ecg.patient.id


def test_fixture_variants_behave_as_documented() -> None:
    eight = to_ecg(_fixture("cinc2021_E07506_8lead.dcm"))
    assert "derived_leads:III,aVR,aVL,aVF" in eight.flags
    with pytest.raises(WaveformError, match="only a median beat"):
        to_ecg(_fixture("cinc2021_E07506_median_only.dcm"))
    beat = median_beat(_fixture("cinc2021_E07506_median_only.dcm"))
    assert beat is not None and beat.signals.shape == (12, 600)
    assert "no_patient_id" in to_ecg(_fixture("cinc2021_E07506_no_patient_id.dcm")).flags
    with pytest.raises(WaveformError, match="expected 120000 bytes .* got 24000"):
        to_ecg(_fixture("cinc2021_E07506_truncated.dcm"))
    with pytest.raises(DecodeError):
        _fixture("cinc2021_E07506_cut.dcm")
    aware = to_ecg(_fixture("cinc2021_E07506_12lead.dcm")).study.acquired_at
    assert aware == datetime(2021, 1, 1, 9, 30, tzinfo=UTC)
