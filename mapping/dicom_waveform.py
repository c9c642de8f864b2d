"""DICOM ECG waveform (Supplement 30) -> the canonical :class:`~mapping.ecg.Ecg`.

Why this module is strict: a model fed the wrong lead, the wrong units or a median
beat instead of a rhythm strip gives a confident wrong answer. So the reader

* picks the multiplex group by ``MultiplexGroupLabel`` ("RHYTHM" first), never
  ``WaveformSequence[0]``;
* names every channel from its ``ChannelSourceSequence`` code (SCPECG, MDC, then the
  code meaning), never from its position;
* applies sensitivity, correction factor and baseline (pydicom's ``waveform_array``)
  and converts ``ChannelSensitivityUnitsSequence`` units to mV;
* checks the declared sizes against the bytes before decoding them;
* records every judgement call it makes in ``Ecg.flags`` (derived or missing leads,
  dropped channels, assumed units, no patient id).

Errors are :mod:`ecgbridge.errors` input errors whose messages name what is wrong and
never carry patient data (patient-derived detail, if any, goes to ``detail``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import DT

from ecgbridge.errors import DecodeError, InputError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.codes import (
    ECG_STORAGE_SOP_CLASSES,
    LEAD_BY_MEANING,
    MDC_LEAD_CODES,
    SCPECG_LEAD_CODES,
)
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study

__all__ = [
    "read_bytes",
    "parse_dicom_dt",
    "to_ecg",
    "median_beat",
    "validate_for_storage",
    "lead_for_channel",
    "standardise_leads",
    "DERIVABLE_LEADS",
]

#: Limb leads computed from I and II when a file lacks them (Einthoven / Goldberger).
DERIVABLE_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")

_UNDEFINED_LENGTH = 0xFFFFFFFF
_RHYTHM = "RHYTHM"
#: Words in a MultiplexGroupLabel that mark a representative beat, not a rhythm strip.
_BEAT_WORDS = ("MEDIAN", "REPRESENTATIVE", "AVERAGE", "TEMPLATE")

#: (bits allocated, sample interpretation) pairs pydicom's waveform handler decodes.
_SUPPORTED_SAMPLE_FORMATS = {
    (8, "SB"),
    (8, "UB"),
    (8, "MB"),
    (8, "AB"),
    (16, "SS"),
    (16, "US"),
    (32, "SL"),
    (32, "UL"),
    (64, "SV"),
    (64, "UV"),
}

#: UCUM unit codes (case-sensitive, as UCUM is) -> factor to mV.
_UCUM_TO_MV: dict[str, float] = {
    "nV": 1e-6,
    "uV": 1e-3,
    "\u00b5V": 1e-3,
    "\u03bcV": 1e-3,
    "mV": 1.0,
    "V": 1e3,
}
#: Code meanings (case-insensitive) -> factor to mV, for senders with odd code values.
_MEANING_TO_MV: dict[str, float] = {
    "nanovolt": 1e-6,
    "microvolt": 1e-3,
    "millivolt": 1.0,
    "volt": 1e3,
}


# --------------------------------------------------------------------------- decoding


def read_bytes(data: bytes, *, force: bool = False) -> Dataset:
    """Decode a DICOM file's bytes, turning every decoder failure into DecodeError.

    pydicom reads a value cut short by the end of the file without complaint, so every
    element's length is checked here (sequences included): a corrupt object then fails
    at the boundary (answered 0xC210), not as a puzzling waveform error in the worker.
    ``force=True`` also accepts a bare data set without preamble and file meta.
    """
    if not data:
        raise DecodeError("empty input: 0 bytes is not a DICOM object")
    try:
        ds = pydicom.dcmread(BytesIO(data), force=force)
        _check_element_lengths(ds)
    except DecodeError:
        raise
    except InvalidDicomError as exc:
        raise DecodeError(
            f"not a DICOM file: no 'DICM' prefix at byte 128 or invalid file meta ({len(data)} bytes read)",
            detail=str(exc),
        ) from exc
    except (OSError, EOFError, struct.error) as exc:
        # pydicom's structural messages ("No tag to read at file position ...") carry
        # offsets only, never values, so they are safe to show.
        raise DecodeError(f"DICOM object is truncated or corrupt: {exc}") from exc
    except Exception as exc:
        raise DecodeError(f"DICOM object could not be decoded ({type(exc).__name__})", detail=str(exc)) from exc
    if len(ds) == 0:
        raise DecodeError(f"DICOM object holds no data elements ({len(data)} bytes read)")
    return ds


def to_ecg(ds: Dataset) -> Ecg:
    """The rhythm strip of a 12-lead / general / ambulatory ECG object, in mV.

    Raises UnsupportedInputError for other SOP classes and WaveformError when the
    object is decodable but not a usable rhythm ECG (including median-beat-only files:
    models need a rhythm strip; use :func:`median_beat` for the beat).
    """
    with _decoding():
        _check_sop_class(ds)
        seq = _waveform_sequence(ds)
        index = _select_rhythm_group(seq)
        return _group_to_ecg(ds, index)


def median_beat(ds: Dataset) -> Ecg | None:
    """The representative (median) beat group as an Ecg, or None when the file has none."""
    with _decoding():
        _check_sop_class(ds)
        seq = _waveform_sequence(ds)
        beats = [i for i, item in enumerate(seq) if _is_beat_group(_group_label(item))]
        if not beats:
            return None
        # Prefer an explicit MEDIAN group over other representative-beat labels.
        beats.sort(key=lambda i: "MEDIAN" not in _group_label(seq[i]))
        return _group_to_ecg(ds, beats[0])


def validate_for_storage(ds: Dataset) -> None:
    """Cheap acceptance check for a C-STORE handler: raises what to_ecg would raise."""
    to_ecg(ds)


# ------------------------------------------------------------------- lead assembling


def lead_for_channel(channel: Dataset) -> str | None:
    """The standard lead a ChannelDefinitionSequence item carries, or None if not one.

    Code first (SCPECG, then MDC), then the code meaning; a channel's position in the
    sequence is never evidence of its lead.
    """
    src = _items(channel, "ChannelSourceSequence")
    if not src:
        return None
    item = src[0]
    code = _text(item.get("CodeValue"))
    scheme = (_text(item.get("CodingSchemeDesignator")) or "").upper()
    if code:
        if scheme in ("SCPECG", "SCP-ECG") and code in SCPECG_LEAD_CODES:
            return SCPECG_LEAD_CODES[code]
        if scheme == "MDC" and code in MDC_LEAD_CODES:
            return MDC_LEAD_CODES[code]
    meaning = (_text(item.get("CodeMeaning")) or "").lower()
    return LEAD_BY_MEANING.get(meaning)


def standardise_leads(
    by_lead: Mapping[str, np.ndarray], dropped: Sequence[str] = ()
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Standard-order float32 signals from named leads, deriving limb leads from I, II.

    Shared by every reader so an 8-lead cart and a 12-lead cart reach the models the
    same way. Returns ``(signals, leads, flags)``; fewer than two usable leads is a
    WaveformError.
    """
    leads: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in by_lead.items()}
    flags: list[str] = []
    if dropped:
        flags.append("dropped_channels:" + ",".join(dropped))
    if "I" in leads and "II" in leads:
        i, ii = leads["I"], leads["II"]
        formulas: dict[str, Callable[[], np.ndarray]] = {
            "III": lambda: ii - i,
            "aVR": lambda: -(i + ii) / 2.0,
            "aVL": lambda: i - ii / 2.0,
            "aVF": lambda: ii - i / 2.0,
        }
        derived = [name for name in DERIVABLE_LEADS if name not in leads]
        for name in derived:
            leads[name] = formulas[name]()
        if derived:
            flags.append("derived_leads:" + ",".join(derived))
    present = [name for name in STANDARD_LEADS if name in leads]
    if len(present) < 2:
        raise WaveformError(f"fewer than 2 usable ECG leads (found {len(present)}: {', '.join(present) or 'none'})")
    missing = [name for name in STANDARD_LEADS if name not in leads]
    if missing:
        flags.append("missing_leads:" + ",".join(missing))
    with np.errstate(over="ignore", invalid="ignore"):
        signals = np.stack([leads[name] for name in present]).astype(np.float32)
    bad = [name for name, row in zip(present, signals) if not np.isfinite(row).all()]
    if bad:  # NaN, or a value beyond float32 (a resolution or sensitivity out of range)
        raise WaveformError(
            f"leads {', '.join(bad)}: samples are not finite numbers in mV (check resolution and units)"
        )
    return signals, tuple(present), tuple(flags)


# ------------------------------------------------------------------------ internals

#: What pydicom raises when it decodes a value or a sequence on first access (it reads
#: lazily, so these surface in to_ecg, after read_bytes): an unknown VR, a length that is
#: not a multiple of the value size, a sequence whose items cannot be parsed.
_LAZY_DECODE_ERRORS = (NotImplementedError, BytesLengthException, OSError, EOFError, struct.error)


@contextmanager
def _decoding() -> Iterator[None]:
    """A value pydicom cannot decode on first access is a DecodeError, as it is in read_bytes."""
    try:
        yield
    except InputError:
        raise
    except _LAZY_DECODE_ERRORS as exc:
        # pydicom's text may quote the value's bytes: detail only.
        raise DecodeError(
            f"DICOM object is corrupt: an element could not be decoded ({type(exc).__name__})", detail=str(exc)
        ) from exc


def _items(ds: Dataset, keyword: str) -> Sequence[Dataset]:
    """A sequence's items (none when absent or empty); DecodeError when the element is not a sequence.

    A sender may write a sequence's tag with another VR (OB, UN ...): pydicom then gives
    bytes, not items, and the reader would crash on them.
    """
    value = ds.get(keyword)
    if isinstance(value, DicomSequence):
        return value
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return ()
    element = ds[keyword]
    raise DecodeError(f"{keyword} {element.tag} is not a sequence of items (VR {element.VR})")


def _check_element_lengths(ds: Dataset) -> None:
    """Raise DecodeError when an element holds fewer bytes than its header declares.

    pydicom reads a value cut short by the end of the file without complaint; a file
    cut in transfer would otherwise surface later as a misleading waveform error. Only
    sequences are converted (to reach their items): converting every value would cost
    20x the read itself.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if isinstance(raw, RawDataElement):
            length, value = raw.length, raw.value
            if length != _UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) < length:
                raise DecodeError(
                    f"DICOM object is truncated: element {Tag(tag)} declares {length} bytes, {len(value)} present"
                )
            if vr is None:  # implicit VR: the data dictionary knows
                vr = dictionary_VR(tag) if dictionary_has_tag(tag) else None
        if vr == "SQ":
            for item in ds[tag].value or ():
                _check_element_lengths(item)


def _check_sop_class(ds: Dataset) -> None:
    sop_class = _text(ds.get("SOPClassUID"))
    if not sop_class:
        raise UnsupportedInputError("no SOP Class UID: not an ECG waveform object")
    if sop_class not in ECG_STORAGE_SOP_CLASSES:
        raise UnsupportedInputError(
            f"SOP class {sop_class} is not an ECG waveform storage class "
            f"(accepted: {', '.join(ECG_STORAGE_SOP_CLASSES)})"
        )
    encoding = getattr(ds, "original_encoding", (None, None))
    if encoding[1] is False:
        raise UnsupportedInputError(
            "big endian transfer syntax: waveform data in Explicit VR Big Endian is not supported"
        )


def _waveform_sequence(ds: Dataset) -> Sequence[Dataset]:
    seq = _items(ds, "WaveformSequence")
    if not seq:
        raise WaveformError("no waveform: WaveformSequence (5400,0100) is missing or empty")
    return seq


def _group_label(item: Dataset) -> str:
    return (_text(item.get("MultiplexGroupLabel")) or "").upper()


def _is_beat_group(label: str) -> bool:
    return any(word in label for word in _BEAT_WORDS)


def _n_samples(item: Dataset) -> int:
    try:
        return int(item.get("NumberOfWaveformSamples") or 0)
    except (TypeError, ValueError):
        return 0


def _select_rhythm_group(seq: Sequence[Dataset]) -> int:
    """Index of the rhythm group: RHYTHM by label, else the longest non-beat group."""
    labels = [_group_label(item) for item in seq]
    rhythm = [i for i, label in enumerate(labels) if label == _RHYTHM]
    candidates = rhythm or [i for i, label in enumerate(labels) if not _is_beat_group(label)]
    if not candidates:
        raise WaveformError(
            "only a median beat, no rhythm: multiplex groups are "
            + ", ".join(repr(label) for label in labels)
            + "; a 10 s rhythm strip is needed"
        )
    # Longest first; ties keep file order (max returns the first maximum).
    return max(candidates, key=lambda i: _n_samples(seq[i]))


def _describe_group(index: int, item: Dataset) -> str:
    label = _group_label(item)
    return f"multiplex group {index + 1} ({label})" if label else f"multiplex group {index + 1}"


def _channel_description(number: int, channel: Dataset) -> str:
    """A short, PHI-free name for a dropped channel (label, code meaning or number)."""
    text = _text(channel.get("ChannelLabel"))
    src = _items(channel, "ChannelSourceSequence")
    if not text and src:
        text = _text(src[0].get("CodeMeaning")) or _text(src[0].get("CodeValue"))
    text = text or f"channel {number}"
    return re.sub(r"[,\s]+", " ", text).strip()


def _units_to_mv(channel: Dataset, lead: str) -> float | None:
    """Factor from the channel's sensitivity units to mV; None when no units are given."""
    seq = _items(channel, "ChannelSensitivityUnitsSequence")
    if not seq:
        return None
    item = seq[0]
    code = _text(item.get("CodeValue")) or ""
    meaning = (_text(item.get("CodeMeaning")) or "").lower()
    if code in _UCUM_TO_MV:
        return _UCUM_TO_MV[code]
    if meaning in _MEANING_TO_MV:
        return _MEANING_TO_MV[meaning]
    if meaning.endswith("s") and meaning[:-1] in _MEANING_TO_MV:
        return _MEANING_TO_MV[meaning[:-1]]
    raise WaveformError(
        f"lead {lead}: channel sensitivity units {code or '(no code)'!s} "
        f"({meaning or 'no meaning'}) are not a voltage unit"
    )


def _decode_group(ds: Dataset, index: int) -> tuple[dict[str, np.ndarray], list[str], float, list[str]]:
    """Decode one multiplex group: (signals in mV by lead, dropped channels, fs, flags)."""
    item = ds.WaveformSequence[index]
    where = _describe_group(index, item)
    required = (
        "NumberOfWaveformChannels",
        "NumberOfWaveformSamples",
        "SamplingFrequency",
        "WaveformBitsAllocated",
        "WaveformSampleInterpretation",
        "ChannelDefinitionSequence",
        "WaveformData",
    )
    absent = [name for name in required if item.get(name) in (None, "")]
    if absent:
        raise WaveformError(f"{where}: missing {', '.join(absent)}")

    try:
        n_channels = int(item.NumberOfWaveformChannels)
        n_samples = int(item.NumberOfWaveformSamples)
        bits = int(item.WaveformBitsAllocated)
        fs = float(item.SamplingFrequency)
    except (TypeError, ValueError) as exc:
        raise WaveformError(f"{where}: non-numeric waveform attribute", detail=str(exc)) from exc
    interpretation = str(item.WaveformSampleInterpretation).strip().upper()

    if not np.isfinite(fs) or fs <= 0:
        raise WaveformError(f"{where}: SamplingFrequency must be > 0 (got {fs:g})")
    if n_channels <= 0 or n_samples <= 0:
        raise WaveformError(
            f"{where}: NumberOfWaveformChannels {n_channels} and NumberOfWaveformSamples {n_samples} must both be > 0"
        )
    if (bits, interpretation) not in _SUPPORTED_SAMPLE_FORMATS:
        raise WaveformError(
            f"{where}: unsupported sample format WaveformBitsAllocated {bits} / "
            f"WaveformSampleInterpretation {interpretation}"
        )
    channels = _items(item, "ChannelDefinitionSequence")
    if len(channels) != n_channels:
        raise WaveformError(
            f"{where}: NumberOfWaveformChannels is {n_channels} but ChannelDefinitionSequence has {len(channels)} items"
        )
    expected = n_samples * n_channels * (bits // 8)
    actual = len(item.WaveformData)
    allowed = {expected, expected + (expected % 2)}  # one pad byte to an even length
    if actual not in allowed:
        state = "truncated" if actual < expected else "longer than declared"
        raise WaveformError(
            f"{where}: WaveformData is {state}: expected {expected} bytes "
            f"({n_samples} samples x {n_channels} channels x {bits // 8} bytes), got {actual}"
        )

    # Identify channels before decoding so a bad file fails on the cheap checks first.
    leads_by_column: dict[int, str] = {}
    first_column: dict[str, int] = {}
    dropped: list[str] = []
    for column, channel in enumerate(channels):
        lead = lead_for_channel(channel)
        if lead is None:
            dropped.append(_channel_description(column + 1, channel))
            continue
        if lead in first_column:
            raise WaveformError(
                f"{where}: lead {lead} appears twice (channels {first_column[lead] + 1} and {column + 1})"
            )
        first_column[lead] = column
        leads_by_column[column] = lead

    try:
        values = ds.waveform_array(index)
    except Exception as exc:
        raise WaveformError(
            f"{where}: waveform data could not be decoded ({type(exc).__name__})", detail=str(exc)
        ) from exc

    flags: list[str] = []
    by_lead: dict[str, np.ndarray] = {}
    units_assumed = False
    for column, lead in leads_by_column.items():
        channel = channels[column]
        if "ChannelSensitivity" in channel and channel.ChannelSensitivity is not None:
            try:
                sensitivity = float(channel.ChannelSensitivity)
            except (TypeError, ValueError):
                sensitivity = float("nan")
            if sensitivity == 0:
                raise WaveformError(f"{where}: lead {lead}: ChannelSensitivity is 0")
        factor = _units_to_mv(channel, lead)
        if factor is None:
            factor = 1e-3  # uV: what carts send in practice when they leave units out
            units_assumed = True
        signal = values[:, column].astype(np.float64) * factor
        bad = int(np.count_nonzero(~np.isfinite(signal)))
        if bad:
            raise WaveformError(
                f"{where}: lead {lead}: {bad} samples are NaN or infinite after scaling "
                "(check ChannelSensitivity, correction factor and baseline)"
            )
        by_lead[lead] = signal
    if units_assumed:
        flags.append("units_assumed:uV")
    if _group_label(item) != _RHYTHM:
        flags.append(f"multiplex_group:{_group_label(item) or index + 1}")
    return by_lead, dropped, fs, flags


def _group_to_ecg(ds: Dataset, index: int) -> Ecg:
    by_lead, dropped, fs, group_flags = _decode_group(ds, index)
    signals, leads, lead_flags = standardise_leads(by_lead, dropped)
    patient, patient_flags = _patient(ds)
    return Ecg(
        signals=signals,
        leads=leads,
        fs=fs,
        patient=patient,
        study=_study(ds),
        source_format="dicom",
        units="mV",
        flags=tuple(lead_flags) + tuple(group_flags) + tuple(patient_flags),
    )


# ------------------------------------------------------------- patient and study


_SEX = {"M": "male", "F": "female", "O": "other"}


def _patient(ds: Dataset) -> tuple[Patient, list[str]]:
    flags: list[str] = []
    patient_id = _text(ds.get("PatientID"))
    if not patient_id:
        flags.append("no_patient_id")
    birth_date = None
    raw_birth = _text(ds.get("PatientBirthDate"))
    if raw_birth:
        birth_date = _iso_date(raw_birth)
        if birth_date is None:
            flags.append("invalid_birth_date")
    sex = _SEX.get((_text(ds.get("PatientSex")) or "").upper(), "unknown")
    patient = Patient(
        id=patient_id,
        id_issuer=_text(ds.get("IssuerOfPatientID")),
        name=_text(ds.get("PatientName")),
        birth_date=birth_date,
        sex=sex,
    )
    return patient, flags


def _study(ds: Dataset) -> Study:
    manufacturer = _text(ds.get("Manufacturer"))
    model = _text(ds.get("ManufacturerModelName"))
    device = " ".join(part for part in (manufacturer, model) if part) or None
    return Study(
        sop_instance_uid=_text(ds.get("SOPInstanceUID")),
        sop_class_uid=_text(ds.get("SOPClassUID")),
        study_instance_uid=_text(ds.get("StudyInstanceUID")),
        series_instance_uid=_text(ds.get("SeriesInstanceUID")),
        accession_number=_text(ds.get("AccessionNumber")),
        acquired_at=_acquired_at(ds),
        device=device,
        placer_order_number=_order_number(ds, "PlacerOrderNumberImagingServiceRequest"),
        filler_order_number=_order_number(ds, "FillerOrderNumberImagingServiceRequest"),
    )


def _order_number(ds: Dataset, keyword: str) -> str | None:
    """An order number from the top level or the first Request Attributes / Referenced Request item.

    Modality worklist-driven carts copy the order into the Request Attributes Sequence
    (or, for the placer number, into AccessionNumber, which we keep separately).
    """
    value = _text(ds.get(keyword))
    if value:
        return value
    for seq_keyword in ("RequestAttributesSequence", "ReferencedRequestSequence"):
        for item in _items(ds, seq_keyword):
            value = _text(item.get(keyword))
            if value:
                return value
    return None


def _acquired_at(ds: Dataset) -> datetime | None:
    """AcquisitionDateTime, else ContentDate + ContentTime; aware when an offset is known."""
    when = parse_dicom_dt(_text(ds.get("AcquisitionDateTime")))
    if when is None:
        date = _text(ds.get("ContentDate"))
        time = (_text(ds.get("ContentTime")) or "").replace(":", "")
        if date:
            when = parse_dicom_dt(date.replace("-", "") + time)
    if when is None:
        return None
    if when.tzinfo is None:
        offset = _tz_offset(_text(ds.get("TimezoneOffsetFromUTC")))
        if offset is not None:
            when = when.replace(tzinfo=offset)
    return when


def parse_dicom_dt(value: str | None) -> datetime | None:
    """A DICOM DT value (date, time, optional UTC offset) as a plain datetime; None if empty or invalid."""
    if not value:
        return None
    try:
        parsed = DT(value)
    except (ValueError, TypeError, OverflowError):
        return None
    # A plain datetime, not pydicom's DT subclass, so callers compare and serialise it freely.
    return datetime(
        parsed.year,
        parsed.month,
        parsed.day,
        parsed.hour,
        parsed.minute,
        parsed.second,
        parsed.microsecond,
        tzinfo=parsed.tzinfo,
    )


def _tz_offset(value: str | None) -> timezone | None:
    if not value:
        return None
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", value.strip())
    if not match:
        return None
    sign = -1 if match.group(1) == "-" else 1
    hours, minutes = int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes >= 60:
        return None
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _iso_date(value: str) -> str | None:
    digits = value.strip().replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        return datetime.strptime(digits, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    """A DICOM value as a stripped str, or None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = str(value).strip().strip("\x00").strip()
    return text or None
