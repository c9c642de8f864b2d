"""The canonical :class:`~mapping.ecg.Ecg` -> a DICOM ECG Waveform Storage object (test support).

Why it exists: fixtures, tests and benchmarks need real, standard-shaped DICOM ECGs
built from real records, and a reader is only trustworthy if a writer that follows the
same rules round-trips through it. Nothing in the product writes DICOM, so it lives
here, not in ``ecgbridge.mapping``. The object written has the Patient,
General Study, General Series, General Equipment, Waveform Identification, Waveform,
Acquisition Context and SOP Common modules; one RHYTHM multiplex group (and an
optional MEDIAN BEAT group); leads coded by SCPECG code and meaning; units in UCUM;
samples as interleaved little-endian int16, clipped to the int16 range.

``strict=True`` (the default) enforces the IOD content constraints that matter for a
waveform's shape (sampling frequency 200-1000 Hz for 12-lead and general ECG, 50-1000
Hz ambulatory; channel and sample counts). Note: a MEDIAN BEAT group next to a 12-lead
rhythm exceeds the 12-lead IOD's 13-channel total, as real carts (e.g. Mortara) do.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from ecgbridge.mapping.codes import (
    SCPECG_LEAD_CODES,
    SOP_12_LEAD_ECG,
    SOP_AMBULATORY_ECG,
    SOP_GENERAL_ECG,
)
from ecgbridge.mapping.ecg import Ecg, Patient, Study

__all__ = ["ecg_to_dataset", "dataset_to_bytes", "crude_median_beat", "LEAD_MEANINGS", "UNITS"]

log = logging.getLogger(__name__)

#: Lead name -> SCPECG code value (inverse of codes.SCPECG_LEAD_CODES).
_SCPECG_CODE_BY_LEAD: dict[str, str] = {lead: code for code, lead in SCPECG_LEAD_CODES.items()}

#: CID 3001 code meanings written for each lead.
LEAD_MEANINGS: dict[str, str] = {
    "I": "Lead I",
    "II": "Lead II",
    "III": "Lead III",
    "aVR": "Lead aVR",
    "aVL": "Lead aVL",
    "aVF": "Lead aVF",
    "V1": "Lead V1",
    "V2": "Lead V2",
    "V3": "Lead V3",
    "V4": "Lead V4",
    "V5": "Lead V5",
    "V6": "Lead V6",
}

#: Writable units: UCUM code -> (code meaning, units per mV).
UNITS: dict[str, tuple[str, float]] = {
    "uV": ("microvolt", 1000.0),
    "mV": ("millivolt", 1.0),
    "V": ("volt", 0.001),
}

#: SOP class -> (min Hz, max Hz, max channels per group, max samples per group or None).
_IOD_LIMITS: dict[str, tuple[float, float, int, int | None]] = {
    SOP_12_LEAD_ECG: (200.0, 1000.0, 13, 16384),
    SOP_GENERAL_ECG: (200.0, 1000.0, 24, None),
    SOP_AMBULATORY_ECG: (50.0, 1000.0, 12, None),
}

_SEX_CODES = {"male": "M", "female": "F", "other": "O"}
_INT16_MIN, _INT16_MAX = -32768, 32767


def ecg_to_dataset(
    ecg: Ecg,
    *,
    sop_class_uid: str = SOP_12_LEAD_ECG,
    include_median: bool = False,
    leads: Sequence[str] | None = None,
    units: str = "uV",
    sensitivity: float = 1.0,
    patient: Patient | None = None,
    study: Study | None = None,
    strict: bool = True,
) -> FileDataset:
    """Build an ECG Waveform Storage object from ``ecg``.

    ``leads`` picks and orders the channels written (default: all of ``ecg.leads``);
    ``units`` / ``sensitivity`` set the value of one LSB (default 1 uV, so +-32.767 mV
    fit); ``patient`` / ``study`` replace the ECG's own identifiers. UIDs the study
    lacks are generated; ``sop_class_uid`` wins over ``study.sop_class_uid``.
    Raises ValueError for inputs that cannot make a valid object.
    """
    patient = patient if patient is not None else ecg.patient
    study = study if study is not None else ecg.study
    chosen = tuple(leads) if leads is not None else tuple(ecg.leads)
    _check_inputs(ecg, chosen, units, sensitivity, sop_class_uid, strict)

    sensitivity_ds = DSfloat(sensitivity, auto_format=True)
    lsb_mv = float(sensitivity_ds) / UNITS[units][1]  # mV per stored integer
    signals = np.stack([ecg.lead(name) for name in chosen]).astype(np.float64)

    sop_instance_uid = study.sop_instance_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ECGBRIDGE"

    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid

    when = study.acquired_at or datetime.now(UTC).replace(microsecond=0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    if when.microsecond:
        time += f".{when.microsecond:06d}"
    ds.StudyDate = date
    ds.ContentDate = date
    ds.StudyTime = time
    ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        ds.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    ds.AccessionNumber = study.accession_number or ""
    ds.Modality = "ECG"
    ds.Manufacturer = study.device or ""
    ds.ReferringPhysicianName = ""

    # Patient module (type 2 attributes are present even when empty).
    ds.PatientName = patient.name or ""
    ds.PatientID = patient.id or ""
    if patient.id_issuer:
        ds.IssuerOfPatientID = patient.id_issuer
    ds.PatientBirthDate = (patient.birth_date or "").replace("-", "")
    ds.PatientSex = _SEX_CODES.get(patient.sex or "", "")

    ds.StudyInstanceUID = study.study_instance_uid or generate_uid()
    ds.StudyID = ""
    ds.SeriesInstanceUID = study.series_instance_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.AcquisitionContextSequence = DicomSequence([])

    groups = [_multiplex_group(signals, chosen, ecg.fs, "RHYTHM", "ORIGINAL", units, sensitivity_ds, lsb_mv)]
    if include_median:
        beat, trigger = crude_median_beat(signals, ecg.fs)
        median = _multiplex_group(beat, chosen, ecg.fs, "MEDIAN BEAT", "DERIVED", units, sensitivity_ds, lsb_mv)
        median.TriggerSamplePosition = trigger + 1  # 1-based, per the standard
        groups.append(median)
    ds.WaveformSequence = DicomSequence(groups)
    return ds


def dataset_to_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a DICOM file (preamble, file meta), as a store would receive it.

    A data set without file meta gets Explicit VR Little Endian meta on a shallow copy;
    the caller's object is not changed.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds = copy.copy(ds)
        new_meta = FileMetaDataset()
        new_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        new_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        new_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        new_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = new_meta
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def crude_median_beat(signals: np.ndarray, fs: float) -> tuple[np.ndarray, int]:
    """A representative beat: the sample-wise median of 1.2 s windows around each QRS.

    Crude on purpose (fixtures and tests, not measurement): QRS complexes are the peaks
    of the summed absolute slope; each window starts 0.5 s before one. Returns the beat
    (leads, samples) and the 0-based index of the QRS within it.
    """
    n_leads, n = signals.shape
    width = min(n, max(1, int(round(1.2 * fs))))
    pre = min(int(round(0.5 * fs)), width - 1)
    if n < 3:
        return signals[:, :width].copy(), 0
    from scipy.signal import find_peaks  # imported here: only writers need it

    slope = np.abs(np.diff(signals, axis=1)).sum(axis=0)
    height = 0.5 * float(np.percentile(slope, 99))
    peaks, _ = find_peaks(slope, height=height if height > 0 else None, distance=max(1, int(0.3 * fs)))
    starts = [p - pre for p in peaks if p - pre >= 0 and p - pre + width <= n]
    if not starts:
        return signals[:, :width].copy(), pre
    windows = np.stack([signals[:, s : s + width] for s in starts])
    return np.median(windows, axis=0), pre


# ------------------------------------------------------------------------ internals


def _check_inputs(
    ecg: Ecg,
    leads: tuple[str, ...],
    units: str,
    sensitivity: float,
    sop_class_uid: str,
    strict: bool,
) -> None:
    if not leads:
        raise ValueError("no leads to write")
    unknown = [name for name in leads if name not in _SCPECG_CODE_BY_LEAD]
    if unknown:
        raise ValueError(f"not standard leads (no SCPECG code): {', '.join(unknown)}")
    absent = [name for name in leads if name not in ecg.leads]
    if absent:
        raise ValueError(f"ECG lacks leads {', '.join(absent)}")
    if len(set(leads)) != len(leads):
        raise ValueError("a lead is listed twice")
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)} (got {units!r})")
    if not np.isfinite(sensitivity) or sensitivity <= 0:
        raise ValueError(f"sensitivity must be a positive number (got {sensitivity!r})")
    if not np.isfinite(ecg.signals).all():
        raise ValueError("ECG signals contain NaN or infinite values")
    if not np.isfinite(ecg.fs):
        raise ValueError("ECG sampling rate is not finite")
    limits = _IOD_LIMITS.get(sop_class_uid)
    if limits is None:
        raise ValueError(f"{sop_class_uid} is not an ECG waveform storage SOP class")
    if strict:
        low, high, max_channels, max_samples = limits
        n_samples = ecg.signals.shape[1]
        if not low <= ecg.fs <= high:
            raise ValueError(
                f"SOP class {sop_class_uid} requires SamplingFrequency {low:g}-{high:g} Hz "
                f"(got {ecg.fs:g}); resample first or pass strict=False"
            )
        if len(leads) > max_channels:
            raise ValueError(f"SOP class {sop_class_uid} allows at most {max_channels} channels")
        if max_samples is not None and n_samples > max_samples:
            raise ValueError(
                f"SOP class {sop_class_uid} allows at most {max_samples} samples per channel "
                f"(got {n_samples}); pass strict=False to write anyway"
            )


def _multiplex_group(
    signals: np.ndarray,
    leads: tuple[str, ...],
    fs: float,
    label: str,
    originality: str,
    units: str,
    sensitivity: DSfloat,
    lsb_mv: float,
) -> Dataset:
    raw = np.rint(signals / lsb_mv)
    clipped = int(np.count_nonzero((raw < _INT16_MIN) | (raw > _INT16_MAX)))
    if clipped:
        log.warning("%d samples clipped to the int16 range in the %s group", clipped, label)
    samples = np.clip(raw, _INT16_MIN, _INT16_MAX).astype("<i2")

    group = Dataset()
    group.MultiplexGroupTimeOffset = "0"
    group.WaveformOriginality = originality
    group.NumberOfWaveformChannels = len(leads)
    group.NumberOfWaveformSamples = int(signals.shape[1])
    group.SamplingFrequency = DSfloat(fs, auto_format=True)
    group.MultiplexGroupLabel = label
    group.ChannelDefinitionSequence = DicomSequence([_channel(name, units, sensitivity) for name in leads])
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    # Interleaved: sample 1 of every channel, then sample 2, ... (C1S1, C2S1, ...).
    group.WaveformData = np.ascontiguousarray(samples.T).tobytes()
    return group


def _channel(lead: str, units: str, sensitivity: DSfloat) -> Dataset:
    source = Dataset()
    source.CodeValue = _SCPECG_CODE_BY_LEAD[lead]
    source.CodingSchemeDesignator = "SCPECG"
    source.CodingSchemeVersion = "1.3"
    source.CodeMeaning = LEAD_MEANINGS[lead]

    unit = Dataset()
    unit.CodeValue = units
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodingSchemeVersion = "1.4"
    unit.CodeMeaning = UNITS[units][0]

    channel = Dataset()
    channel.ChannelLabel = lead
    channel.ChannelSourceSequence = DicomSequence([source])
    channel.ChannelSensitivity = sensitivity
    channel.ChannelSensitivityUnitsSequence = DicomSequence([unit])
    channel.ChannelSensitivityCorrectionFactor = "1"
    channel.ChannelBaseline = "0"
    channel.ChannelSampleSkew = "0"
    channel.WaveformBitsStored = 16
    return channel
