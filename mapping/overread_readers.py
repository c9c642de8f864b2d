"""A cardiologist's read (over-read) out of what carries it: HL7 ORU, DICOM SR, ECG annotations, vendor XML.

Pure: bytes or parsed objects in, a :class:`Read` out. Each reader says what the read is
(``status``), what it states (:class:`~ecgbridge.mapping.overread.Statement`\\ s), who read it
and when, and what it names of the ECG it reads (:class:`ReadRefs`: SOP Instance UIDs,
order / accession numbers, acquisition time; plus the patient identifier, which is used to
find the ECG and never stored). Mapping the statements is :mod:`ecgbridge.mapping.overread`'s;
finding the ECG is :mod:`ecgbridge.core.labels`'.

Status (HL7 table 0123 / 0085 letters): ``F`` final and ``C`` corrected are *labels*; ``P``
preliminary and anything else (``R``, ``I``, ``S``, ``A``, ``X``, ``W``, ``D``) are stored but
never a label (a preliminary read may still change; a cancelled or wrong one says nothing).

- **HL7 ORU^R01 without waveform** (:func:`read_oru`): OBR-25 (else the OBX-11 of the
  statements: C when any is C, F when all are F or C, else the first other one); statements
  from OBX of value type TX / ST / FT (text; repetitions and FT line breaks are separate
  statements) and CE / CWE / CNE / CF (code ^ text ^ coding system); reader OBR-32 (else
  OBX-16); read at OBR-22 (else OBX-19, OBX-14, MSH-7); ECG acquired at OBR-7; order numbers
  OBR-2 / OBR-3 (else ORC-2 / ORC-3), accession OBR-18 or IPC-1; SOP Instance UIDs from OBX
  whose OBX-3 is ``SOPInstanceUID`` / ``00080018`` / ``0008,0018`` (or reads "SOP Instance UID").
- **DICOM SR** (Basic Text, Enhanced, Comprehensive; :func:`read_sr`): the content tree is
  checked (:class:`~ecgbridge.errors.ReportError`, naming the item, when it is malformed);
  statements are the TEXT and CODE items a CONTAINER CONTAINS (observation context and concept
  modifiers are not statements); status F when VerificationFlag is VERIFIED and
  CompletionFlag COMPLETE (C when it names a predecessor document), else P, and P whenever
  PreliminaryFlag is PRELIMINARY; reader the last VerifyingObserverName, read at its
  VerificationDateTime; references from CurrentRequestedProcedureEvidenceSequence and the
  tree's COMPOSITE / WAVEFORM / IMAGE items; orders from ReferencedRequestSequence and
  AccessionNumber; the ECG's time is the SR's StudyDate / StudyTime (an ECG report shares its
  ECG's study).
- **DICOM ECG annotations** (:func:`read_ecg_annotations`): WaveformAnnotationSequence items
  with UnformattedTextValue, or a coded ConceptCodeSequence, that are not measurements
  (NumericValue) or marks (ReferencedSamplePositions / ReferencedTimeOffsets). Only from a
  source named as an over-read source: that naming is the confirmation (status F); the read is
  of the object itself (its SOP Instance UID).
- **Vendor XML** (:func:`read_vendor_xml`): Philips (``restingecgdata status="Confirmed"``:
  ``interpretation/statement`` left statements and ``severity``, confirming clinician and time)
  and GE MUSE (``TestDemographics/Status`` CFM / CONFIRMED: ``Diagnosis/DiagnosisStatement``
  lines joined until ENDSLINE, overreader, edit date). An unconfirmed export is no read (None).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from xml.etree.ElementTree import Element

from pydicom.dataset import Dataset

from ecgbridge.errors import ReportError
from ecgbridge.mapping.dicom_waveform import parse_dicom_dt
from ecgbridge.mapping.ecg import acquisition_time
from ecgbridge.mapping.hl7_common import field_text, parse_hl7_timestamp, read_er7, segments
from ecgbridge.mapping.overread import Statement

__all__ = [
    "LABEL_STATUSES",
    "Read",
    "ReadRefs",
    "read_oru",
    "read_sr",
    "read_ecg_annotations",
    "read_vendor_xml",
    "utc",
]

#: Result statuses whose read is a label: final and corrected.
LABEL_STATUSES = frozenset({"F", "C"})

_TEXT_TYPES = frozenset({"TX", "ST", "FT"})
_CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})
_UID_CODES = frozenset({"SOPINSTANCEUID", "SOP_INSTANCE_UID", "00080018", "0008,0018", "(0008,0018)"})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
#: SR relationship types whose items describe the context, never the ECG.
_CONTEXT_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS ACQ CONTEXT", "HAS CONCEPT MOD"})
_SR_VALUE_TYPES = frozenset(
    {
        "CONTAINER",
        "TEXT",
        "CODE",
        "NUM",
        "DATETIME",
        "DATE",
        "TIME",
        "UIDREF",
        "PNAME",
        "COMPOSITE",
        "IMAGE",
        "WAVEFORM",
        "SCOORD",
        "SCOORD3D",
        "TCOORD",
        "TABLE",
    }
)
_MAX_SR_DEPTH = 32
_MAX_SR_ITEMS = 10_000


def utc(when: datetime | None) -> datetime | None:
    """A time in UTC (a naive one is read in this machine's zone, as the ECG writers do)."""
    aware, _flag = acquisition_time(when)
    return aware.astimezone(UTC) if aware else None


@dataclass(frozen=True)
class ReadRefs:
    """What a read names of the ECG it reads (no patient data: this is what is stored)."""

    sop_instance_uids: tuple[str, ...] = ()
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    accession_number: str | None = None
    acquired_at: datetime | None = None  #: UTC

    @property
    def order_numbers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.placer_order_number, self.filler_order_number) if n))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uids": list(self.sop_instance_uids),
            "placer_order_number": self.placer_order_number,
            "filler_order_number": self.filler_order_number,
            "accession_number": self.accession_number,
            "acquired_at": self.acquired_at.isoformat() if self.acquired_at else None,
        }


@dataclass(frozen=True)
class Read:
    """One over-read as its carrier states it. ``patient_id`` / ``patient_issuer`` are PHI: never stored or logged."""

    kind: str  #: oru | sr | ecg_annotations | philips_xml | muse_xml
    status: str
    statements: tuple[Statement, ...] = ()
    reader: str | None = None
    read_at: datetime | None = None  #: UTC
    refs: ReadRefs = field(default_factory=ReadRefs)
    patient_id: str | None = field(default=None, repr=False)
    patient_issuer: str | None = field(default=None, repr=False)

    @property
    def is_label(self) -> bool:
        return self.status in LABEL_STATUSES

    def with_refs(self, **changes: Any) -> Read:
        return replace(self, refs=replace(self.refs, **changes))


def _clip(value: str | None, limit: int) -> str | None:
    value = " ".join(value.split()) if value else None
    return value[:limit] if value else None


def _ts(value: str | None) -> datetime | None:
    try:
        return utc(parse_hl7_timestamp(value))
    except ValueError:
        return None


# ----- HL7 ORU^R01 ---------------------------------------------------------------------------------------
def _reps(seg: Any, number: int) -> int:
    return sum(1 for f in seg.children if f.name == f"{seg.name}_{number}")


def _person(seg: Any, number: int, *, sub: bool) -> str | None:
    """An XCN (or, ``sub``, an NDL's CNN subcomponents): "family given", else the id."""
    if sub:
        ident, family, given = (field_text(seg, number, 1, s) for s in (1, 2, 3))
    else:
        ident, family, given = (field_text(seg, number, c) for c in (1, 2, 3))
    name = " ".join(p for p in (family, given) if p)
    return _clip(name or ident, 128)


def read_oru(message: bytes | str) -> Read:
    """An ORU^R01 carrying a read (no waveform) -> :class:`Read` (see the module docstring)."""
    er7 = read_er7(message, find_groups=False)
    segs = segments(er7.message)
    msh = next(s for s in segs if s.name == "MSH")
    pid = next((s for s in segs if s.name == "PID"), None)
    obr = next((s for s in segs if s.name == "OBR"), None)
    orc = next((s for s in segs if s.name == "ORC"), None)
    ipc = next((s for s in segs if s.name == "IPC"), None)
    obxs = [s for s in segs if s.name == "OBX"]
    statements: list[Statement] = []
    uids: list[str] = []
    obx_status: list[str] = []
    for obx in obxs:
        value_type = (field_text(obx, 2) or "").upper()
        ident = (field_text(obx, 3) or "").upper()
        label = (field_text(obx, 3, 2) or "").lower()
        if ident in _UID_CODES or "sop instance uid" in label:
            uid = field_text(obx, 5)
            if uid and _UID.match(uid.strip()):
                uids.append(uid.strip())
            continue
        if value_type in _TEXT_TYPES:
            for rep in range(_reps(obx, 5)):
                for line in (field_text(obx, 5, rep=rep) or "").splitlines():
                    if line.strip():
                        statements.append(Statement(text=line.strip()))
        elif value_type in _CODED_TYPES:
            for rep in range(_reps(obx, 5)):
                code, text, system = (field_text(obx, 5, c, rep=rep) for c in (1, 2, 3))
                if code or text:
                    statements.append(Statement(text=text, code=code, system=system))
        else:
            continue
        status = (field_text(obx, 11) or "").upper()
        if status:
            obx_status.append(status)
    status = (field_text(obr, 25) or "").upper() if obr is not None else ""
    if not status:
        if obx_status and all(s in LABEL_STATUSES for s in obx_status):
            status = "C" if "C" in obx_status else "F"
        else:
            status = next((s for s in obx_status if s not in LABEL_STATUSES), "")
    reader = _person(obr, 32, sub=True) if obr is not None else None
    if reader is None:
        reader = next((p for p in (_person(o, 16, sub=False) for o in obxs) if p), None)
    read_at = _ts(field_text(obr, 22)) if obr is not None else None
    for obx in obxs:
        read_at = read_at or _ts(field_text(obx, 19)) or _ts(field_text(obx, 14))
    read_at = read_at or _ts(field_text(msh, 7))
    placer = (field_text(obr, 2) if obr is not None else None) or (field_text(orc, 2) if orc is not None else None)
    filler = (field_text(obr, 3) if obr is not None else None) or (field_text(orc, 3) if orc is not None else None)
    accession = (field_text(obr, 18) if obr is not None else None) or (field_text(ipc, 1) if ipc is not None else None)
    patient_id = issuer = None
    if pid is not None:
        patient_id, issuer = field_text(pid, 3, 1), field_text(pid, 3, 4, 1) or field_text(pid, 3, 4, 2)
        if not patient_id:
            patient_id, issuer = field_text(pid, 2, 1), field_text(pid, 2, 4, 1)
    return Read(
        kind="oru",
        status=status[:1] or "?",
        statements=tuple(statements),
        reader=reader,
        read_at=read_at,
        refs=ReadRefs(
            sop_instance_uids=tuple(dict.fromkeys(uids)),
            placer_order_number=_clip(placer, 199),
            filler_order_number=_clip(filler, 199),
            accession_number=_clip(accession, 64),
            acquired_at=_ts(field_text(obr, 7)) if obr is not None else None,
        ),
        patient_id=patient_id,
        patient_issuer=issuer,
    )


# ----- DICOM ---------------------------------------------------------------------------------------------
def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _dicom_dt(date: Any, time: Any = None, offset: Any = None) -> datetime | None:
    text = (_str(date) or "").replace("-", "")
    if not text:
        return None
    text += (_str(time) or "").replace(":", "")
    plain = parse_dicom_dt(text + (_str(offset) or ""))
    return utc(plain) if plain is not None else None


def _code_of(item: Dataset, keyword: str) -> tuple[str | None, str | None, str | None]:
    seq = item.get(keyword)
    if not seq:
        return None, None, None
    code = seq[0]
    value = _str(code.get("CodeValue")) or _str(code.get("LongCodeValue")) or _str(code.get("URNCodeValue"))
    return value, _str(code.get("CodingSchemeDesignator")), _str(code.get("CodeMeaning"))


def _referenced_uids(ds: Dataset) -> list[str]:
    uids: list[str] = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword) or []:
            for series in study.get("ReferencedSeriesSequence") or []:
                for sop in series.get("ReferencedSOPSequence") or []:
                    uid = _str(sop.get("ReferencedSOPInstanceUID"))
                    if uid:
                        uids.append(uid)
    return uids


def _orders(ds: Dataset) -> tuple[str | None, str | None, str | None]:
    placer = _str(ds.get("PlacerOrderNumberImagingServiceRequest"))
    filler = _str(ds.get("FillerOrderNumberImagingServiceRequest"))
    accession = _str(ds.get("AccessionNumber"))
    for item in ds.get("ReferencedRequestSequence") or []:
        placer = placer or _str(item.get("PlacerOrderNumberImagingServiceRequest"))
        filler = filler or _str(item.get("FillerOrderNumberImagingServiceRequest"))
        accession = accession or _str(item.get("AccessionNumber"))
    return placer, filler, accession


def _walk_sr(items: Any, path: str, depth: int, counter: list[int]) -> Iterator[tuple[str, Dataset, str]]:
    """(path, item, relationship) of every content item, checked; ReportError names the first bad one."""
    if depth > _MAX_SR_DEPTH:
        raise ReportError(f"SR content tree nested deeper than {_MAX_SR_DEPTH} levels at item {path}")
    for n, item in enumerate(items, start=1):
        where = f"{path}.{n}"
        counter[0] += 1
        if counter[0] > _MAX_SR_ITEMS:
            raise ReportError(f"SR content tree has more than {_MAX_SR_ITEMS} items")
        if not isinstance(item, Dataset):
            raise ReportError(f"SR content item {where} is not a data set")
        relationship = _str(item.get("RelationshipType"))
        value_type = _str(item.get("ValueType"))
        if relationship is None and "ReferencedContentItemIdentifier" not in item:
            raise ReportError(f"SR content item {where} has no RelationshipType (0040,A010)")
        if "ReferencedContentItemIdentifier" in item:
            continue  # a by-reference relationship: the item it points at is walked where it is
        if value_type is None:
            raise ReportError(f"SR content item {where} has no ValueType (0040,A040)")
        if value_type not in _SR_VALUE_TYPES:
            raise ReportError(f"SR content item {where} has an unknown ValueType {value_type[:16]!r}")
        if value_type != "CONTAINER" and relationship not in _CONTEXT_RELATIONSHIPS:
            if not item.get("ConceptNameCodeSequence"):
                raise ReportError(f"SR content item {where} ({value_type}) has no ConceptNameCodeSequence (0040,A043)")
        if value_type == "TEXT" and "TextValue" not in item:
            raise ReportError(f"SR content item {where} (TEXT) has no TextValue (0040,A160)")
        if value_type == "CODE":
            code, scheme, _meaning = _code_of(item, "ConceptCodeSequence")
            if code is None or scheme is None:
                raise ReportError(
                    f"SR content item {where} (CODE) has no ConceptCodeSequence (0040,A168) with a code and its scheme"
                )
        yield where, item, relationship or ""
        children = item.get("ContentSequence")
        if children:
            yield from _walk_sr(children, where, depth + 1, counter)


def read_sr(ds: Dataset) -> Read:
    """A DICOM SR (Basic Text / Enhanced / Comprehensive) -> :class:`Read`; ReportError when its tree is malformed."""
    if _str(ds.get("ValueType")) != "CONTAINER":
        raise ReportError("SR root content item is not a CONTAINER (ValueType (0040,A040))")
    if not ds.get("ConceptNameCodeSequence"):
        raise ReportError("SR root CONTAINER has no ConceptNameCodeSequence (0040,A043): the document has no title")
    statements: list[Statement] = []
    uids = _referenced_uids(ds)
    skip: list[str] = []
    for where, item, relationship in _walk_sr(ds.get("ContentSequence") or [], "1", 1, [0]):
        value_type = _str(item.get("ValueType"))
        if relationship in _CONTEXT_RELATIONSHIPS:
            skip.append(where + ".")
            continue
        if any(where.startswith(prefix) for prefix in skip):
            continue
        if value_type in ("COMPOSITE", "WAVEFORM", "IMAGE"):
            for sop in item.get("ReferencedSOPSequence") or []:
                uid = _str(sop.get("ReferencedSOPInstanceUID"))
                if uid:
                    uids.append(uid)
        elif value_type == "TEXT" and relationship == "CONTAINS":
            text = _str(item.get("TextValue"))
            for line in (text or "").splitlines():
                if line.strip():
                    statements.append(Statement(text=line.strip()))
        elif value_type == "CODE" and relationship == "CONTAINS":
            code, scheme, meaning = _code_of(item, "ConceptCodeSequence")
            statements.append(Statement(text=meaning, code=code, system=scheme))
    verified = _str(ds.get("VerificationFlag")) == "VERIFIED"
    complete = _str(ds.get("CompletionFlag")) == "COMPLETE"
    preliminary = _str(ds.get("PreliminaryFlag")) == "PRELIMINARY"
    status = "P"
    if verified and complete and not preliminary:
        status = "C" if ds.get("PredecessorDocumentsSequence") else "F"
    observers = list(ds.get("VerifyingObserverSequence") or [])
    reader = _clip(_str(observers[-1].get("VerifyingObserverName")), 128) if observers else None
    read_at = _dicom_dt(observers[-1].get("VerificationDateTime")) if observers else None
    read_at = read_at or _dicom_dt(ds.get("ContentDate"), ds.get("ContentTime"), ds.get("TimezoneOffsetFromUTC"))
    placer, filler, accession = _orders(ds)
    return Read(
        kind="sr",
        status=status,
        statements=tuple(statements),
        reader=reader.replace("^", " ").strip() if reader else None,
        read_at=read_at,
        refs=ReadRefs(
            sop_instance_uids=tuple(dict.fromkeys(uids)),
            placer_order_number=_clip(placer, 199),
            filler_order_number=_clip(filler, 199),
            accession_number=_clip(accession, 64),
            acquired_at=_dicom_dt(ds.get("StudyDate"), ds.get("StudyTime"), ds.get("TimezoneOffsetFromUTC")),
        ),
        patient_id=_str(ds.get("PatientID")),
        patient_issuer=_str(ds.get("IssuerOfPatientID")),
    )


def read_ecg_annotations(ds: Dataset) -> Read | None:
    """The statements a DICOM ECG's WaveformAnnotationSequence holds, as a read of itself; None when none."""
    statements: list[Statement] = []
    for item in ds.get("WaveformAnnotationSequence") or []:
        if any(k in item for k in ("NumericValue", "ReferencedSamplePositions", "ReferencedTimeOffsets")):
            continue  # a measurement or a mark on the signal, not a statement
        text = _str(item.get("UnformattedTextValue"))
        code, scheme, meaning = _code_of(item, "ConceptCodeSequence")
        if code or text:
            statements.append(Statement(text=text or meaning, code=code, system=scheme))
    if not statements:
        return None
    uid = _str(ds.get("SOPInstanceUID"))
    placer, filler, accession = _orders(ds)
    return Read(
        kind="ecg_annotations",
        status="F",
        statements=tuple(statements),
        read_at=_dicom_dt(ds.get("InstanceCreationDate"), ds.get("InstanceCreationTime")),
        refs=ReadRefs(
            sop_instance_uids=(uid,) if uid else (),
            placer_order_number=_clip(placer, 199),
            filler_order_number=_clip(filler, 199),
            accession_number=_clip(accession, 64),
        ),
        patient_id=_str(ds.get("PatientID")),
        patient_issuer=_str(ds.get("IssuerOfPatientID")),
    )


# ----- vendor XML ----------------------------------------------------------------------------------------
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(node: Element | None, *path: str) -> Element | None:
    for name in path:
        if node is None:
            return None
        node = next((c for c in node if _local(c.tag) == name), None)
    return node


def _all(node: Element | None, name: str) -> list[Element]:
    return [c for c in node if _local(c.tag) == name] if node is not None else []


def _text(node: Element | None, *path: str) -> str | None:
    found = _find(node, *path)
    return _str(found.text) if found is not None and found.text else None


def _philips(root: Element) -> Read | None:
    if (root.get("status") or "").strip().lower() != "confirmed":
        return None
    interpretations = _all(_find(root, "interpretations"), "interpretation")
    if not interpretations:
        return None
    interp = interpretations[-1]
    statements: list[Statement] = []
    severity = _text(interp, "severity")
    for statement in _all(interp, "statement"):
        text = _text(statement, "leftstatement")
        if text:
            statements.append(Statement(text=text))
    if severity:
        statements.append(Statement(text=severity.strip(" -")))
    clinician = _find(interp, "confirmingclinician")
    read_at = None
    if clinician is not None and clinician.get("date"):
        try:
            stamp = f"{clinician.get('date')} {clinician.get('time') or '00:00:00'}"
            read_at = utc(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            read_at = None
    return Read(
        kind="philips_xml",
        status="F",
        statements=tuple(statements),
        reader=_clip(_str(clinician.text) if clinician is not None else None, 128),
        read_at=read_at,
    )


def _muse(root: Element) -> Read | None:
    test = _find(root, "TestDemographics")
    status = (_text(test, "Status") or "").upper()
    if status not in ("CFM", "CONFIRMED", "CONF"):
        return None
    statements: list[Statement] = []
    line: list[str] = []
    for stmt in _all(_find(root, "Diagnosis"), "DiagnosisStatement"):
        text = _text(stmt, "StmtText")
        if text:
            line.append(text)
        flags = {(_str(f.text) or "").upper() for f in _all(stmt, "StmtFlag")}
        if "ENDSLINE" in flags and line:
            statements.append(Statement(text=" ".join(line)))
            line = []
    if line:
        statements.append(Statement(text=" ".join(line)))
    last, first = _text(test, "OverreaderLastName"), _text(test, "OverreaderFirstName")
    reader = " ".join(p for p in (last, first) if p) or _text(test, "ConfirmedBy")
    read_at = None
    date, time = _text(test, "EditDate"), _text(test, "EditTime") or "00:00:00"
    for fmt in ("%m-%d-%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            read_at = utc(datetime.strptime(f"{date} {time}", fmt)) if date else None
            break
        except ValueError:
            continue
    return Read(kind="muse_xml", status="F", statements=tuple(statements), reader=_clip(reader, 128), read_at=read_at)


def read_vendor_xml(root: Element) -> Read | None:
    """The confirmed read a Philips or GE MUSE export carries, or None (unconfirmed, or another format).

    References are left empty: the caller knows the ECG of the same file (its SOP Instance UID).
    """
    name = _local(root.tag)
    if name == "restingecgdata":
        return _philips(root)
    if name == "RestingECG":
        return _muse(root)
    return None
