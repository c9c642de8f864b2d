"""Tests for tests.support.dicom_writer (why: fixtures and benchmarks rely on its output
being standard-shaped and on writer -> bytes -> reader reproducing the signal)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ecgbridge.mapping.codes import SCPECG_LEAD_CODES, SOP_12_LEAD_ECG, SOP_GENERAL_ECG
from ecgbridge.mapping.dicom_waveform import median_beat, read_bytes, to_ecg
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study
from tests.support.dicom_writer import crude_median_beat, dataset_to_bytes, ecg_to_dataset


@pytest.fixture(scope="module")
def mortara_ecg() -> Ecg:
    return to_ecg(read_bytes(open(get_testdata_file("waveform_ecg.dcm"), "rb").read()))


def _round_trip(ds: Dataset) -> Ecg:
    return to_ecg(read_bytes(dataset_to_bytes(ds)))


def test_round_trip_reproduces_signals_within_one_lsb(mortara_ecg: Ecg) -> None:
    back = _round_trip(ecg_to_dataset(mortara_ecg))
    assert back.leads == mortara_ecg.leads
    assert back.fs == mortara_ecg.fs
    np.testing.assert_allclose(back.signals, mortara_ecg.signals, atol=0.001)  # 1 LSB = 1 uV
    assert back.patient == mortara_ecg.patient
    assert back.study == mortara_ecg.study
    assert back.flags == ()


@pytest.mark.parametrize(
    ("units", "sensitivity", "lsb_mv"), [("mV", 0.005, 0.005), ("uV", 2.5, 0.0025), ("V", 1e-5, 0.01)]
)
def test_round_trip_in_other_units(mortara_ecg: Ecg, units: str, sensitivity: float, lsb_mv: float) -> None:
    ds = ecg_to_dataset(mortara_ecg, units=units, sensitivity=sensitivity)
    channel = ds.WaveformSequence[0].ChannelDefinitionSequence[0]
    assert channel.ChannelSensitivityUnitsSequence[0].CodeValue == units
    back = _round_trip(ds)
    np.testing.assert_allclose(back.signals, mortara_ecg.signals, atol=lsb_mv * 0.5 + 1e-6)


def test_structure_of_the_written_object(mortara_ecg: Ecg) -> None:
    ds = read_bytes(dataset_to_bytes(ecg_to_dataset(mortara_ecg)))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == SOP_12_LEAD_ECG == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "ECG"
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "ContentDate",
        "ContentTime",
        "AcquisitionDateTime",
        "PatientID",
        "PatientSex",
        "InstanceNumber",
    ):
        assert keyword in ds, keyword
    assert len(ds.WaveformSequence) == 1
    group = ds.WaveformSequence[0]
    assert group.MultiplexGroupLabel == "RHYTHM"
    assert group.WaveformOriginality == "ORIGINAL"
    assert group.NumberOfWaveformChannels == 12
    assert group.NumberOfWaveformSamples == 10000
    assert float(group.SamplingFrequency) == 1000.0
    assert group.WaveformBitsAllocated == 16 and group.WaveformSampleInterpretation == "SS"
    assert len(group.WaveformData) == 12 * 10000 * 2
    for lead, channel in zip(STANDARD_LEADS, group.ChannelDefinitionSequence):
        source = channel.ChannelSourceSequence[0]
        assert source.CodingSchemeDesignator == "SCPECG"
        assert SCPECG_LEAD_CODES[source.CodeValue] == lead
        assert source.CodeMeaning == f"Lead {lead}"
        unit = channel.ChannelSensitivityUnitsSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("uV", "UCUM")
        assert float(channel.ChannelSensitivityCorrectionFactor) == 1.0
        assert float(channel.ChannelBaseline) == 0.0
        assert channel.WaveformBitsStored == 16


def test_waveform_data_is_interleaved_little_endian_int16(mortara_ecg: Ecg) -> None:
    group = ecg_to_dataset(mortara_ecg).WaveformSequence[0]
    raw = np.frombuffer(group.WaveformData, dtype="<i2").reshape(10000, 12)
    np.testing.assert_array_equal(raw[:, 1], np.rint(mortara_ecg.lead("II").astype(np.float64) * 1000))
    np.testing.assert_array_equal(raw[:, 11], np.rint(mortara_ecg.lead("V6").astype(np.float64) * 1000))


def test_values_beyond_int16_are_clipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    signals = np.zeros((2, 400), dtype=np.float32)
    signals[0, 10], signals[1, 20] = 40.0, -50.0  # mV: beyond +-32.767 mV at 1 uV/LSB
    ecg = Ecg(signals=signals, leads=("I", "II"), fs=400.0)
    with caplog.at_level(logging.WARNING, logger="tests.support.dicom_writer"):
        ds = ecg_to_dataset(ecg)
    raw = np.frombuffer(ds.WaveformSequence[0].WaveformData, dtype="<i2").reshape(400, 2)
    assert raw[10, 0] == 32767 and raw[20, 1] == -32768
    assert "2 samples clipped" in caplog.text


def test_lead_subset_reads_back_with_derived_leads(mortara_ecg: Ecg) -> None:
    eight = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    ds = ecg_to_dataset(mortara_ecg, leads=eight)
    assert ds.WaveformSequence[0].NumberOfWaveformChannels == 8
    back = _round_trip(ds)
    assert back.leads == STANDARD_LEADS
    assert "derived_leads:III,aVR,aVL,aVF" in back.flags
    np.testing.assert_allclose(back.lead("V3"), mortara_ecg.lead("V3"), atol=0.001)


def test_include_median_adds_a_median_beat_group(mortara_ecg: Ecg) -> None:
    ds = read_bytes(dataset_to_bytes(ecg_to_dataset(mortara_ecg, include_median=True)))
    labels = [g.MultiplexGroupLabel for g in ds.WaveformSequence]
    assert labels == ["RHYTHM", "MEDIAN BEAT"]
    assert ds.WaveformSequence[1].WaveformOriginality == "DERIVED"
    assert to_ecg(ds).signals.shape == (12, 10000)  # the rhythm is still what to_ecg reads
    beat = median_beat(ds)
    assert beat is not None and beat.signals.shape == (12, 1200)
    # A median beat peaks where the cart's own median beat does, in amplitude terms.
    cart = median_beat(read_bytes(open(get_testdata_file("waveform_ecg.dcm"), "rb").read()))
    assert cart is not None
    ratio = np.abs(beat.lead("V5")).max() / np.abs(cart.lead("V5")).max()
    assert 0.7 < ratio < 1.3


def test_crude_median_beat_recovers_a_repeated_beat() -> None:
    fs = 500.0
    t = np.arange(int(0.8 * fs)) / fs
    beat = np.exp(-(((t - 0.3) / 0.01) ** 2))  # a narrow "QRS" at 0.3 s in each 0.8 s cycle
    signal = np.tile(beat, 12)[None, :] * np.array([[1.0], [-0.5]])
    median, trigger = crude_median_beat(signal, fs)
    assert median.shape == (2, 600)
    assert trigger == 250
    assert abs(int(np.argmax(median[0])) - trigger) <= 10
    assert median[0].max() == pytest.approx(1.0, abs=0.01)


def test_uids_generated_when_absent_and_kept_when_given(mortara_ecg: Ecg) -> None:
    bare = Ecg(signals=mortara_ecg.signals, leads=mortara_ecg.leads, fs=mortara_ecg.fs)
    a, b = ecg_to_dataset(bare), ecg_to_dataset(bare)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID != a.SeriesInstanceUID
    study = Study(sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3.5", series_instance_uid="1.2.3.6")
    c = ecg_to_dataset(bare, study=study)
    assert (c.SOPInstanceUID, c.StudyInstanceUID, c.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.5", "1.2.3.6")


def test_patient_and_study_overrides(mortara_ecg: Ecg) -> None:
    patient = Patient(id="X1", id_issuer="HOSP", name="Test^Person", birth_date="1950-02-03", sex="male")
    study = Study(
        accession_number="ACC9",
        acquired_at=datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2))),
        device="ACME Cart 3",
    )
    ds = ecg_to_dataset(mortara_ecg, patient=patient, study=study, sop_class_uid=SOP_GENERAL_ECG)
    assert ds.TimezoneOffsetFromUTC == "+0200"
    back = _round_trip(ds)
    assert back.patient == patient
    assert back.study.accession_number == "ACC9"
    assert back.study.device == "ACME Cart 3"
    assert back.study.sop_class_uid == SOP_GENERAL_ECG
    assert back.study.acquired_at == study.acquired_at
    assert back.study.acquired_at.utcoffset() == timedelta(hours=2)


def test_strict_iod_limits() -> None:
    ecg = Ecg(signals=np.zeros((12, 1000), dtype=np.float32), leads=STANDARD_LEADS, fs=100.0)
    with pytest.raises(ValueError, match="200-1000 Hz"):
        ecg_to_dataset(ecg)
    back = _round_trip(ecg_to_dataset(ecg, strict=False))
    assert back.fs == 100.0
    long = Ecg(signals=np.zeros((12, 20000), dtype=np.float32), leads=STANDARD_LEADS, fs=1000.0)
    with pytest.raises(ValueError, match="16384 samples"):
        ecg_to_dataset(long)
    ecg_to_dataset(long, sop_class_uid=SOP_GENERAL_ECG)  # no sample limit there


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leads": ("I", "X")}, "not standard leads"),
        ({"leads": ("I", "I")}, "listed twice"),
        ({"units": "mmHg"}, "units must be one of"),
        ({"sensitivity": 0.0}, "sensitivity must be a positive"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}, "not an ECG waveform storage SOP class"),
    ],
)
def test_invalid_arguments(mortara_ecg: Ecg, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ecg_to_dataset(mortara_ecg, **kwargs)


def test_lead_missing_from_the_ecg() -> None:
    ecg = Ecg(signals=np.zeros((2, 500), dtype=np.float32), leads=("I", "II"), fs=500.0)
    with pytest.raises(ValueError, match="ECG lacks leads V1"):
        ecg_to_dataset(ecg, leads=("I", "V1"))


def test_nan_signal_is_refused() -> None:
    signals = np.zeros((2, 500), dtype=np.float32)
    signals[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ecg_to_dataset(Ecg(signals=signals, leads=("I", "II"), fs=500.0))


def test_dataset_to_bytes_adds_meta_without_touching_the_input(mortara_ecg: Ecg) -> None:
    ds = ecg_to_dataset(mortara_ecg)
    plain = Dataset()
    plain.update(ds)
    data = dataset_to_bytes(plain)
    assert data[128:132] == b"DICM"
    assert "TransferSyntaxUID" not in getattr(plain, "file_meta", Dataset())
    np.testing.assert_allclose(to_ecg(read_bytes(data)).signals, mortara_ecg.signals, atol=0.001)
