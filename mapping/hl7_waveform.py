"""HL7 v2 ORU^R01 with an ECG waveform -> the canonical :class:`~mapping.ecg.Ecg`.

Two ways a cart puts an ECG into an ORU^R01, both read here:

1. **The HL7 v2 waveform result encoding** (v2.3 chapter 7.14-7.20, kept in 2.5.1): in one
   OBR, OBX segments grouped by Observation Sub-ID (OBX-4):

   * value type **CD** (channel definition; "CHN" category): OBX-5 repeats, one CD per
     channel: ``WVI (channel number & name) ^ WVS (source one & two) ^ CSU (sensitivity &
     units id & text & coding system) ^ CCP (correction factor & baseline & time skew) ^
     sampling frequency ^ NR (minimum & maximum)``. Omitted sensitivity, calibration,
     frequency and range items take the last value given in the same OBX ("sticky
     defaults"). Several CD OBX with one sub-ID add channels in order.
   * value type **TS** ("TIM"): time of the first sample of the group; a later TS marks a
     new start after a gap.
   * value type **NA** or **MA** ("WAV"): the samples of *all* channels of the group,
     possibly split over successive OBX in time. **NA** is channel-block ("unmultiplexed"):
     each channel's samples separated by ``^``, channels by ``~`` (one repetition per
     channel). **MA** is channel-multiplexed: time samples separated by ``~``, the channels
     of one sample by ``^``.

   A physical value is ``(sample - baseline) * sensitivity * correction factor`` in the
   CSU units, converted to mV (HL7's baseline is a sample value, unlike DICOM's).

2. **OBX value type ED** carrying a file: ``source application ^ type of data ^ data
   subtype ^ encoding (Base64 | Hex | A) ^ data``. DICOM (``DICM`` at byte 128) goes to
   :mod:`mapping.dicom_waveform`, XML to :func:`mapping.vendor.read_xml`.

Why strict: a wrong lead, unit or rate gives a confident wrong answer. Leads are named
from the channel name / waveform source (standard names, "Lead I", MDC reference ids
and codes, SCP-ECG codes), never from their position; every disagreement between the
channel definitions and the data is a :class:`~ecgbridge.errors.WaveformError` naming the
OBX by set-id and segment position, with an ERR location
(:func:`mapping.hl7_common.error_location`). Lead assembly (derived limb leads, missing
leads) is :func:`mapping.dicom_waveform.standardise_leads`, shared with every reader.

Identity: PID (patient) and OBR-2/OBR-3 (order numbers). When a file is embedded, the
HL7 identity wins for the patient (the HIS assigned it) and the order numbers; the file
keeps its UIDs, device and acquisition time, and fills whatever HL7 leaves empty.
``Study.sop_instance_uid`` stays None unless an embedded DICOM gives one (the HL7
control id is in the message store, not in the ECG).

Not supported (each refused with a message saying so): waveforms with time gaps, groups
of different lengths or rates, more than one ECG per message, ED payloads split over
several OBX, annotations (ANO) (ignored).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
from hl7apy.core import Segment

from ecgbridge.errors import DecodeError, InputError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.codes import LEAD_BY_MEANING, MDC_LEAD_CODES, SCPECG_LEAD_CODES
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study
from ecgbridge.mapping.hl7_common import (
    Er7,
    ErrorLocation,
    Separators,
    component_text,
    field_text,
    hl7_timestamp,
    msh_facts,
    parse_deferred_field,
    parse_hl7_timestamp,
    read_er7,
    segments,
    with_location,
)

__all__ = [
    "parse_oru_waveform",
    "lead_for_channel_name",
    "MDC_LEAD_REFIDS",
    "WAVEFORM_MESSAGE_TYPES",
]

#: Message types that carry a waveform result (W01 is v2.3's waveform trigger).
WAVEFORM_MESSAGE_TYPES: tuple[str, ...] = ("ORU^R01", "ORU^W01")

#: ISO/IEEE 11073 MDC reference ids some carts put in the channel name.
MDC_LEAD_REFIDS: dict[str, str] = {
    "MDC_ECG_LEAD_I": "I",
    "MDC_ECG_LEAD_II": "II",
    "MDC_ECG_LEAD_III": "III",
    "MDC_ECG_LEAD_AVR": "aVR",
    "MDC_ECG_LEAD_AVL": "aVL",
    "MDC_ECG_LEAD_AVF": "aVF",
    "MDC_ECG_LEAD_V1": "V1",
    "MDC_ECG_LEAD_V2": "V2",
    "MDC_ECG_LEAD_V3": "V3",
    "MDC_ECG_LEAD_V4": "V4",
    "MDC_ECG_LEAD_V5": "V5",
    "MDC_ECG_LEAD_V6": "V6",
}
#: Electrode pairs (WVS source one & source two) of the bipolar limb leads.
_BIPOLAR: dict[tuple[str, str], str] = {("LA", "RA"): "I", ("LL", "RA"): "II", ("LL", "LA"): "III"}
_LEAD_BY_UPPER: dict[str, str] = {lead.upper(): lead for lead in STANDARD_LEADS}

#: Voltage units (lower-cased: UCUM, ISO+ upper-case forms and ANSI X3.50 agree on these;
#: ISO+ writes mega as "MA", so "MV" is millivolt) -> factor to mV.
_UNIT_TO_MV: dict[str, float] = {
    "nv": 1e-6,
    "uv": 1e-3,
    "\u00b5v": 1e-3,
    "\u03bcv": 1e-3,
    "mv": 1.0,
    "v": 1e3,
    "nanovolt": 1e-6,
    "microvolt": 1e-3,
    "millivolt": 1.0,
    "volt": 1e3,
    "mdc_dim_nano_volt": 1e-6,
    "mdc_dim_micro_volt": 1e-3,
    "mdc_dim_milli_volt": 1.0,
    "mdc_dim_volt": 1e3,
}

_SEX = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}


# ----------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Obx:
    segment: Segment
    position: int  # 1-based segment index in the message
    sequence: int  # 1-based occurrence among the OBX segments
    set_id: str | None
    value_type: str
    code: str | None
    sub_id: str

    def where(self) -> str:
        set_id = f"OBX {self.set_id}" if self.set_id else "OBX"
        return f"{set_id} (segment {self.position})"

    def location(self, fld: int | None = 5, repetition: int | None = None) -> ErrorLocation:
        return ErrorLocation("OBX", self.sequence, fld, repetition)


@dataclass
class _Order:
    obr: Segment | None
    orc: Segment | None
    obx: list[_Obx] = field(default_factory=list)


@dataclass
class _Channel:
    obx: _Obx
    repetition: int  # 1-based repetition of OBX-5
    number: str | None
    label: str
    lead: str | None
    sensitivity: float
    units_factor: float | None  # to mV; None: no units given
    correction: float
    baseline: float
    skew: float
    fs: float | None
    low: float | None
    high: float | None


@dataclass
class _Group:
    sub_id: str
    channels: list[_Channel] = field(default_factory=list)
    events: list[tuple[str, _Obx]] = field(default_factory=list)  # ("TIM" | "WAV", obx)


def parse_oru_waveform(message: bytes | str) -> Ecg:
    """An ORU^R01 (bytes as received, MLLP framing allowed, or text) -> Ecg in mV.

    Raises DecodeError (not HL7, bad charset, unparseable), UnsupportedInputError (not an
    ORU, no waveform, more than one ECG) and WaveformError (channel definitions and data
    disagree, bad units or rates, non-numeric samples).
    """
    er7 = read_er7(message, find_groups=False)
    facts = msh_facts(er7.message)
    if facts["message_type"] not in WAVEFORM_MESSAGE_TYPES:
        raise with_location(
            UnsupportedInputError(
                f"MSH-9 is {facts['message_type'] or '(empty)'}: ECG waveforms are read from "
                f"{' / '.join(WAVEFORM_MESSAGE_TYPES)}"
            ),
            ErrorLocation("MSH", 1, 9),
        )
    segs = segments(er7.message)
    pid = next((s for s in segs if s.name == "PID"), None)
    orders = _orders(segs)
    patient, patient_flags = _patient(pid)

    native = [o for o in orders if any(x.value_type in ("CD", "NA", "MA") for x in o.obx)]
    if len(native) > 1:
        raise UnsupportedInputError(
            f"message carries {len(native)} waveforms (in {', '.join(_obr_name(o) for o in native)}): "
            "send one ECG per ORU^R01"
        )
    if native:
        order = native[0]
        by_lead, dropped, fs, start, wave_flags, device = _decode_native(er7, order)
        signals, leads, lead_flags = standardise_leads(by_lead, dropped)
        study = _study(order, start, device)
        return Ecg(
            signals=signals,
            leads=leads,
            fs=fs,
            patient=patient,
            study=study,
            source_format="hl7",
            units="mV",
            flags=tuple(lead_flags) + tuple(wave_flags) + tuple(patient_flags),
        )

    embedded = _embedded(er7, orders)
    if embedded is not None:
        order, ecg = embedded
        return _merge_identity(ecg, patient, _study(order, None, None))

    found = sorted({x.value_type or "(empty)" for o in orders for x in o.obx})
    raise UnsupportedInputError(
        "ORU^R01 carries no waveform: expected OBX value type CD+NA/MA (HL7 waveform result) "
        "or ED (embedded DICOM or XML ECG); "
        + (f"found OBX value types {', '.join(found)}" if found else "found no OBX segment")
    )


def _orders(segs: Sequence[Segment]) -> list[_Order]:
    """OBX segments grouped under the OBR before them (OBX before any OBR: no OBR)."""
    orders: list[_Order] = []
    orc: Segment | None = None
    count = 0
    for position, seg in enumerate(segs, start=1):
        if seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            orders.append(_Order(obr=seg, orc=orc))
            orc = None  # an ORC belongs to the OBR that follows it
        elif seg.name == "OBX":
            count += 1
            if not orders:
                orders.append(_Order(obr=None, orc=orc))
            orders[-1].obx.append(
                _Obx(
                    segment=seg,
                    position=position,
                    sequence=count,
                    set_id=field_text(seg, 1),
                    value_type=(field_text(seg, 2) or "").upper(),
                    code=field_text(seg, 3),
                    sub_id=field_text(seg, 4) or "",
                )
            )
    return orders


def _obr_name(order: _Order) -> str:
    if order.obr is None:
        return "OBX before any OBR"
    return f"OBR {field_text(order.obr, 1) or '?'}"


# ---------------------------------------------------------------- native waveform


def _decode_native(
    er7: Er7, order: _Order
) -> tuple[dict[str, np.ndarray], list[str], float, datetime | None, list[str], str | None]:
    """(signals in mV by lead, dropped channels, fs, start time, flags, device) of one OBR."""
    groups: dict[str, _Group] = {}
    for obx in order.obx:
        if obx.value_type == "CD":
            group = groups.setdefault(obx.sub_id, _Group(obx.sub_id))
            group.channels.extend(_channel_definitions(obx, er7.separators))
    if not groups:
        first = next(x for x in order.obx if x.value_type in ("NA", "MA"))
        raise with_location(
            WaveformError(
                f"{first.where()}: waveform data ({first.value_type}) but the message has no "
                "channel definition (OBX value type CD): leads, units and sampling rate unknown"
            ),
            first.location(2),
        )
    for obx in order.obx:
        if obx.value_type in ("NA", "MA", "TS"):
            found = groups.get(obx.sub_id)
            if found is None and obx.sub_id == "" and len(groups) == 1:
                found = next(iter(groups.values()))
            if found is None:
                if obx.value_type == "TS":
                    continue  # a timestamp observation that belongs to no waveform group
                raise with_location(
                    WaveformError(
                        f"{obx.where()}: waveform data ({obx.value_type}) for sub-ID "
                        f"{obx.sub_id or '(empty)'} but no channel definition (CD) OBX has that sub-ID "
                        f"(defined: {', '.join(repr(k) for k in groups)})"
                    ),
                    obx.location(4),
                )
            found.events.append(("TIM" if obx.value_type == "TS" else "WAV", obx))

    all_channels = [c for g in groups.values() for c in g.channels]
    fs = _common_fs(all_channels)
    decoded: list[tuple[_Group, np.ndarray, datetime | None]] = []
    for group in groups.values():
        raw, start = _group_samples(er7, group, fs)
        decoded.append((group, raw, start))
    lengths = {raw.shape[1] for _, raw, _ in decoded}
    if len(lengths) > 1:
        detail = ", ".join(f"sub-ID {g.sub_id or '(empty)'}: {raw.shape[1]}" for g, raw, _ in decoded)
        raise WaveformError(f"waveform groups have different numbers of samples ({detail})")
    starts = [s for _, _, s in decoded if s is not None]
    start = starts[0] if starts else None
    for other in starts[1:]:
        if abs(_seconds_between(other, start)) > 0.5 / fs:  # type: ignore[arg-type]
            raise WaveformError(
                f"waveform groups start at different times ({hl7_timestamp(start, naive_ok=True)} "  # type: ignore[arg-type]
                f"and {hl7_timestamp(other, naive_ok=True)})"
            )

    by_lead: dict[str, np.ndarray] = {}
    first_channel: dict[str, _Channel] = {}
    dropped: list[str] = []
    units_assumed = skew_ignored = False
    for group, raw, _ in decoded:
        for index, channel in enumerate(group.channels):
            if channel.lead is None:
                dropped.append(channel.label)
                continue
            if channel.lead in first_channel:
                earlier = first_channel[channel.lead]
                raise with_location(
                    WaveformError(
                        f"{channel.obx.where()}: lead {channel.lead} is defined twice (channel "
                        f"{_channel_ref(earlier)} and channel {_channel_ref(channel)})"
                    ),
                    channel.obx.location(5, channel.repetition),
                )
            first_channel[channel.lead] = channel
            values = raw[index]
            _check_range(channel, values)
            factor = channel.units_factor
            if factor is None:
                factor, units_assumed = 1e-3, True
            mv = (values - channel.baseline) * (channel.sensitivity * channel.correction * factor)
            if not np.all(np.isfinite(mv)):
                raise with_location(
                    WaveformError(
                        f"{channel.obx.where()}: lead {channel.lead}: samples are not "
                        "finite after scaling (check sensitivity and correction factor)"
                    ),
                    channel.obx.location(5, channel.repetition),
                )
            skew_ignored = skew_ignored or channel.skew != 0
            by_lead[channel.lead] = mv
    flags: list[str] = []
    if units_assumed:
        flags.append("units_assumed:uV")
    if skew_ignored:
        flags.append("time_skew_ignored")
    cd_obx = next(x for x in order.obx if x.value_type == "CD")
    device = field_text(cd_obx.segment, 18)
    return by_lead, dropped, fs, start, flags, device


def _channel_ref(channel: _Channel) -> str:
    number = channel.number or str(channel.repetition)
    return f"{number} in {channel.obx.where()}"


def _seconds_between(a: datetime, b: datetime) -> float:
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return (a - b).total_seconds()


def _channel_definitions(obx: _Obx, separators: Separators) -> list[_Channel]:
    """The CD repetitions of one OBX-5, sticky defaults applied."""
    seg = obx.segment
    reps = [f for f in seg.children if f.name == "OBX_5"]
    if not reps:
        raise with_location(WaveformError(f"{obx.where()}: channel definition (CD) is empty"), obx.location(5))
    sticky: dict[str, Any] = {
        "sensitivity": None,
        "units": None,
        "correction": None,
        "baseline": None,
        "skew": None,
        "fs": None,
        "low": None,
        "high": None,
    }
    channels: list[_Channel] = []
    for r, fld in enumerate(reps, start=1):

        def text(c: int, s: int = 1) -> str | None:
            return component_text(fld, c, s, encoding=separators)

        def number(c: int, s: int, what: str) -> float | None:
            value = text(c, s)
            if value is None:
                return None
            try:
                result = float(value)
            except ValueError:
                result = math.nan
            if not math.isfinite(result):
                raise with_location(
                    WaveformError(f"{obx.where()}: channel {r}: {what} {value[:20]!r} is not a number"),
                    obx.location(5, r),
                )
            return result

        number_text = text(1, 1)
        name = text(1, 2)
        source1, source2 = text(2, 1), text(2, 2)
        sensitivity = number(3, 1, "channel sensitivity (CSU-1)")
        unit_id, unit_text, unit_system = text(3, 2), text(3, 3), text(3, 4)
        values = {
            "correction": number(4, 1, "sensitivity correction factor (CCP-1)"),
            "baseline": number(4, 2, "baseline (CCP-2)"),
            "skew": number(4, 3, "time skew (CCP-3)"),
            "fs": number(5, 1, "sampling frequency (CD-5)"),
            "low": number(6, 1, "minimum data value (NR-1)"),
            "high": number(6, 2, "maximum data value (NR-2)"),
        }
        if sensitivity is not None or unit_id or unit_text:
            sticky["sensitivity"] = sensitivity
            sticky["units"] = (unit_id, unit_text, unit_system)
        for key, value in values.items():
            if value is not None:
                sticky[key] = value
        label = name or source1 or (f"channel {number_text}" if number_text else f"channel {r}")
        label = re.sub(r"[,\s]+", " ", label).strip()
        lead = lead_for_channel_name(name) or lead_for_channel_name(source1 if not source2 else None)
        if lead is None and source1 and source2:
            lead = _BIPOLAR.get((source1.strip().upper(), source2.strip().upper()))
        sens = sticky["sensitivity"]
        if sens is not None and sens == 0:
            raise with_location(
                WaveformError(f"{obx.where()}: channel {r} ({label}): channel sensitivity is 0"),
                obx.location(5, r),
            )
        factor = None
        units = sticky["units"]
        if lead is not None and units is not None and (units[0] or units[1]):
            factor = _units_to_mv(units)
            if factor is None:
                raise with_location(
                    WaveformError(
                        f"{obx.where()}: channel {r} ({label}): channel sensitivity units "
                        f"{units[0] or '(no code)'} ({units[1] or 'no text'}) are not a voltage unit"
                    ),
                    obx.location(5, r),
                )
        correction = sticky["correction"]
        if correction is not None and correction == 0:
            raise with_location(
                WaveformError(f"{obx.where()}: channel {r} ({label}): sensitivity correction factor is 0"),
                obx.location(5, r),
            )
        channels.append(
            _Channel(
                obx=obx,
                repetition=r,
                number=number_text,
                label=label,
                lead=lead,
                sensitivity=1.0 if sens is None else sens,
                units_factor=factor,
                correction=1.0 if correction is None else correction,
                baseline=sticky["baseline"] or 0.0,
                skew=sticky["skew"] or 0.0,
                fs=sticky["fs"],
                low=sticky["low"],
                high=sticky["high"],
            )
        )
    return channels


def lead_for_channel_name(name: str | None) -> str | None:
    """A channel name / waveform source as a standard lead, or None if it is not one.

    Accepts standard names in any case (``AVR``), "Lead II"-style meanings, MDC
    reference ids (``MDC_ECG_LEAD_AVF``) and codes (``131329``, ``2:1``), SCP-ECG codes
    (``5.6.3-9-1``), with an optional ``ECG``/``LEAD`` prefix.
    """
    if not name:
        return None
    raw = name.strip()
    key = raw.upper()
    if key in _LEAD_BY_UPPER:
        return _LEAD_BY_UPPER[key]
    if raw.lower() in LEAD_BY_MEANING:
        return LEAD_BY_MEANING[raw.lower()]
    if key in MDC_LEAD_REFIDS:
        return MDC_LEAD_REFIDS[key]
    if raw in MDC_LEAD_CODES:
        return MDC_LEAD_CODES[raw]
    if raw in SCPECG_LEAD_CODES:
        return SCPECG_LEAD_CODES[raw]
    stripped = re.sub(r"^(?:ECG|EKG|LEAD)[\s_\-]*", "", key)
    stripped = re.sub(r"^(?:LEAD)[\s_\-]*", "", stripped)
    if stripped != key and stripped in _LEAD_BY_UPPER:
        return _LEAD_BY_UPPER[stripped]
    return None


def _units_to_mv(units: tuple[str | None, str | None, str | None]) -> float | None:
    unit_id, unit_text, _system = units
    for candidate in (unit_id, unit_text):
        if not candidate:
            continue
        key = candidate.strip().lower()
        if key in _UNIT_TO_MV:
            return _UNIT_TO_MV[key]
        if key.endswith("s") and key[:-1] in _UNIT_TO_MV:
            return _UNIT_TO_MV[key[:-1]]
    return None


def _common_fs(channels: Sequence[_Channel]) -> float:
    """The one sampling frequency all channels share; WaveformError naming the first odd one."""
    for channel in channels:
        if channel.fs is None:
            raise with_location(
                WaveformError(
                    f"{channel.obx.where()}: channel {channel.repetition} ({channel.label}) "
                    "has no sampling frequency (CD-5)"
                ),
                channel.obx.location(5, channel.repetition),
            )
        if channel.fs <= 0:
            raise with_location(
                WaveformError(
                    f"{channel.obx.where()}: channel {channel.repetition} ({channel.label}) "
                    f"sampling frequency must be > 0 (got {channel.fs:g})"
                ),
                channel.obx.location(5, channel.repetition),
            )
    first = channels[0]
    for channel in channels[1:]:
        if abs(channel.fs - first.fs) > 1e-9 * first.fs:  # type: ignore[operator]
            raise with_location(
                WaveformError(
                    f"{channel.obx.where()}: channel {channel.repetition} ({channel.label}) sampling "
                    f"frequency {channel.fs:g} Hz differs from {first.fs:g} Hz of channel "
                    f"{first.repetition} ({first.label}) in {first.obx.where()}: all channels must "
                    "share one rate"
                ),
                channel.obx.location(5, channel.repetition),
            )
    return float(first.fs)  # type: ignore[arg-type]


def _group_samples(er7: Er7, group: _Group, fs: float) -> tuple[np.ndarray, datetime | None]:
    """Raw samples (channels x samples) of one sub-ID group, and its start time."""
    n_channels = len(group.channels)
    blocks: list[np.ndarray] = []
    start: datetime | None = None
    n_so_far = 0
    for kind, obx in group.events:
        if kind == "TIM":
            try:
                when = parse_hl7_timestamp(field_text(obx.segment, 5))
            except ValueError as exc:
                raise with_location(
                    WaveformError(f"{obx.where()}: time of first sample is not an HL7 timestamp"),
                    obx.location(5),
                ) from exc
            if when is None:
                continue
            if start is None:
                if n_so_far:
                    raise with_location(
                        WaveformError(
                            f"{obx.where()}: time of first sample (TS) comes after {n_so_far} samples of data"
                        ),
                        obx.location(5),
                    )
                start = when
            else:
                expected = n_so_far / fs
                actual = _seconds_between(when, start)
                if abs(actual - expected) > 0.5 / fs:
                    raise with_location(
                        WaveformError(
                            f"{obx.where()}: a new time of first sample {actual:.3f} s after the start, "
                            f"where {n_so_far} samples end at {expected:.3f} s: waveforms with gaps "
                            "or overlaps are not supported"
                        ),
                        obx.location(5),
                    )
            continue
        payload = er7.deferred_value(obx.segment)
        if not payload:
            raise with_location(
                WaveformError(f"{obx.where()}: waveform data ({obx.value_type}) is empty"), obx.location(5)
            )
        block = _samples(payload, obx, n_channels, er7.separators)
        n_so_far += block.shape[1]
        blocks.append(block)
    if not blocks:
        first = group.channels[0].obx
        raise with_location(
            WaveformError(
                f"{first.where()}: channel definition for sub-ID {group.sub_id or '(empty)'} has no "
                "waveform data (no OBX value type NA or MA with that sub-ID)"
            ),
            first.location(4),
        )
    return np.concatenate(blocks, axis=1), start


def _samples(payload: str, obx: _Obx, n_channels: int, separators: Separators) -> np.ndarray:
    """One NA / MA OBX-5 -> raw samples (channels x samples), shape checked against CD."""
    comp, rep = separators.component, separators.repetition
    reps = payload.split(rep)
    if obx.value_type == "NA":
        if len(reps) != n_channels:
            hint = ""
            if len(reps) == 1 and n_channels > 1:
                hint = (
                    " (NA waveform data is channel-block: one '" + rep + "'-separated repetition "
                    "per channel; samples interleaved by time point are MA)"
                )
            raise with_location(
                WaveformError(
                    f"{obx.where()}: channel definition lists {n_channels} channels but the NA data "
                    f"has {len(reps)} channel blocks{hint}"
                ),
                obx.location(5),
            )
        rows = [_numbers(r, comp, obx, lambda i, c=c: f"sample {i + 1} of channel {c + 1}") for c, r in enumerate(reps)]
        lengths = {len(row) for row in rows}
        if len(lengths) > 1:
            counts = ", ".join(f"channel {c + 1}: {len(row)}" for c, row in enumerate(rows))
            raise with_location(
                WaveformError(f"{obx.where()}: NA channel blocks differ in length ({counts})"),
                obx.location(5),
            )
        return np.stack(rows)
    # MA: repetitions are time samples, components the channels of one sample.
    sample_counts = [r.count(comp) + 1 for r in reps]
    for index, count in enumerate(sample_counts):
        if count != n_channels:
            raise with_location(
                WaveformError(
                    f"{obx.where()}: channel definition lists {n_channels} channels but time sample "
                    f"{index + 1} of the MA data has {count} values"
                ),
                obx.location(5, index + 1),
            )
    flat = _numbers(
        payload.replace(rep, comp), comp, obx, lambda i: f"sample {i // n_channels + 1} of channel {i % n_channels + 1}"
    )
    return flat.reshape(len(reps), n_channels).T


def _numbers(text: str, sep: str, obx: _Obx, describe: Any) -> np.ndarray:
    tokens = text.split(sep)
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None:
        bad = np.flatnonzero(~np.isfinite(values))
        if not bad.size:
            return values
        index = int(bad[0])
    else:
        index = next(i for i, t in enumerate(tokens) if not _is_number(t))
    token = tokens[index]
    shown = repr(token[:20]) if token else "empty"
    raise with_location(
        WaveformError(f"{obx.where()}: {describe(index)} is not a number ({shown})"),
        obx.location(5),
    )


def _is_number(token: str) -> bool:
    try:
        return math.isfinite(float(token))
    except ValueError:
        return False


def _check_range(channel: _Channel, values: np.ndarray) -> None:
    low, high = channel.low, channel.high
    if low is None and high is None:
        return
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    outside = np.flatnonzero((values < lo) | (values > hi))
    if outside.size:
        i = int(outside[0])
        raise with_location(
            WaveformError(
                f"{channel.obx.where()}: lead {channel.lead}: sample {i + 1} = {values[i]:g} is outside "
                f"the declared range {lo:g}..{hi:g} (CD-6)"
            ),
            channel.obx.location(5, channel.repetition),
        )


# ------------------------------------------------------------------ embedded files


def _embedded(er7: Er7, orders: Sequence[_Order]) -> tuple[_Order, Ecg] | None:
    """The one embedded ECG file (OBX ED), decoded; None when there is none."""
    found: list[tuple[_Order, _Obx, bytes, str]] = []
    for order in orders:
        for obx in order.obx:
            if obx.value_type != "ED":
                continue
            data, subtype = _ed_bytes(er7, obx)
            kind = _sniff(data, subtype)
            if kind is not None:
                found.append((order, obx, data, kind))
    if not found:
        return None
    if len(found) > 1:
        raise UnsupportedInputError(
            f"message carries {len(found)} embedded ECG files ({', '.join(o.where() for _, o, _, _ in found)}): "
            "send one ECG per ORU^R01"
        )
    order, obx, data, kind = found[0]
    try:
        if kind == "dicom":
            from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg

            ecg = to_ecg(read_bytes(data, force=data[128:132] != b"DICM"))
        else:
            try:
                from ecgbridge.mapping.vendor import read_xml
            except ImportError as exc:
                raise UnsupportedInputError(
                    f"{obx.where()}: embedded XML ECG, but the XML readers (mapping.vendor) are not installed"
                ) from exc
            ecg = read_xml(data)
    except InputError as exc:
        located = type(exc)(f"{obx.where()}: embedded {kind.upper()}: {exc.message}", detail=exc.detail)
        raise with_location(located, obx.location(5)) from exc
    return order, ecg


def _ed_bytes(er7: Er7, obx: _Obx) -> tuple[bytes, str | None]:
    fields = parse_deferred_field(er7, obx.segment)
    if not fields:
        raise with_location(WaveformError(f"{obx.where()}: encapsulated data (ED) is empty"), obx.location(5))
    if len(fields) > 1:
        raise with_location(
            UnsupportedInputError(f"{obx.where()}: encapsulated data (ED) repeats: one file per OBX is supported"),
            obx.location(5),
        )
    fld = fields[0]
    subtype = component_text(fld, 3)
    encoding = (component_text(fld, 4) or "").strip().upper()
    text = component_text(fld, 5)
    if not text:
        raise with_location(WaveformError(f"{obx.where()}: encapsulated data (ED-5) is empty"), obx.location(5))
    try:
        if encoding in ("BASE64", "B64"):
            data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
        elif encoding == "HEX":
            data = bytes.fromhex(re.sub(r"\s+", "", text))
        elif encoding in ("A", ""):
            data = text.encode("utf-8")
        else:
            raise with_location(
                UnsupportedInputError(f"{obx.where()}: ED encoding {encoding!r} is not supported (Base64, Hex or A)"),
                obx.location(5),
            )
    except (binascii.Error, ValueError) as exc:
        raise with_location(
            DecodeError(f"{obx.where()}: encapsulated data is not valid {encoding.title() or 'text'}"),
            obx.location(5),
        ) from exc
    return data, subtype


def _sniff(data: bytes, subtype: str | None) -> str | None:
    """ "dicom" | "xml" by content (the subtype is only a hint), None for other files (PDF)."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return "xml"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with BOM (Philips 1.04 exports)
        try:
            if data[2:64].decode("utf-16-le" if data[:2] == b"\xff\xfe" else "utf-16-be").lstrip().startswith("<"):
                return "xml"
        except UnicodeDecodeError:
            pass
    if (subtype or "").strip().upper() == "DICOM" and not head.startswith(b"%PDF"):
        return "dicom"  # a bare data set without preamble; read_bytes(force=True) decides
    return None


def _merge_identity(ecg: Ecg, patient: Patient, study: Study) -> Ecg:
    """HL7 PID and order numbers win; the embedded file keeps its UIDs and fills the rest."""
    inner = ecg.patient
    flags = [f for f in ecg.flags]
    pid: str | None
    issuer: str | None
    if patient.id:
        if inner.id and inner.id != patient.id:
            flags.append("patient_id_overrides_embedded")
        flags = [f for f in flags if f != "no_patient_id"]
        pid, issuer = patient.id, patient.id_issuer
    else:
        pid, issuer = inner.id, inner.id_issuer
        if not pid and "no_patient_id" not in flags:
            flags.append("no_patient_id")
    merged_patient = Patient(
        id=pid,
        id_issuer=issuer,
        name=patient.name or inner.name,
        birth_date=patient.birth_date or inner.birth_date,
        sex=patient.sex if patient.sex not in (None, "unknown") else (inner.sex or patient.sex),
    )
    es = ecg.study
    merged_study = replace(
        es,
        placer_order_number=study.placer_order_number or es.placer_order_number,
        filler_order_number=study.filler_order_number or es.filler_order_number,
        acquired_at=es.acquired_at or study.acquired_at,
        device=es.device or study.device,
    )
    flags.append(f"embedded:{ecg.source_format}")
    return replace(ecg, patient=merged_patient, study=merged_study, source_format="hl7", flags=tuple(flags))


# ------------------------------------------------------------- patient and study


def _patient(pid: Segment | None) -> tuple[Patient, list[str]]:
    flags: list[str] = []
    if pid is None:
        return Patient(), ["no_patient_id"]
    patient_id = field_text(pid, 3, 1)
    issuer = field_text(pid, 3, 4, 1) or field_text(pid, 3, 4, 2)
    if not patient_id:  # PID-2 (external id) in v2.3-era messages
        patient_id = field_text(pid, 2, 1)
        issuer = field_text(pid, 2, 4, 1) or field_text(pid, 2, 4, 2)
    if not patient_id:
        flags.append("no_patient_id")
    family = field_text(pid, 5, 1, 1)
    given, middle = field_text(pid, 5, 2), field_text(pid, 5, 3)
    suffix, prefix = field_text(pid, 5, 4), field_text(pid, 5, 5)
    # DICOM PN order (Family^Given^Middle^Prefix^Suffix), as every reader stores names.
    name = "^".join(p or "" for p in (family, given, middle, prefix, suffix)).rstrip("^") or None
    birth_date = None
    raw_birth = field_text(pid, 7)
    if raw_birth:
        digits = raw_birth[:8]
        try:
            birth_date = datetime.strptime(digits, "%Y%m%d").date().isoformat() if len(digits) == 8 else None
        except ValueError:
            birth_date = None
        if birth_date is None:
            flags.append("invalid_birth_date")
    sex_code = (field_text(pid, 8) or "").upper()
    sex = _SEX.get(sex_code, "unknown")
    return Patient(id=patient_id, id_issuer=issuer, name=name, birth_date=birth_date, sex=sex), flags


def _study(order: _Order, start: datetime | None, device: str | None) -> Study:
    obr, orc = order.obr, order.orc
    placer = (field_text(obr, 2) if obr is not None else None) or (field_text(orc, 2) if orc is not None else None)
    filler = (field_text(obr, 3) if obr is not None else None) or (field_text(orc, 3) if orc is not None else None)
    acquired = start
    if acquired is None and obr is not None:
        try:
            acquired = parse_hl7_timestamp(field_text(obr, 7))
        except ValueError:
            acquired = None
    return Study(acquired_at=acquired, device=device, placer_order_number=placer, filler_order_number=filler)
