"""HL7 v3 annotated ECG (aECG, FDA XML) -> the canonical :class:`~mapping.ecg.Ecg`.

Why this reader looks where it does: an aECG holds the rhythm strip in
``AnnotatedECG/component/series`` (code ``RHYTHM``) and the representative beat in
``series/derivation/derivedSeries``; taking the first sequence set found would feed
a 1.2 s beat to the models. So the reader

* takes a top-level ``series`` coded RHYTHM (else the longest non-beat series),
  never a ``derivedSeries``;
* reads the sampling rate from the time sequence's ``increment`` (GLIST_TS or
  GLIST_PQ; ``s`` or ``ms``), never assumes one;
* names each lead by its ``MDC_ECG_LEAD_*`` code, never by position, and drops (and
  flags) other sequences;
* applies ``origin`` and ``scale`` with their units (SLIST_PQ; SLIST_INT has no units
  and is taken as uV, flagged) and converts to mV;
* requires every lead to have the same number of samples;
* cuts a trailing calibration pulse (see :mod:`mapping.vendor._signal`).

Identity: the trial subject id (``trialSubject/id``) is the patient id, its root the
issuer; ``AnnotatedECG/id`` becomes ``Study.sop_instance_uid`` (see
:func:`mapping.vendor._xml.uid_from_id`).
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

import numpy as np

from ecgbridge.errors import WaveformError
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.mapping.vendor._signal import trim_calibration
from ecgbridge.mapping.vendor._xml import child, children, hl7_ts, text, to_float, uid_from_id, volts_to_mv

__all__ = ["NAMESPACE", "AecgLeads", "read_leads", "to_ecg", "lead_for_code"]

NAMESPACE = "urn:hl7-org:v3"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_TIME_CODES = ("TIME_ABSOLUTE", "TIME_RELATIVE")
_BEAT_WORDS = ("BEAT", "MEDIAN", "TEMPLATE", "AVERAGE")
_LEAD_SUFFIX = {
    "I": "I",
    "II": "II",
    "III": "III",
    "AVR": "aVR",
    "AVL": "aVL",
    "AVF": "aVF",
    "V1": "V1",
    "V2": "V2",
    "V3": "V3",
    "V4": "V4",
    "V5": "V5",
    "V6": "V6",
}
_TIME_UNITS_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
#: Spread between leads (mV) still counted as "the same value" in a calibration trailer:
#: aECG files converted from Philips XML were filtered after the pulse was added.
_CALIBRATION_TOLERANCE_MV = 0.025
_SEX = {"M": "male", "F": "female", "UN": "unknown", "U": "unknown"}


def lead_for_code(code: str | None) -> str | None:
    """'MDC_ECG_LEAD_AVR' -> 'aVR'; None for other codes (V7, Frank X/Y/Z, ...)."""
    if not code or not code.upper().startswith("MDC_ECG_LEAD_"):
        return None
    return _LEAD_SUFFIX.get(code[len("MDC_ECG_LEAD_") :].upper())


class AecgLeads:
    """The rhythm sequences of an aECG, in mV, before lead standardisation."""

    def __init__(self, by_lead: dict[str, np.ndarray], fs: float, dropped: list[str], flags: list[str]):
        self.by_lead = by_lead
        self.fs = fs
        self.dropped = dropped
        self.flags = flags


def read_leads(root: Element) -> AecgLeads:
    """Rhythm leads (mV) and sampling rate of an ``AnnotatedECG`` root element."""
    series, flags = _rhythm_series(root)
    sets = [s for c in children(series, "component") for s in children(c, "sequenceSet")]
    if not sets:
        raise WaveformError("aECG rhythm series has no sequenceSet (no waveform data)")
    decoded = [_decode_set(s, i + 1) for i, s in enumerate(sets)]
    if len(decoded) > 1:
        # Sets are recorded at different times (e.g. 3-channel carts): never mix them.
        decoded.sort(key=lambda d: (len(d.by_lead), _n_samples(d)), reverse=True)
        flags.append(f"aecg_sequence_sets:{len(decoded)}")
    best = decoded[0]
    trimmed = trim_calibration(best.by_lead, best.fs, tolerance=_CALIBRATION_TOLERANCE_MV)
    if trimmed:
        flags.append(f"calibration_trimmed:{trimmed / best.fs:.2f}s")
    best.flags = flags + best.flags
    return best


def to_ecg(root: Element) -> Ecg:
    """The rhythm strip of an aECG as an Ecg in mV, with patient and study identity."""
    leads = read_leads(root)
    signals, names, lead_flags = standardise_leads(leads.by_lead, leads.dropped)
    patient, patient_flags = _patient(root)
    return Ecg(
        signals=signals,
        leads=names,
        fs=leads.fs,
        patient=patient,
        study=_study(root),
        source_format="aecg",
        units="mV",
        flags=tuple(lead_flags) + tuple(leads.flags) + tuple(patient_flags),
    )


# ------------------------------------------------------------------------ internals


def _code(element: Element | None) -> str:
    node = child(element, "code")
    return (node.get("code") or "").strip().upper() if node is not None else ""


def _n_samples(leads: AecgLeads) -> int:
    return max((len(v) for v in leads.by_lead.values()), default=0)


def _rhythm_series(root: Element) -> tuple[Element, list[str]]:
    series = [s for c in children(root, "component") for s in children(c, "series")]
    if not series:
        raise WaveformError("no rhythm waveform: the aECG has no component/series")
    rhythm = [s for s in series if _code(s) == "RHYTHM"]
    if rhythm:
        return max(rhythm, key=_series_size), []
    others = [s for s in series if not any(w in _code(s) for w in _BEAT_WORDS)]
    if not others:
        codes = ", ".join(sorted({_code(s) or "(no code)" for s in series}))
        raise WaveformError(f"no rhythm waveform: the aECG series are {codes} (a rhythm strip is needed)")
    chosen = max(others, key=_series_size)
    return chosen, [f"aecg_series:{_code(chosen) or 'uncoded'}"]


def _series_size(series: Element) -> int:
    digits = series.iter(f"{{{NAMESPACE}}}digits")
    return max((len(d.text or "") for d in digits), default=0)


def _sequences(sequence_set: Element) -> list[Element]:
    return [s for c in children(sequence_set, "component") for s in children(c, "sequence")]


def _decode_set(sequence_set: Element, number: int) -> AecgLeads:
    where = f"aECG sequenceSet {number}"
    fs: float | None = None
    by_lead: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    flags: list[str] = []
    for seq in _sequences(sequence_set):
        code = _code(seq)
        value = child(seq, "value")
        if code in _TIME_CODES:
            if fs is None:
                fs = _sampling_rate(value, where)
            continue
        lead = lead_for_code(code)
        if lead is None:
            dropped.append(code or "uncoded sequence")
            continue
        if lead in by_lead:
            raise WaveformError(f"{where}: lead {lead} appears twice")
        samples, assumed = _samples(value, f"{where}: lead {lead}")
        if assumed and "units_assumed:uV" not in flags:
            flags.append("units_assumed:uV")
        by_lead[lead] = samples
    if fs is None:
        raise WaveformError(
            f"{where}: no time sequence (TIME_ABSOLUTE / TIME_RELATIVE with an increment), "
            "so the sampling rate is unknown"
        )
    if not by_lead:
        raise WaveformError(f"{where}: no ECG lead sequences (MDC_ECG_LEAD_*)")
    lengths = {lead: len(v) for lead, v in by_lead.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{lead} {n}" for lead, n in lengths.items())
        raise WaveformError(f"{where}: lead lengths disagree (samples per lead: {shown})")
    return AecgLeads(by_lead, fs, dropped, flags)


def _sampling_rate(value: Element | None, where: str) -> float:
    xsi_type = (value.get(_XSI_TYPE) or "") if value is not None else ""
    increment = child(value, "increment")
    if increment is None:
        raise WaveformError(
            f"{where}: the time sequence ({xsi_type or 'no type'}) has no increment; "
            "explicit sample times are not supported"
        )
    step = to_float(increment.get("value"), f"{where}: time increment")
    unit = (increment.get("unit") or "s").strip()
    if unit not in _TIME_UNITS_TO_S:
        raise WaveformError(f"{where}: time increment unit {unit!r} is not s or ms")
    step *= _TIME_UNITS_TO_S[unit]
    if step <= 0:
        raise WaveformError(f"{where}: time increment must be > 0 (got {step:g} s)")
    return 1.0 / step


def _samples(value: Element | None, where: str) -> tuple[np.ndarray, bool]:
    """Physical samples in mV of an SLIST_PQ / SLIST_INT value; (samples, units assumed)."""
    if value is None:
        raise WaveformError(f"{where}: sequence has no value")
    xsi_type = (value.get(_XSI_TYPE) or "").strip().rpartition(":")[2]  # "hl7:SLIST_PQ" too
    if xsi_type not in ("SLIST_PQ", "SLIST_INT"):
        raise WaveformError(f"{where}: value type {xsi_type or '(none)'} is not SLIST_PQ or SLIST_INT")
    digits = text(value, "digits")
    if digits is None:
        raise WaveformError(f"{where}: no digits")
    try:
        raw = np.array(digits.split(), dtype=np.float64)
    except ValueError:
        raise WaveformError(f"{where}: digits are not all numbers") from None
    origin_node, scale_node = child(value, "origin"), child(value, "scale")
    origin = to_float(origin_node.get("value"), f"{where}: origin") if origin_node is not None else 0.0
    scale = to_float(scale_node.get("value"), f"{where}: scale") if scale_node is not None else 1.0
    if scale == 0:
        raise WaveformError(f"{where}: scale is 0")
    assumed = False
    factors = []
    for name, node in (("origin", origin_node), ("scale", scale_node)):
        unit = node.get("unit") if node is not None else None
        try:
            factor = volts_to_mv(unit)
        except KeyError:
            raise WaveformError(f"{where}: {name} unit {unit!r} is not a voltage unit") from None
        if factor is None:
            factor, assumed = 1e-3, True  # SLIST_INT, or a PQ without units: uV in practice
        factors.append(factor)
    samples = origin * factors[0] + scale * factors[1] * raw
    if not np.all(np.isfinite(samples)):
        raise WaveformError(f"{where}: samples are not finite after scaling")
    return samples, assumed


def _patient(root: Element) -> tuple[Patient, list[str]]:
    subject = next(root.iter(f"{{{NAMESPACE}}}trialSubject"), None)
    ident = child(subject, "id")
    patient_id = (ident.get("extension") or "").strip() or None if ident is not None else None
    issuer = (ident.get("root") or "").strip() or None if ident is not None else None
    person = child(subject, "subjectDemographicPerson")
    if patient_id is None:
        # Mindray carts write the id as a vendor element inside the demographic person.
        patient_id = text(person, "PatientID")
    gender = child(person, "administrativeGenderCode")
    birth = child(person, "birthTime")
    born = hl7_ts(birth.get("value")) if birth is not None else None
    sex = None
    if gender is not None:
        sex = _SEX.get((gender.get("code") or "").strip().upper(), "unknown")
    flags = [] if patient_id else ["no_patient_id"]
    return Patient(
        id=patient_id,
        id_issuer=issuer,
        name=text(person, "name"),
        birth_date=born.date().isoformat() if born else None,
        sex=sex,
    ), flags


def _study(root: Element) -> Study:
    ident = child(root, "id")
    uid = uid_from_id(ident.get("root"), ident.get("extension")) if ident is not None else None
    when = None
    effective = child(root, "effectiveTime")
    for name in ("center", "low"):
        node = child(effective, name)
        if node is not None and when is None:
            when = hl7_ts(node.get("value"))
    device = None
    for series in (s for c in children(root, "component") for s in children(c, "series")):
        author = child(series, "author", "seriesAuthor")
        maker = text(author, "manufacturerOrganization", "name")
        model = text(author, "manufacturedSeriesDevice", "manufacturerModelName")
        device = " ".join(part for part in (maker, model) if part) or None
        if device:
            break
    return Study(sop_instance_uid=uid, acquired_at=when, device=device)
