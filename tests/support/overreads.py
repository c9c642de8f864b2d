"""Cardiologists' reads (over-reads) as the systems that send them write them: HL7 ORU^R01 and DICOM SR.

Test-only writers: the ORU is plain ER7 text the way a MUSE-style ECG management system
sends a confirmed result (no waveform; OBR-25 status, OBR-32 reader, OBX TX / CWE statements);
the SR is a Basic Text / Comprehensive SR built with pydicom (root CONTAINER "ECG Report",
Findings CONTAINER with TEXT and CODE items, evidence references, verification).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ecgbridge.mapping.codes import SOP_BASIC_TEXT_SR, SOP_COMPREHENSIVE_SR

__all__ = ["overread_oru", "build_sr", "code_item", "text_item"]


def _ts(when: datetime | None) -> str:
    return when.strftime("%Y%m%d%H%M%S") + (when.strftime("%z") if when and when.tzinfo else "") if when else ""


def overread_oru(
    control: str,
    statements: Sequence[str | tuple[str, str, str]],
    *,
    sending: str = "MUSE",
    status: str = "F",
    placer: str | None = None,
    filler: str | None = None,
    accession: str | None = None,
    patient_id: str = "MRN0001",
    acquired_at: datetime | None = None,
    read_at: datetime | None = None,
    reader: str = "4711&Heart&Anna",
    sop_instance_uid: str | None = None,
) -> str:
    """An ORU^R01 result without waveform: each statement an OBX TX (text) or CWE ((code, text, system))."""
    obr = [
        "OBR",
        "1",
        f"{placer}^MUSE" if placer else "",
        f"{filler}^MUSE" if filler else "",
        "93000^EKG 12 lead^CPT",
        "",
        "",
        _ts(acquired_at),
        *[""] * 10,
        accession or "",  # OBR-18
        "",
        "",
        "",
        _ts(read_at),  # OBR-22
        "",
        "EC",
        status,  # OBR-25
        *[""] * 6,
        reader,  # OBR-32
    ]
    segments = [
        f"MSH|^~\\&|{sending}|CARDIO|ECGBRIDGE|HOSP|20260301120000+0000||ORU^R01^ORU_R01|{control}|P|2.5.1|||||UNICODE UTF-8",
        f"PID|1||{patient_id}^^^HOSP^MR||Doe^Jane||19600101|F",
        "|".join(obr),
    ]
    set_id = 0
    if sop_instance_uid:
        set_id += 1
        segments.append(f"OBX|{set_id}|ST|SOPInstanceUID^SOP Instance UID^DCM||{sop_instance_uid}||||||{status}")
    for statement in statements:
        set_id += 1
        if isinstance(statement, tuple):
            code, text, system = statement
            segments.append(f"OBX|{set_id}|CWE|8601-7^EKG impression^LN||{code}^{text}^{system}||||||{status}")
        else:
            segments.append(f"OBX|{set_id}|TX|8601-7^EKG impression^LN||{statement}||||||{status}")
    return "\r".join(segments) + "\r"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, scheme, meaning
    return ds


def text_item(text: str, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    item.TextValue = text
    return item


def code_item(value: str, scheme: str, meaning: str, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, "CODE"
    item.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    item.ConceptCodeSequence = DicomSequence([_code(value, scheme, meaning)])
    return item


def build_sr(
    findings: Sequence[Dataset],
    *,
    referenced: tuple[str, str] | None = None,
    sop_class_uid: str = SOP_COMPREHENSIVE_SR,
    verified: bool = True,
    patient_id: str = "MRN0001",
    accession: str | None = None,
    study_time: datetime | None = None,
    verifier: str = "Heart^Anna",
    verified_at: datetime | None = None,
    predecessor: str | None = None,
) -> Dataset:
    """A verified ECG report SR; ``referenced`` = (SOP Class UID, SOP Instance UID) of the ECG it reads."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientID, ds.PatientName = patient_id, "Doe^Jane"
    if accession:
        ds.AccessionNumber = accession
    if study_time is not None:
        ds.StudyDate, ds.StudyTime = study_time.strftime("%Y%m%d"), study_time.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = "20260301", "120000"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = DicomSequence([_code("11524-6", "LN", "EKG Study")])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = verifier
        observer.VerificationDateTime = (verified_at or datetime(2026, 3, 1, 12)).strftime("%Y%m%d%H%M%S")
        observer.VerifyingOrganization = "Cardiology"
        ds.VerifyingObserverSequence = DicomSequence([observer])
    if predecessor:
        ref = Dataset()
        ref.StudyInstanceUID = ds.StudyInstanceUID
        series = Dataset()
        series.SeriesInstanceUID = ds.SeriesInstanceUID
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = sop_class_uid, predecessor
        series.ReferencedSOPSequence = DicomSequence([sop])
        ref.ReferencedSeriesSequence = DicomSequence([series])
        ds.PredecessorDocumentsSequence = DicomSequence([ref])
    if referenced is not None:
        evidence = Dataset()
        evidence.StudyInstanceUID = generate_uid()
        series = Dataset()
        series.SeriesInstanceUID = generate_uid()
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = referenced
        series.ReferencedSOPSequence = DicomSequence([sop])
        evidence.ReferencedSeriesSequence = DicomSequence([series])
        ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([evidence])
    language = code_item("en-US", "RFC5646", "English (United States)", relationship="HAS CONCEPT MOD")
    language.ConceptNameCodeSequence = DicomSequence([_code("121049", "DCM", "Language of Content Item")])
    container = Dataset()
    container.RelationshipType, container.ValueType = "CONTAINS", "CONTAINER"
    container.ContinuityOfContent = "SEPARATE"
    container.ConceptNameCodeSequence = DicomSequence([_code("121070", "DCM", "Findings")])
    container.ContentSequence = DicomSequence(list(findings))
    ds.ContentSequence = DicomSequence([language, container])
    return ds


#: The SOP classes a sender offers for these SRs.
SR_CLASSES = (SOP_BASIC_TEXT_SR, SOP_COMPREHENSIVE_SR)
