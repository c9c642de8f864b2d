"""The ORU^R01 a cart would send for an :class:`~mapping.ecg.Ecg` (test support).

Why here: the product only reads waveform ORU^R01 (``ecgbridge.mapping.hl7_waveform``);
tests, fixtures (tests/fixtures/hl7/make_hl7_fixtures.py) and benchmarks need a writer
that follows the same rules, so that what the reader accepts is checked by round trips
on real records.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from ecgbridge.mapping.codes import LOINC
from ecgbridge.mapping.ecg import Ecg, Patient
from ecgbridge.mapping.hl7_common import Separators, escape, hl7_charset, hl7_timestamp, read_er7

__all__ = ["build_oru_waveform", "build_oru_ed", "OBX_CODING_SYSTEM", "MAX_OBX5_CHARS"]

#: OBX-3 coding system of the waveform OBX this module writes (HL7 "99zzz": local).
OBX_CODING_SYSTEM = "99ECGBRIDGE"
_OBX3 = {
    "CD": ("CHN", "Waveform channel definition"),
    "TS": ("TIM", "Waveform time of first sample"),
    "NA": ("WAV", "Waveform data"),
    "MA": ("WAV", "Waveform data"),
    "ED": ("ECGFILE", "Embedded ECG file"),
}
#: The v2.3 waveform chapter's limit for one OBX-5; longer data goes into successive OBX.
MAX_OBX5_CHARS = 65536
_SEX_CODE = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


def build_oru_waveform(
    ecg: Ecg,
    *,
    control_id: str,
    sending_application: str = "CART",
    sending_facility: str = "WARD",
    receiving_application: str = "ECGBRIDGE",
    receiving_facility: str = "",
    placer_order_number: str | None = None,
    filler_order_number: str | None = None,
    version: str = "2.5.1",
    encoding: str = "UTF-8",
    form: str = "NA",
    sensitivity_uv: float = 1.0,
    sent_at: datetime | None = None,
    accept_ack_type: str | None = None,
    application_ack_type: str | None = None,
) -> str:
    """The ORU^R01 a cart would send for ``ecg``, as ER7 text (``\\r`` separators).

    Samples are integers in units of ``sensitivity_uv`` microvolts (CSU ``uV`` UCUM), one CD
    OBX with a repetition per lead, a TS OBX, then NA (channel-block) or MA (multiplexed)
    OBX split so that no OBX-5 exceeds :data:`MAX_OBX5_CHARS`. Built with hl7apy on the
    2.5.1 definitions (MSH-12 says ``version``) and validated strictly before returning.
    Encode the text with :func:`mapping.hl7_common.python_codec` of its MSH-18.
    """
    form = form.upper()
    if form not in ("NA", "MA"):
        raise ValueError(f"form must be NA or MA, not {form!r}")
    if not sensitivity_uv > 0 or not math.isfinite(sensitivity_uv):
        raise ValueError("sensitivity_uv must be a positive number")
    samples = np.rint(np.asarray(ecg.signals, dtype=np.float64) * (1000.0 / sensitivity_uv))
    if not np.all(np.isfinite(samples)):
        raise ValueError("ECG signals hold NaN or infinite values")
    ints = samples.astype(np.int64)
    peak = int(np.max(np.abs(ints))) if ints.size else 0
    bits = 16 if peak <= 32767 else 32
    if peak > 2**31 - 1:
        raise ValueError(f"samples exceed 32 bits at {sensitivity_uv} uV per unit; raise sensitivity_uv")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    message, oo, enc = _header(
        ecg.patient,
        control_id=control_id,
        sending_application=sending_application,
        sending_facility=sending_facility,
        receiving_application=receiving_application,
        receiving_facility=receiving_facility,
        version=version,
        encoding=encoding,
        sent_at=sent_at,
        accept_ack_type=accept_ack_type,
        application_ack_type=application_ack_type,
    )
    acquired = ecg.study.acquired_at or sent_at or datetime.now(UTC)
    _order(
        oo,
        placer_order_number or ecg.study.placer_order_number,
        filler_order_number or ecg.study.filler_order_number,
        acquired,
    )

    sens = _nm(sensitivity_uv)
    cd = []
    for number, lead in enumerate(ecg.leads, start=1):
        name = escape(lead, enc)
        cd.append(f"{number}&{name}^{name}^{sens}&uV&microvolt&UCUM^1&0&0^{_nm(ecg.fs)}^{low}&{high}")
    set_id = 1
    _obx(oo, set_id, "CD", cd, sub_id="1")
    set_id += 1
    _obx(oo, set_id, "TS", [hl7_timestamp(acquired, naive_ok=True)], sub_id="1")
    payloads: dict[str, str] = {}
    for chunk in _chunks(ints):
        set_id += 1
        key = f"ecgbridge-payload-{len(payloads)}"
        payloads[key] = _payload(chunk, form, enc)
        _obx(oo, set_id, form, [key], sub_id="1")
    return _finish(message, payloads)


def build_oru_ed(
    payload: bytes,
    subtype: str,
    *,
    control_id: str,
    patient: Patient | None = None,
    acquired_at: datetime | None = None,
    sending_application: str = "CART",
    sending_facility: str = "WARD",
    receiving_application: str = "ECGBRIDGE",
    receiving_facility: str = "",
    placer_order_number: str | None = None,
    filler_order_number: str | None = None,
    version: str = "2.5.1",
    encoding: str = "UTF-8",
    type_of_data: str = "Application",
    sent_at: datetime | None = None,
) -> str:
    """An ORU^R01 carrying one file (DICOM, XML) base64-encoded in an ED OBX, validated."""
    if not payload:
        raise ValueError("payload is empty")
    message, oo, enc = _header(
        patient or Patient(),
        control_id=control_id,
        sending_application=sending_application,
        sending_facility=sending_facility,
        receiving_application=receiving_application,
        receiving_facility=receiving_facility,
        version=version,
        encoding=encoding,
        sent_at=sent_at,
        accept_ack_type=None,
        application_ack_type=None,
    )
    _order(oo, placer_order_number, filler_order_number, acquired_at or sent_at or datetime.now(UTC))
    key = "ecgbridge-payload-0"
    value = "^".join((escape(sending_application, enc), escape(type_of_data, enc), escape(subtype, enc), "Base64", key))
    _obx(oo, 1, "ED", [value], sub_id="")
    return _finish(message, {key: base64.b64encode(payload).decode("ascii")})


def _nm(value: float) -> str:
    """An NM value without float noise: 500.0 -> '500', 0.5 -> '0.5'."""
    return f"{value:.10g}"


def _header(
    patient: Patient,
    *,
    control_id: str,
    sending_application: str,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    version: str,
    encoding: str,
    sent_at: datetime | None,
    accept_ack_type: str | None,
    application_ack_type: str | None,
) -> tuple[Message, Any, Separators]:
    if not control_id:
        raise ValueError("control_id is required (MSH-10); never reuse one")
    if not patient.id:
        raise ValueError("patient.id is required: PID-3 is required in ORU^R01")
    charset = hl7_charset(encoding)
    message = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    enc = Separators.of(message.encoding_chars)
    msh = message.msh
    msh.msh_3 = escape(sending_application, enc)
    msh.msh_4 = escape(sending_facility, enc)
    msh.msh_5 = escape(receiving_application, enc)
    if receiving_facility:
        msh.msh_6 = escape(receiving_facility, enc)
    msh.msh_7 = hl7_timestamp(sent_at or datetime.now(UTC))
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = escape(control_id, enc)
    msh.msh_11 = "P"
    msh.msh_12 = escape(version, enc)
    if accept_ack_type:
        msh.msh_15 = accept_ack_type
    if application_ack_type:
        msh.msh_16 = application_ack_type
    msh.msh_18 = charset
    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    pid.pid_1 = "1"
    issuer = f"^^^{escape(patient.id_issuer, enc)}" if patient.id_issuer else "^^^"
    pid.pid_3 = f"{escape(patient.id, enc)}{issuer}^MR"
    pid.pid_5 = _xpn(patient.name, enc)
    if patient.birth_date:
        pid.pid_7 = patient.birth_date.replace("-", "")
    if patient.sex:
        pid.pid_8 = _SEX_CODE.get(patient.sex, "U")
    return message, result.oru_r01_order_observation, enc


def _xpn(name: str | None, enc: Separators) -> str:
    """A DICOM-order name (Family^Given^Middle^Prefix^Suffix) as XPN; ``""`` (null) if none."""
    if not name:
        return '""'
    parts = (name.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p, enc) for p in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _order(oo: Any, placer: str | None, filler: str | None, acquired: datetime) -> None:
    enc = Separators.of(oo.encoding_chars)
    if placer or filler:
        oo.orc.orc_1 = "RE"
        if placer:
            oo.orc.orc_2 = escape(placer, enc)
        if filler:
            oo.orc.orc_3 = escape(filler, enc)
    obr = oo.obr
    obr.obr_1 = "1"
    if placer:
        obr.obr_2 = escape(placer, enc)
    if filler:
        obr.obr_3 = escape(filler, enc)
    code, display = LOINC["ecg_panel"]
    obr.obr_4 = f"{code}^{escape(display, enc)}^LN"
    obr.obr_7 = hl7_timestamp(acquired, naive_ok=True)
    obr.obr_25 = "F"


def _obx(oo: Any, set_id: int, value_type: str, values: Sequence[str], *, sub_id: str) -> None:
    """Append one OBX (values: ER7 text of each OBX-5 repetition, already escaped)."""
    group = oo.add_group("ORU_R01_OBSERVATION")
    obx = group.obx
    obx.obx_1 = str(set_id)
    obx.obx_2 = value_type
    code, text = _OBX3[value_type]
    obx.obx_3 = f"{code}^{text}^{OBX_CODING_SYSTEM}"
    if sub_id:
        obx.obx_4 = sub_id
    obx.obx_5 = values[0]
    for value in values[1:]:
        obx.add_field("OBX_5").value = value
    obx.obx_11 = "F"


def _chunks(ints: np.ndarray) -> list[np.ndarray]:
    """Time slices of the samples so that each OBX-5 stays within MAX_OBX5_CHARS."""
    n_channels, n_samples = ints.shape
    widest = max(len(str(int(ints.min()))), len(str(int(ints.max())))) + 1 if ints.size else 2
    per_slice = max(1, MAX_OBX5_CHARS // (n_channels * widest))
    return [ints[:, i : i + per_slice] for i in range(0, n_samples, per_slice)] or [ints]


def _payload(chunk: np.ndarray, form: str, enc: Separators) -> str:
    comp, rep = enc.component, enc.repetition
    rows = chunk if form == "NA" else chunk.T
    return rep.join(comp.join(map(str, row.tolist())) for row in rows)


def _finish(message: Message, payloads: dict[str, str]) -> str:
    """Validate, serialise, put the payloads in, and check the result parses strictly."""
    message.validate()
    text = message.to_er7()
    for key, value in payloads.items():
        text = text.replace(key, value, 1)
    read_er7(text, validate=True, validate_as="2.5.1")
    return text
