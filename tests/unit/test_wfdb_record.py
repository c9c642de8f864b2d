"""Tests for mapping.wfdb_record (why: training and fixtures read WFDB; it must meet the
same lead, unit and order rules as DICOM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgbridge.errors import WaveformError
from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg
from ecgbridge.mapping.ecg import STANDARD_LEADS
from ecgbridge.mapping.wfdb_record import lead_name, read_wfdb

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WFDB_DIR = FIXTURES / "wfdb"


def test_ptbxl_record_zscore_units_and_lead_names() -> None:
    ecg = read_wfdb(WFDB_DIR / "00024_lr")
    assert ecg.leads == STANDARD_LEADS  # header says AVR, AVL, AVF
    assert ecg.fs == 100.0
    assert ecg.signals.shape == (12, 1000) and ecg.signals.dtype == np.float32
    assert ecg.flags == ("record:00024_lr", "units:zscore")
    assert ecg.source_format == "wfdb" and ecg.units == "mV"
    assert ecg.study.sop_instance_uid is None and ecg.study.accession_number is None
    raw = wfdb.rdrecord(str(WFDB_DIR / "00024_lr"))
    np.testing.assert_allclose(ecg.lead("aVR"), raw.p_signal[:, raw.sig_name.index("AVR")], atol=1e-6)


def test_challenge_record_mv_and_sex_from_header() -> None:
    ecg = read_wfdb(WFDB_DIR / "E07506")
    assert ecg.leads == STANDARD_LEADS
    assert ecg.fs == 500.0
    assert ecg.signals.shape == (12, 5000)
    assert ecg.patient.sex == "female"
    assert ecg.patient.id is None
    assert ecg.flags == ("record:E07506",)
    raw = wfdb.rdrecord(str(WFDB_DIR / "E07506"))
    np.testing.assert_allclose(ecg.signals, raw.p_signal.T, atol=1e-6)


@pytest.mark.parametrize("suffix", ["", ".hea", ".mat"])
def test_path_with_or_without_extension(suffix: str) -> None:
    assert read_wfdb(str(WFDB_DIR / f"E07506{suffix}")).fs == 500.0


def test_missing_header() -> None:
    with pytest.raises(FileNotFoundError):
        read_wfdb(WFDB_DIR / "no_such_record")


@pytest.mark.parametrize(
    ("raw", "lead"), [("AVR", "aVR"), ("avl", "aVL"), ("i", "I"), ("V6", "V6"), ("Lead II", "II"), ("MLII", None)]
)
def test_lead_name(raw: str, lead: str | None) -> None:
    assert lead_name(raw) == lead


def _write(tmp_path: Path, name: str, names: list[str], units: list[str], signal: np.ndarray, fs: int = 500) -> Path:
    wfdb.wrsamp(
        name, fs=fs, units=units, sig_name=names, p_signal=signal, fmt=["16"] * len(names), write_dir=str(tmp_path)
    )
    return tmp_path / name


def test_uv_converted_unknown_dropped_limb_leads_derived(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    signal = np.round(rng.normal(0, 300, size=(1000, 4)), 0)  # uV
    base = _write(tmp_path, "rec1", ["i", "II", "v1", "RESP"], ["uV", "uV", "uV", "Ohm"], signal)
    ecg = read_wfdb(base)
    assert ecg.leads == ("I", "II", "III", "aVR", "aVL", "aVF", "V1")
    np.testing.assert_allclose(ecg.lead("I"), signal[:, 0] / 1000, atol=5e-5)  # wfdb ADC rounding
    np.testing.assert_allclose(ecg.lead("III"), (signal[:, 1] - signal[:, 0]) / 1000, atol=1e-4)
    assert "dropped_channels:RESP" in ecg.flags
    assert "derived_leads:III,aVR,aVL,aVF" in ecg.flags
    assert "missing_leads:V2,V3,V4,V5,V6" in ecg.flags
    assert ecg.patient.sex is None


def test_non_voltage_units_on_a_lead_are_refused(tmp_path: Path) -> None:
    base = _write(tmp_path, "rec2", ["I", "II"], ["mV", "mmHg"], np.zeros((100, 2)))
    with pytest.raises(WaveformError, match="lead II units 'mmHg'"):
        read_wfdb(base)


def test_duplicate_leads_are_refused(tmp_path: Path) -> None:
    base = _write(tmp_path, "rec3", ["I", "i"], ["mV", "mV"], np.zeros((100, 2)))
    with pytest.raises(WaveformError, match="appears twice"):
        read_wfdb(base)


def test_invalid_samples_are_refused(tmp_path: Path) -> None:
    signal = np.zeros((100, 2))
    signal[5, 1] = np.nan
    base = _write(tmp_path, "rec4", ["I", "II"], ["mV", "mV"], signal)
    with pytest.raises(WaveformError, match="lead II has 1 NaN"):
        read_wfdb(base)


# ------------------------------------------- the DICOM fixtures carry these records


def test_ptbxl_dicom_fixture_matches_its_wfdb_source() -> None:
    """The DICOM copy is the z-scored record upsampled x5 and carried as if mV."""
    dicom = to_ecg(read_bytes((FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()))
    source = read_wfdb(WFDB_DIR / "00024_lr")
    assert dicom.fs == source.fs * 5
    np.testing.assert_allclose(dicom.signals[:, ::5], source.signals, atol=0.01)


def test_challenge_dicom_fixture_matches_its_wfdb_source() -> None:
    dicom = to_ecg(read_bytes((FIXTURES / "dicom" / "cinc2021_E07506_12lead.dcm").read_bytes()))
    source = read_wfdb(WFDB_DIR / "E07506")
    assert dicom.patient.sex == source.patient.sex == "female"
    np.testing.assert_allclose(dicom.signals, source.signals, atol=0.0005 + 1e-6)
