"""GE MUSE resting ECG XML (``RestingECG``) -> the canonical :class:`~mapping.ecg.Ecg`.

Structure read (as publicly documented for MUSE XML exports): ``RestingECG`` with
``PatientDemographics`` (PatientID, PatientLastName, PatientFirstName, DateofBirth
MM-DD-YYYY, Gender), ``TestDemographics`` (AcquisitionDevice, AcquisitionDate
MM-DD-YYYY, AcquisitionTime HH:MM:SS) and ``Waveform`` elements, each with
``WaveformType`` (Median | Rhythm), ``SampleBase`` and ``SampleExponent`` (fs =
base x 10^exponent) and one ``LeadData`` per stored lead: ``LeadID``,
``LeadSampleCountTotal``, ``LeadByteCountTotal``, ``LeadSampleSize`` (2),
``LeadAmplitudeUnitsPerBit``, ``LeadAmplitudeUnits`` (MICROVOLTS) and
``WaveFormData``, base64 of little-endian int16 samples. MUSE stores 8 leads
(I, II, V1-V6); III, aVR, aVL and aVF are derived by
:func:`mapping.dicom_waveform.standardise_leads` (flagged ``derived_leads:...``).

Why the rhythm waveform only: the Median waveform is one representative beat
(about 1.2 s); models need the 10 s strip, so a file with only a Median is a
WaveformError, never silently analysed.

**Tested only against self-generated files**: no MUSE sample with a licence that
allows redistribution was available (the public ones are GPL). The unit tests build
MUSE-structured XML from a real WFDB record and read it back; the first real MUSE
export should be checked against this reader before it is relied on.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from xml.etree.ElementTree import Element

import numpy as np

from ecgbridge.errors import DecodeError, WaveformError
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study
from ecgbridge.mapping.vendor._xml import child, children, iso_date, text, to_float, volts_to_mv

__all__ = ["ROOT", "to_ecg", "read_leads"]

ROOT = "RestingECG"
_LEAD_BY_LOWER = {lead.lower(): lead for lead in STANDARD_LEADS}
_SAMPLE_DTYPES = {1: "<i1", 2: "<i2", 4: "<i4"}
_SEX = {"MALE": "male", "FEMALE": "female", "M": "male", "F": "female"}


def to_ecg(root: Element) -> Ecg:
    """The rhythm waveform of a MUSE ``RestingECG`` document as an Ecg in mV."""
    by_lead, fs, dropped, flags = read_leads(root)
    signals, leads, lead_flags = standardise_leads(by_lead, dropped)
    patient, patient_flags = _patient(root)
    return Ecg(
        signals=signals,
        leads=leads,
        fs=fs,
        patient=patient,
        study=_study(root),
        source_format="muse",
        units="mV",
        flags=tuple(lead_flags) + tuple(flags) + tuple(patient_flags),
    )


def read_leads(root: Element) -> tuple[dict[str, np.ndarray], float, list[str], list[str]]:
    """Stored rhythm leads in mV: (by lead, fs, dropped channels, flags)."""
    waveform = _rhythm_waveform(root)
    base = to_float(text(waveform, "SampleBase"), "MUSE rhythm SampleBase")
    exponent = to_float(text(waveform, "SampleExponent") or "0", "MUSE rhythm SampleExponent")
    fs = base * 10.0**exponent
    if fs <= 0:
        raise WaveformError(f"MUSE rhythm sampling rate must be > 0 (got {fs:g})")
    by_lead: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    flags: list[str] = []
    for number, lead_data in enumerate(children(waveform, "LeadData"), start=1):
        raw_id = text(lead_data, "LeadID") or ""
        lead = _LEAD_BY_LOWER.get(raw_id.lower())
        if lead is None:
            dropped.append(raw_id or f"LeadData {number}")
            continue
        if lead in by_lead:
            raise WaveformError(f"MUSE rhythm waveform: lead {lead} appears twice")
        samples, assumed = _lead_samples(lead_data, lead)
        if assumed and "units_assumed:uV" not in flags:
            flags.append("units_assumed:uV")
        by_lead[lead] = samples
    if not by_lead:
        raise WaveformError("MUSE rhythm waveform has no LeadData with a standard LeadID")
    lengths = {lead: len(v) for lead, v in by_lead.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{lead} {n}" for lead, n in lengths.items())
        raise WaveformError(f"MUSE rhythm lead lengths disagree (samples per lead: {shown})")
    return by_lead, fs, dropped, flags


# ------------------------------------------------------------------------ internals


def _rhythm_waveform(root: Element) -> Element:
    waveforms = children(root, "Waveform")
    if not waveforms:
        raise WaveformError("no rhythm waveform: the MUSE file has no Waveform element")
    types = [(text(w, "WaveformType") or "").lower() for w in waveforms]
    rhythm = [w for w, kind in zip(waveforms, types) if kind == "rhythm"]
    if not rhythm:
        shown = ", ".join(kind or "(untyped)" for kind in types)
        raise WaveformError(f"no rhythm waveform: MUSE WaveformType is {shown} (a Rhythm strip is needed)")
    return max(rhythm, key=lambda w: len(children(w, "LeadData")))


def _count(lead_data: Element, name: str, lead: str) -> int | None:
    value = text(lead_data, name)
    if value is None:
        return None
    if not value.isdigit():
        raise WaveformError(f"MUSE lead {lead}: {name} is not a whole number")
    return int(value)


def _lead_samples(lead_data: Element, lead: str) -> tuple[np.ndarray, bool]:
    size = _count(lead_data, "LeadSampleSize", lead) or 2
    if size not in _SAMPLE_DTYPES:
        raise WaveformError(f"MUSE lead {lead}: LeadSampleSize {size} is not 1, 2 or 4 bytes")
    encoded = "".join((text(lead_data, "WaveFormData") or "").split())
    if not encoded:
        raise WaveformError(f"MUSE lead {lead}: WaveFormData is empty")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"MUSE lead {lead}: WaveFormData is not valid Base64") from None
    declared_bytes = _count(lead_data, "LeadByteCountTotal", lead)
    if declared_bytes is not None and declared_bytes != len(data):
        raise WaveformError(
            f"MUSE lead {lead}: LeadByteCountTotal is {declared_bytes} but WaveFormData holds {len(data)} bytes"
        )
    if len(data) % size:
        raise WaveformError(f"MUSE lead {lead}: {len(data)} bytes is not a whole number of {size}-byte samples")
    counts = np.frombuffer(data, dtype=_SAMPLE_DTYPES[size]).astype(np.float64)
    declared = _count(lead_data, "LeadSampleCountTotal", lead)
    if declared is not None and declared != len(counts):
        raise WaveformError(
            f"MUSE lead {lead}: LeadSampleCountTotal is {declared} but WaveFormData holds {len(counts)} samples"
        )
    per_bit = to_float(text(lead_data, "LeadAmplitudeUnitsPerBit"), f"MUSE lead {lead}: LeadAmplitudeUnitsPerBit")
    if per_bit <= 0:
        raise WaveformError(f"MUSE lead {lead}: LeadAmplitudeUnitsPerBit must be > 0")
    unit = text(lead_data, "LeadAmplitudeUnits")
    try:
        factor = volts_to_mv(unit)
    except KeyError:
        raise WaveformError(f"MUSE lead {lead}: LeadAmplitudeUnits {unit!r} is not a voltage unit") from None
    assumed = factor is None
    return counts * per_bit * (1e-3 if factor is None else factor), assumed


def _patient(root: Element) -> tuple[Patient, list[str]]:
    demo = child(root, "PatientDemographics")
    patient_id = text(demo, "PatientID")
    last, first = text(demo, "PatientLastName"), text(demo, "PatientFirstName")
    name = "^".join(part or "" for part in (last, first)).strip("^") or None
    gender = text(demo, "Gender")
    sex = _SEX.get(gender.upper(), "unknown") if gender else None
    flags = [] if patient_id else ["no_patient_id"]
    return Patient(
        id=patient_id,
        name=name,
        birth_date=iso_date(text(demo, "DateofBirth"), "%m-%d-%Y", "%Y-%m-%d"),
        sex=sex,
    ), flags


def _study(root: Element) -> Study:
    test = child(root, "TestDemographics")
    when = None
    date, time = text(test, "AcquisitionDate"), text(test, "AcquisitionTime") or "00:00:00"
    if date:
        for fmt in ("%m-%d-%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%m-%d-%Y %H:%M"):
            try:
                when = datetime.strptime(f"{date} {time}", fmt)
                break
            except ValueError:
                continue
    device = text(test, "AcquisitionDevice")
    return Study(acquired_at=when, device=f"GE {device}" if device else None)
