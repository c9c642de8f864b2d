"""Map an :class:`~mapping.ecg.AnalysisResult` to an HL7 v2.5.1 ORU^R01 (pure, no I/O).

The message is built element by element with hl7apy (never by joining strings), so
every text is escaped by the encoder, and it is checked with hl7apy's strict
validation at v2.5.1 before it is returned. Layout::

    MSH                 MSH-10 = the caller's control id (the same on every retry)
    PID                 PATIENT group; left out only when no patient id is known at all
    PV1                 VISIT group: PV1-2 patient class (or U), PV1-19 visit number
    ORC                 RE; ORC-2/3 placer/filler, ORC-4 group, ORC-12 ordering provider
    OBR                 OBR-2/3 as ORC, OBR-4 ordered service (or LOINC 34534-8),
                        OBR-7 acquisition, OBR-22 report time, OBR-24 EC, OBR-25 P
    NTE ...             report notes: the label, one summary line per model (and one for its
                        predicted abnormalities, or why they were withheld), the flags
    OBX + NTE ...       per model output, in this order (each OBX followed by an NTE with
                        the label, as every FHIR Observation carries it in its note):
                        CWE   one per finding present: 8601-7 EKG impression, value SNOMED CT
                              (and the model's own code as the alternate coding)
                        NM    one per ECG measurement: LOINC, UCUM units
                        NM    one per class probability: local code, 0..1, UCUM "1"
                        CWE   one per risk tier, when the findings carry one
                        NM    one per clinical abnormality predicted from the ECG (the
                              knowledge-transfer model's explanations): local code
                              ``<head>-predicted``, the probability, OBX-8 POS / NEG, and
                              NTEs "ECG pattern associated with elevated NT-proBNP, p=0.81
                              (predicted from the ECG, not measured)" + what it is not
                        ...   (the next output's OBX)
                        ED    the PDF report (once, after all outputs), when the result has a
                              PDF attachment whose bytes were passed and the destination wants it

Decisions, and why (mirroring :mod:`mapping.fhir_report` where the two overlap):

* **result status P** (OBR-25, OBX-11): a machine result no clinician has reviewed is
  preliminary, like FHIR ``preliminary``; ``F`` would tell the EHR it is verified.
* **a re-analysis (result ``version`` 2, 3, ...) is a correction, status C** on OBR-25
  and every OBX-11 (FHIR ``amended``), with the same placer / filler numbers, so the EHR
  replaces the result it holds for the order, a report note saying so, and its own MSH-10
  (the caller derives one per version). Version 1 is exactly what it always was.
* **report notes after OBR, not after the last OBX**: an NTE that follows an OBX
  belongs to that OBX's OBSERVATION group (so the standard and hl7apy read it), so the
  label and flags for the whole report go in the ORDER_OBSERVATION group, right after
  OBR. The per-OBX NTE repeats the label because EHRs chart OBX values on their own
  (flowsheets), away from the report notes.
* **one local coding system**, :data:`LOCAL_CODING_SYSTEM`, for model class codes,
  tiers, model ids and the report attachment; SNOMED CT (``SCT``), LOINC (``LN``) and
  UCUM are used wherever a standard code exists.
* **OBX-8 by threshold**: ``A`` when the model's decision points away from normal
  (a finding above its threshold, or the *normal* class below its threshold), else
  ``N``; OBX-7 gives the normal side of the threshold, OBX-9 the probability on the
  impression OBX (HL7's own "probability" field).
* **predicted abnormalities are never coded as the lab they name**: OBX-3 is the local
  ``<head>-predicted`` (never the variable's LOINC), OBX-5 the probability in UCUM ``1``, no
  reference range, OBX-8 POS / NEG (table 0078; never H / L, which say a measured value is out
  of range), and the NTEs say "predicted from the ECG, not measured", as the FHIR
  Observation's ``method`` does (:mod:`mapping.abnormality_result` words both).
* **OBX-17** names the model and version on every OBX (``model@version``), so a
  result in the EHR always says which software produced it.
* **filler order number**: the order's, else the ECG's, else this message id with
  the sending application as namespace, as HL7 asks of a filler reporting without an
  order (an unsolicited result still needs a stable id for later corrections).
* **order fields** arrive as raw ER7 from the order message; they are split and
  unescaped (standard encoding characters ``|^~\\&`` assumed), then re-encoded here.
  A value that does not fit its HL7 type is left out and flagged, not fatal.
* **times**: TS with an offset everywhere. An aware acquisition time keeps its
  offset; a naive one is read in ``assume_tz`` (default: this machine's zone),
  converted to UTC and flagged, as in the FHIR mapping.
* **patient**: PID-3 is the ECG's id (with its issuer); when the ECG has none, the
  order's. A differing order patient id is flagged, never silently swapped in.
* **validation**: the ER7 text is parsed back with hl7apy at STRICT level and
  validated (structure, cardinality, field datatypes); each OBX-5, which hl7apy keeps
  untyped, is checked against its OBX-2 type separately. hl7apy's strict parser reads
  untyped components as ST (199 characters at most), so an ED payload is shortened
  for that one parse and checked as ED on its own.

Errors: anything that makes the message invalid raises
:class:`~ecgbridge.errors.MappingError` (resending cannot fix it).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Any, Protocol, Union

from hl7apy import load_library, load_reference
from hl7apy.base_datatypes import TextualDataType
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Element, Field, Message, Segment, is_base_datatype
from hl7apy.exceptions import ChildNotFound
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_field, parse_message
from hl7apy.validation import Validator

from ecgbridge.errors import MappingError
from ecgbridge.mapping.abnormality_result import detail_text, predicted_abnormalities, sentence, summary_lines
from ecgbridge.mapping.codes import LOINC, SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import (
    NOT_FOR_CLINICAL_USE,
    AnalysisResult,
    Ecg,
    Finding,
    ModelOutput,
    Patient,
    acquisition_time,
    output_summary,
)
from ecgbridge.mapping.hl7_common import DEFAULT_SEPARATORS, Separators, hl7_timestamp, read_header, unescape
from ecgbridge.mapping.lvef_result import LVEF_TASK, explanation_lines, predicted_tier, tier_interpretation
from ecgbridge.mapping.severity_result import severity_of_output


class OruAddressing(Protocol):
    """What the ORU takes from its destination: MSH-3 to MSH-6 and whether the PDF goes along.

    Plain values (an HL7 destination's configuration has them), so this module never
    depends on the settings classes.
    """

    @property
    def sending_application(self) -> str: ...
    @property
    def sending_facility(self) -> str: ...
    @property
    def receiving_application(self) -> str: ...
    @property
    def receiving_facility(self) -> str: ...
    @property
    def include_report_pdf(self) -> bool: ...


__all__ = [
    "HL7_VERSION",
    "MESSAGE_TYPE",
    "LOCAL_CODING_SYSTEM",
    "MEASUREMENT_UNITS",
    "DEFAULT_SERVICE",
    "OruAddressing",
    "build_oru_r01",
    "revision_note",
    "validate_er7",
]

HL7_VERSION = "2.5.1"
#: MSH-9 (message code, trigger event, message structure).
MESSAGE_TYPE: tuple[str, str, str] = ("ORU", "R01", "ORU_R01")
#: HL7 coding-system name (table 0396 style) of every ecgbridge-local code.
LOCAL_CODING_SYSTEM = "ECGBRIDGE"
#: OBR-4 when no order names the service: LOINC 12 lead EKG panel.
DEFAULT_SERVICE: tuple[str, str, str] = (*LOINC["ecg_panel"], "LN")

#: ECG measurement name (``ModelOutput.extra["measurements"]`` key, a ``LOINC`` key)
#: -> UCUM unit (code, text). The order here is the order of the OBX segments.
MEASUREMENT_UNITS: dict[str, tuple[str, str]] = {
    "heart_rate": ("/min", "per minute"),
    "pr_interval": ("ms", "millisecond"),
    "qrs_duration": ("ms", "millisecond"),
    "qt_interval": ("ms", "millisecond"),
    "qtc_interval": ("ms", "millisecond"),
    "p_axis": ("deg", "degree"),
    "qrs_axis": ("deg", "degree"),
    "t_axis": ("deg", "degree"),
    "lvef": ("%", "percent"),
}

_V = HL7_VERSION
_STRICT = VALIDATION_LEVEL.STRICT
_TOLERANT = VALIDATION_LEVEL.TOLERANT
_SNOMED_DISPLAY: dict[str, str] = {code: display for code, display in SUPERCLASS_SNOMED.values()}
_NORMAL_SNOMED = SUPERCLASS_SNOMED["NORM"][0]
_SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
_PDF_CODE = ("REPORT-PDF", "ECG analysis report (PDF)", LOCAL_CODING_SYSTEM)
_NOTE_TYPE = ("RE", "Remark", "HL70364")
_NOTE_SOURCE = "L"  # table 0105: ancillary (filler) department is the source of the comment
_BASE_TYPES = load_library(_V).get_base_datatypes()

#: A value for one field: text, or a tuple of component values (nested for subcomponents).
Value = Union[str, tuple["Value | None", ...], None]


# --------------------------------------------------------------------------- text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(text: str) -> str:
    """Control characters (CR above all: it ends a segment) become one space."""
    return _CONTROL.sub(" ", text).strip()


def _raw(value: Any) -> Value:
    """A raw ER7 field from an earlier message -> plain component tuple (first repetition)."""
    if value is None:
        return None
    seps = DEFAULT_SEPARATORS
    text = str(value).split(seps.repetition, 1)[0]
    if not text.strip():
        return None
    parts: list[Value] = []
    for component in text.split(seps.component):
        subs = [unescape(s, seps) for s in component.split(seps.subcomponent)]
        parts.append(tuple(subs) if len(subs) > 1 else subs[0])
    return tuple(parts) if len(parts) > 1 else parts[0]


def _first_text(value: Value) -> str | None:
    while isinstance(value, tuple):
        value = value[0] if value else None
    return value or None


def _empty(value: Value) -> bool:
    if value is None:
        return True
    if isinstance(value, tuple):
        return all(_empty(v) for v in value)
    return not _clean(value)


# --------------------------------------------------------------------------- hl7apy helpers


def _leaf(datatype: str, text: str) -> Any:
    """The hl7apy base-datatype object for ``text``; textual types escape on encoding.

    hl7apy leaves a backslash alone when it happens to look like an escape sequence,
    so the escape character is escaped here first (``\\E\\``), which hl7apy keeps.
    Textual values skip hl7apy's length limits (a base64 PDF exceeds TX's 64 KiB);
    numbers and times go through its strict factory, which rejects malformed values.
    """
    cls = _BASE_TYPES[datatype]
    if issubclass(cls, TextualDataType):
        return cls(_clean(text).replace("\\", "\\E\\"), validation_level=_TOLERANT)
    return datatype_factory(datatype, text, version=_V, validation_level=_STRICT)


def _fill(element: Element, value: Value) -> None:
    """Set a field / component / subcomponent from a (nested) value tuple."""
    if _empty(value):
        return
    datatype = element.datatype
    if is_base_datatype(datatype, _V):
        text = _first_text(value)
        if text is not None and _clean(text):
            element.value = _leaf(datatype, text)
        return
    if datatype in (None, "varies"):
        raise ValueError(f"{element.name} has no datatype to fill")
    parts = value if isinstance(value, tuple) else (value,)
    for index, part in enumerate(parts, 1):
        if _empty(part):
            continue
        try:
            child = getattr(element, f"{datatype.lower()}_{index}")
        except ChildNotFound:
            break  # more components than the type has: the rest cannot be placed
        _fill(child, part)


def _set(segment: Segment, field: int, value: Value) -> None:
    if not _empty(value):
        _fill(getattr(segment, f"{segment.name.lower()}_{field}"), value)


def _typed_er7(datatype: str, value: Value) -> str:
    """ER7 of ``value`` encoded as ``datatype`` (for OBX-5, which hl7apy keeps untyped)."""
    holder = Field("ZZZ_1", datatype=datatype, version=_V, validation_level=_TOLERANT)
    _fill(holder, value)
    return str(holder.to_er7())


def _hl7_ts(dt: datetime) -> str:
    """TS to the second with its UTC offset (``20240301111500+0100``); naive is refused.

    Whole seconds: some receivers cannot read DTM fractions, and no ECG result needs them.
    """
    return hl7_timestamp(dt.replace(microsecond=0))


def _number(value: float, places: int) -> str:
    text = f"{round(float(value), places):.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _hd(text: str | None) -> Value:
    """A configured HD: ``NAME`` or ``NAME^UNIVERSAL-ID^TYPE``."""
    if not text or not text.strip():
        return None
    parts = tuple(p.strip() for p in text.split(DEFAULT_SEPARATORS.component))
    return parts if len(parts) > 1 else parts[0]


def _ei(value: Any) -> Value:
    """An order number: a plain EI.1, or raw ER7 EI when it carries components."""
    if value is None or not str(value).strip():
        return None
    text = str(value)
    return _raw(text) if DEFAULT_SEPARATORS.component in text else text.strip()


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item:
            seen.setdefault(item, None)
    return list(seen)


# --------------------------------------------------------------------------- content


def _probability(finding: Finding, output: ModelOutput) -> tuple[float, float]:
    p, t = float(finding.probability), float(finding.threshold)
    for name, v in (("probability", p), ("threshold", t)):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise MappingError(f"{output.model} {output.version} finding {finding.code}: {name} {v!r} is not in [0, 1]")
    return p, t


def _is_normal_class(finding: Finding) -> bool:
    return finding.code.upper() == "NORM" or finding.snomed == _NORMAL_SNOMED


def _abnormal_flag(finding: Finding) -> str:
    abnormal = (not finding.present) if _is_normal_class(finding) else finding.present
    return "A" if abnormal else "N"


def _reference_range(finding: Finding, threshold: float) -> str:
    t = f"{threshold:.4f}"
    return f"{t}-1" if _is_normal_class(finding) else f"0-{t}"


def _method(output: ModelOutput) -> Value:
    return (f"{output.model}@{output.version}", f"{output.model} {output.version}", LOCAL_CODING_SYSTEM)


def _finding_value(finding: Finding) -> Value:
    local = (finding.code, finding.display, LOCAL_CODING_SYSTEM)
    if finding.snomed:
        display = _SNOMED_DISPLAY.get(finding.snomed, finding.display)
        return (finding.snomed, display, "SCT", *local)
    return local


class _Obx:
    """One planned OBX: value type, identifier, value and the optional fields."""

    def __init__(
        self, value_type: str, code: Value, value: Value, output: ModelOutput, sub_id: str, **fields: Value
    ) -> None:
        self.value_type = value_type
        self.code = code
        self.value = value
        self.output = output
        self.sub_id = sub_id
        self.fields = fields
        #: Extra NTE comments on this observation, after the not-for-clinical-use label.
        self.notes: list[str] = []


def _report_pdf(result: AnalysisResult, data: Mapping[str, bytes] | None, flags: list[str]) -> str | None:
    """Base64 of the result's PDF attachment, when its bytes are supplied and match its hash."""
    pdfs = [a for a in result.attachments if a.content_type == "application/pdf"]
    if not pdfs:
        return None
    blob = (data or {}).get(pdfs[0].blob_sha256)
    if blob is None:
        flags.append("report_pdf_unavailable")
        return None
    if hashlib.sha256(blob).hexdigest() != pdfs[0].blob_sha256:
        flags.append("report_pdf_hash_mismatch")
        return None
    return base64.b64encode(blob).decode("ascii")


def _lvef_obx(output: ModelOutput, sub: str) -> list[_Obx]:
    """LVEF tier: CWE OBX under LOINC 10230-1 (flag from the tier), the explanation as its NTEs.

    NTE rather than a TX OBX: the explanation is a comment on that observation, and
    NTE-3 (FT) has room for it where a strict 2.5.1 parser limits OBX-5 to 199 characters.
    """
    tier = predicted_tier(output)
    if tier is None:
        return []
    v3 = tier_interpretation(tier, output)
    flag = {"N": "N", "L": "L", "LL": "LL"}.get(v3[0] if v3 else "", "")
    code, display = LOINC["lvef"]
    tier_value = (tier.code, tier.display, LOCAL_CODING_SYSTEM)
    extra: dict[str, Value] = {"flag": flag} if flag else {}
    obx = _Obx("CWE", (code, display, "LN"), tier_value, output, sub, **extra)
    obx.notes = explanation_lines(output)
    return [obx]


def _predicted_obx(output: ModelOutput, sub: str) -> list[_Obx]:
    """One NM OBX per clinical abnormality predicted from the ECG, its wording as the NTEs after it."""
    planned: list[_Obx] = []
    for a in predicted_abnormalities(output):
        obx = _Obx(
            "NM",
            (f"{a.code}-predicted", f"{a.pattern} (predicted, not measured)", LOCAL_CODING_SYSTEM),
            f"{a.probability:.4f}",
            output,
            sub,
            units=("1", None, "UCUM"),
            flag="POS" if a.present else "NEG",
        )
        obx.notes = [sentence(a), detail_text(a, output)]
        planned.append(obx)
    return planned


def _observations(
    result: AnalysisResult,
    include_pdf: bool,
    flags: list[str],
    attachments_data: Mapping[str, bytes] | None = None,
) -> list[_Obx]:
    planned: list[_Obx] = []
    impression = (*LOINC["ecg_impression"], "LN")
    n_impression = 0
    for index, output in enumerate(result.outputs, 1):
        sub = str(index)
        checked = [(f, *_probability(f, output)) for f in output.findings]
        if output.task == LVEF_TASK and checked:
            planned.extend(_lvef_obx(output, sub))
        severity = severity_of_output(output)
        if severity is not None:  # a triage output is summed up by its tier, one impression
            n_impression += 1
            value = (*severity.snomed, "SCT", severity.code, severity.display, LOCAL_CODING_SYSTEM)
            planned.append(_Obx("CWE", impression, value, output, str(n_impression), flag=severity.flag[0]))
        for finding, p, _t in checked:
            if finding.present and output.task != LVEF_TASK and severity is None:
                n_impression += 1
                planned.append(
                    _Obx(
                        "CWE",
                        impression,
                        _finding_value(finding),
                        output,
                        str(n_impression),
                        flag=_abnormal_flag(finding),
                        probability=f"{p:.4f}",
                    )
                )
        measurements = output.extra.get("measurements") if isinstance(output.extra, Mapping) else None
        if isinstance(measurements, Mapping):
            for name in [*MEASUREMENT_UNITS, *sorted(set(measurements) - set(MEASUREMENT_UNITS))]:
                if name not in measurements:
                    continue
                raw = measurements[name]
                if name not in MEASUREMENT_UNITS or name not in LOINC:
                    flags.append(f"measurement_unmapped:{name}")
                    continue
                if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                    flags.append(f"measurement_unusable:{name}")
                    continue
                code, display = LOINC[name]
                unit, unit_text = MEASUREMENT_UNITS[name]
                planned.append(
                    _Obx("NM", (code, display, "LN"), _number(raw, 1), output, sub, units=(unit, unit_text, "UCUM"))
                )
        for finding, p, t in checked:
            planned.append(
                _Obx(
                    "NM",
                    (finding.code, f"{finding.display} probability", LOCAL_CODING_SYSTEM),
                    f"{p:.4f}",
                    output,
                    sub,
                    units=("1", None, "UCUM"),
                    range=_reference_range(finding, t),
                    flag=_abnormal_flag(finding),
                )
            )
        for finding, _p, _t in checked:
            if finding.tier:
                tier = str(finding.tier)
                planned.append(
                    _Obx(
                        "CWE",
                        (f"{finding.code}-tier", f"{finding.display} risk tier", LOCAL_CODING_SYSTEM),
                        (tier, tier.replace("_", " "), LOCAL_CODING_SYSTEM),
                        output,
                        sub,
                    )
                )
        planned.extend(_predicted_obx(output, sub))
    if include_pdf and result.outputs:
        pdf = _report_pdf(result, attachments_data, flags)
        if pdf is not None:
            # One report for the whole result: after every output's OBX, method = the first model.
            planned.append(_Obx("ED", _PDF_CODE, (None, "Application", "PDF", "Base64", pdf), result.outputs[0], "1"))
    return planned


def _patient_identifier(patient: Patient, order: Mapping[str, Any], flags: list[str]) -> Value:
    ordered = _order_value(order, "patient_identifier", flags)
    ordered_id = _first_text(ordered)
    if patient.id:
        if ordered_id and ordered_id.strip() != patient.id.strip():
            flags.append("patient_id_differs_from_order")
        elif ordered_id:
            return ordered  # the order's CX names the assigning authority the EHR knows
        return (patient.id, None, None, _hd(patient.id_issuer))
    return ordered


def _person_name(name: str | None) -> Value:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` -> XPN (suffix, prefix swap places)."""
    if not name or not name.split("=", 1)[0].strip("^ "):
        return (None, None, None, None, None, None, "U")  # name type U: unspecified
    parts = [p.strip() for p in name.split("=", 1)[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return ((family,), given, middle, suffix, prefix)


# --------------------------------------------------------------------------- builder


def revision_note(version: int) -> str:
    """The report note of a corrected result (an NTE after OBR)."""
    return f"Corrected result: version {version}, re-analysed with the current models; it replaces the earlier result."


def build_oru_r01(
    result: AnalysisResult,
    *,
    ecg: Ecg,
    order: Mapping[str, Any] | None,
    destination: OruAddressing,
    message_id: str,
    control_id: str,
    now: datetime | None = None,
    assume_tz: tzinfo | None = None,
    attachments_data: Mapping[str, bytes] | None = None,
    version: int = 1,
) -> str:
    """One analysis as a validated ORU^R01 v2.5.1, ER7-encoded with ``\\r`` separators.

    ``order`` is the stored order's details (raw ER7 values, any may be missing);
    without it the ECG's own placer / filler numbers are used. ``control_id`` becomes
    MSH-10 and must be stable across retries so the receiver can drop a duplicate.
    ``now`` (default: now, UTC; naive is taken as UTC) stamps MSH-7, ORC-9, OBR-22
    and OBX-19. ``attachments_data`` maps an attachment's ``blob_sha256`` to its bytes:
    when the destination wants the report (``include_report_pdf``) and the result's PDF
    attachment is found there, it is sent as an ED OBX (``^Application^PDF^Base64^...``).
    ``version`` >= 2 (a re-analysis) is sent as a correction: result status C.
    Raises :class:`MappingError` when no valid message can be made.
    """
    if not result.outputs:
        raise MappingError("analysis result has no model outputs to report")
    if version < 1:
        raise MappingError(f"result version {version} is not 1 or more")
    status = "P" if version == 1 else "C"
    if not control_id:
        raise MappingError("an ORU^R01 needs a message control id (MSH-10)")
    stamp_dt = now or datetime.now(UTC)
    if stamp_dt.tzinfo is None:
        stamp_dt = stamp_dt.replace(tzinfo=UTC)
    stamp = _hl7_ts(stamp_dt)
    order = dict(order or {})
    patient, study = ecg.patient, ecg.study
    label = result.label or NOT_FOR_CLINICAL_USE
    flags: list[str] = []

    placer = _ei(order.get("placer_order_number")) or _ei(study.placer_order_number)
    filler = (
        _ei(order.get("filler_order_number"))
        or _ei(study.filler_order_number)
        or (message_id, _first_text(_hd(destination.sending_application)))
    )
    acquired_at, time_flag = acquisition_time(study.acquired_at, assume_tz)
    acquired = _hl7_ts(acquired_at) if acquired_at is not None else None
    if time_flag:
        flags.append(time_flag)
    identifier = _patient_identifier(patient, order, flags)
    if _empty(identifier):
        flags.append("no_patient_id")
    observations = _observations(result, destination.include_report_pdf, flags, attachments_data)

    try:
        msg = Message(MESSAGE_TYPE[2], version=_V, validation_level=_TOLERANT)
        msh = msg.msh
        _set(msh, 3, _hd(destination.sending_application))
        _set(msh, 4, _hd(destination.sending_facility))
        _set(msh, 5, _hd(destination.receiving_application))
        _set(msh, 6, _hd(destination.receiving_facility))
        _set(msh, 7, stamp)
        _set(msh, 9, MESSAGE_TYPE)
        _set(msh, 10, control_id)
        _set(msh, 11, "P")
        _set(msh, 12, _V)
        _set(msh, 18, "UNICODE UTF-8")

        patient_result = msg.add_group("ORU_R01_PATIENT_RESULT")
        if not _empty(identifier):
            group = patient_result.add_group("ORU_R01_PATIENT")
            pid = group.add_segment("PID")
            _set(pid, 1, "1")
            _set(pid, 3, identifier)
            _set(pid, 5, _person_name(patient.name))
            if patient.birth_date:
                _set(pid, 7, patient.birth_date.replace("-", ""))
            _set(pid, 8, _SEX.get(patient.sex or "", None))
            pv1 = group.add_group("ORU_R01_VISIT").add_segment("PV1")
            _set(pv1, 1, "1")
            _set(pv1, 2, _order_value(order, "patient_class", flags) or "U")
            _set(pv1, 19, _order_value(order, "visit_number", flags))

        obs_group = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
        orc = obs_group.add_segment("ORC")
        _set(orc, 1, "RE")
        _set(orc, 2, placer)
        _set(orc, 3, filler)
        _set(orc, 4, _order_value(order, "placer_group_number", flags))
        _set(orc, 9, stamp)
        provider = _order_value(order, "ordering_provider", flags, datatype="XCN")
        _set(orc, 12, provider)

        obr = obs_group.add_segment("OBR")
        _set(obr, 1, "1")
        _set(obr, 2, placer)
        _set(obr, 3, filler)
        _set(obr, 4, _order_value(order, "universal_service_id", flags, datatype="CE") or DEFAULT_SERVICE)
        _set(obr, 6, _order_value(order, "requested_at", flags, datatype="TS"))
        _set(obr, 7, acquired)
        _set(obr, 16, provider)
        _set(obr, 22, stamp)
        _set(obr, 24, "EC")
        _set(obr, 25, status)

        notes = [label]
        for o in result.outputs:
            notes.append(output_summary(o))
            notes.extend(summary_lines(o))  # what the model predicted from the ECG, never measured
        if version > 1:
            notes.insert(1, revision_note(version))
        all_flags = _dedupe([*result.quality_flags, *result.ecg_flags, *flags])
        if all_flags:
            notes.append("Flags: " + "; ".join(all_flags) + ".")
        for n, text in enumerate(notes, 1):
            _note(obs_group.add_segment("NTE"), n, text)

        for set_id, planned in enumerate(observations, 1):
            group = obs_group.add_group("ORU_R01_OBSERVATION")
            obx = group.add_segment("OBX")
            _set(obx, 1, str(set_id))
            _set(obx, 2, planned.value_type)
            _set(obx, 3, planned.code)
            _set(obx, 4, planned.sub_id)
            obx.obx_5 = _typed_er7(planned.value_type, planned.value)
            _set(obx, 6, planned.fields.get("units"))
            _set(obx, 7, planned.fields.get("range"))
            _set(obx, 8, planned.fields.get("flag"))
            _set(obx, 9, planned.fields.get("probability"))
            _set(obx, 11, status)
            _set(obx, 14, acquired)
            _set(obx, 17, _method(planned.output))
            _set(obx, 19, stamp)
            for n, text in enumerate([label, *planned.notes], 1):
                _note(group.add_segment("NTE"), n, text)

        er7 = str(msg.to_er7())
    except MappingError:
        raise
    except Exception as exc:
        raise MappingError(f"ORU^R01 could not be built: {_limited(exc)}") from exc
    validate_er7(er7, expected_observations=len(observations))
    return er7


def _note(nte: Segment, set_id: int, text: str) -> None:
    _set(nte, 1, str(set_id))
    _set(nte, 2, _NOTE_SOURCE)
    _set(nte, 3, text)
    _set(nte, 4, _NOTE_TYPE)


_ORDER_TYPES = {
    "patient_identifier": "CX",
    "patient_class": "IS",
    "visit_number": "CX",
    "placer_group_number": "EI",
}


def _order_value(order: Mapping[str, Any], key: str, flags: list[str], datatype: str | None = None) -> Value:
    """A raw order field as a value tuple, or None (flagged) when it does not fit its type."""
    value = _raw(order.get(key))
    if _empty(value):
        return None
    datatype = datatype or _ORDER_TYPES.get(key, "ST")
    try:
        _typed_er7(datatype, value)
    except Exception:
        flags.append(f"order_field_unusable:{key}")
        return None
    return value


# --------------------------------------------------------------------------- validation


def _segments(element: Element, name: str) -> Iterable[Segment]:
    for child in element.children:
        if child.classname == "Segment":
            if child.name == name:
                yield child
        else:
            yield from _segments(child, name)


def _limited(exc: BaseException, limit: int = 300) -> str:
    """An hl7apy message, cut short: some quote the whole offending value."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shorten_ed(er7: str, separators: Separators) -> tuple[str, list[tuple[str, str, str]], bool]:
    """(er7 with ED payloads shortened, [(OBX-1, OBX-2, OBX-5)], whether any was shortened).

    hl7apy's strict parser reads every OBX-5 component as ST (at most 199 characters),
    so an ED payload (a base64 PDF) would fail there although ED-5 is TX; the payload
    is checked against ED on its own instead.
    """
    field_sep, comp_sep = separators.field, separators.component
    segments = er7.split("\r")
    values: list[tuple[str, str, str]] = []
    shortened = False
    for i, segment in enumerate(segments):
        if not segment.startswith("OBX" + field_sep):
            continue
        fields = segment.split(field_sep)
        value_type = fields[2] if len(fields) > 2 else ""
        value = fields[5] if len(fields) > 5 else ""
        values.append((fields[1] if len(fields) > 1 else "", value_type, value))
        if value_type == "ED" and len(value) > 64:
            parts = value.split(comp_sep)
            parts[-1] = parts[-1][:16]
            fields[5] = comp_sep.join(parts)
            segments[i] = field_sep.join(fields)
            shortened = True
    return "\r".join(segments), values, shortened


def _check_value(set_id: str, value_type: str, text: str, rep_sep: str) -> None:
    if not value_type:
        raise ValueError(f"OBX {set_id}: OBX-2 value type is empty")
    if is_base_datatype(value_type, _V):
        reference: tuple[Any, ...] = ("leaf", None, value_type, None, None, -1)
    else:
        reference = ("sequence", load_reference(value_type, "Datatypes_Structs", _V), value_type, None, None, -1)
    for rep in text.split(rep_sep):
        typed = parse_field(rep, name="ZZZ_5", version=_V, validation_level=_TOLERANT, reference=reference)
        Validator.validate(typed, reference=typed.reference)
        if value_type == "NM":
            Decimal(rep)  # raises on a malformed number


def validate_er7(er7: str, *, expected_observations: int | None = None) -> Message:
    """Parse ``er7`` as an ORU^R01 with hl7apy's strict validation at v2.5.1; return it.

    Beyond hl7apy's own checks (structure, cardinality, datatypes of typed fields) this
    checks each OBX-5 against its OBX-2 value type, which hl7apy leaves untyped, and,
    when ``expected_observations`` is given, that every OBX landed in its own
    OBSERVATION group (a misplaced segment would change what a note belongs to).
    Raises :class:`MappingError` carrying hl7apy's message.
    """
    try:
        if len(er7) < 8 or not er7.startswith("MSH"):
            raise ValueError("not an ER7 message: it does not start with MSH")
        separators = read_header(er7).separators
        checked, values, shortened = _shorten_ed(er7, separators)
        msg = parse_message(checked, validation_level=_STRICT, find_groups=True)
        if msg.name != MESSAGE_TYPE[2] or msg.version != _V:
            raise ValueError(f"message is {msg.name} v{msg.version}, expected {MESSAGE_TYPE[2]} v{_V}")
        msg.validate()
        for set_id, value_type, text in values:
            _check_value(set_id, value_type, text, separators.repetition)
        if expected_observations is not None:
            groups = list(_groups(msg, "ORU_R01_OBSERVATION"))
            n_obx = len(list(_segments(msg, "OBX")))
            if len(groups) != expected_observations or n_obx != expected_observations:
                raise ValueError(f"{n_obx} OBX in {len(groups)} OBSERVATION groups, expected {expected_observations}")
        if shortened:
            msg = parse_message(er7, validation_level=_TOLERANT, find_groups=True)
    except Exception as exc:
        raise MappingError(f"ORU^R01 failed HL7 v{_V} validation: {_limited(exc)}") from exc
    return msg


def _groups(element: Element, name: str) -> Iterable[Element]:
    for child in element.children:
        if child.classname == "Group":
            if child.name == name:
                yield child
            yield from _groups(child, name)
