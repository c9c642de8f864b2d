"""The canonical ECG and analysis result every reader produces and every writer consumes.

A signal always travels with its sampling rate, its lead names and its units, so no
stage has to guess them. Patient identity is carried for write-back only; it must
never be logged (log ``Study.sop_instance_uid`` or internal ids instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

import numpy as np

__all__ = [
    "STANDARD_LEADS",
    "Patient",
    "Study",
    "Ecg",
    "Finding",
    "ModelOutput",
    "AnalysisResult",
    "Attachment",
    "output_summary",
    "acquisition_time",
    "NO_ACQUISITION_TIME",
    "NAIVE_ACQUISITION_TIME",
    "NOT_FOR_CLINICAL_USE",
]

#: The twelve standard leads, in the order models and plots use.
STANDARD_LEADS: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)

NOT_FOR_CLINICAL_USE = (
    "Model-generated result for research and evaluation; NOT FOR CLINICAL USE. "
    "It must be reviewed by a qualified clinician and is not a diagnosis."
)


@dataclass(frozen=True)
class Patient:
    """Who the ECG belongs to, as the sender identified them (PHI: never log)."""

    id: str | None = None
    id_issuer: str | None = None
    name: str | None = None
    birth_date: str | None = None  # YYYY-MM-DD when known
    sex: str | None = None  # FHIR administrative gender: male | female | other | unknown


@dataclass(frozen=True)
class Study:
    """Identifiers of the acquisition, used for idempotent write-back."""

    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    accession_number: str | None = None
    acquired_at: datetime | None = None
    device: str | None = None  # manufacturer / model of the cart, if given
    #: Order numbers the ECG was recorded for (HL7 OBR-2 / OBR-3, DICOM Placer/Filler Order Number).
    placer_order_number: str | None = None
    filler_order_number: str | None = None


@dataclass(frozen=True)
class Ecg:
    """A 12-lead (or partial) ECG: ``signals[i]`` is lead ``leads[i]`` in millivolts."""

    signals: np.ndarray  # shape (n_leads, n_samples), float32, mV
    leads: tuple[str, ...]
    fs: float  # samples per second
    patient: Patient = field(default_factory=Patient)
    study: Study = field(default_factory=Study)
    source_format: str = "unknown"  # dicom | hl7 | wfdb | aecg | ...
    units: str = "mV"
    #: Deliberate decisions a reader made, e.g. "derived_leads:III,aVR,aVL,aVF".
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.signals.ndim != 2:
            raise ValueError("Ecg.signals must be 2-D (leads, samples)")
        if self.signals.shape[0] != len(self.leads):
            raise ValueError(f"Ecg has {self.signals.shape[0]} signal rows but {len(self.leads)} lead names")
        if not self.fs > 0:
            raise ValueError("Ecg.fs must be positive")

    @property
    def duration_s(self) -> float:
        return float(self.signals.shape[1] / self.fs)

    def lead(self, name: str) -> np.ndarray:
        lead: np.ndarray = self.signals[self.leads.index(name)]
        return lead

    def in_lead_order(self, order: tuple[str, ...] = STANDARD_LEADS) -> np.ndarray:
        """Signals rearranged into ``order``; a missing lead raises KeyError."""
        missing = [lead for lead in order if lead not in self.leads]
        if missing:
            raise KeyError(f"ECG lacks leads {', '.join(missing)}")
        return np.stack([self.lead(lead) for lead in order])


@dataclass(frozen=True)
class Finding:
    """One model statement about the ECG (a class probability and its decision)."""

    code: str  # model class label, e.g. "MI"
    display: str
    probability: float
    threshold: float
    present: bool
    snomed: str | None = None  # SNOMED CT concept id when mapped
    tier: str | None = None  # risk tier, when the model defines tiers


@dataclass(frozen=True)
class ModelOutput:
    model: str
    version: str
    task: str  # diagnosis | triage | lvef
    findings: tuple[Finding, ...]
    extra: dict[str, Any] = field(default_factory=dict)


#: Flags a writer reports about the acquisition time (FHIR conclusion, HL7 NTE).
NO_ACQUISITION_TIME = "no_acquisition_time"
NAIVE_ACQUISITION_TIME = "acquisition_time_without_offset:assumed_local_converted_to_utc"


def acquisition_time(dt: datetime | None, assume_tz: tzinfo | None = None) -> tuple[datetime | None, str | None]:
    """(timezone-aware time or None, flag or None): a naive cart time is read in ``assume_tz``
    (default: this machine's zone, i.e. the hospital's) and converted to UTC, and flagged; FHIR
    and HL7 both need an offset. One rule for both writers, so they flag the same ECGs."""
    if dt is None:
        return None, NO_ACQUISITION_TIME
    if dt.tzinfo is not None and dt.utcoffset() is not None:
        return dt, None
    aware = dt.replace(tzinfo=assume_tz) if assume_tz is not None else dt.astimezone()
    return aware.astimezone(UTC), NAIVE_ACQUISITION_TIME


def output_summary(output: ModelOutput) -> str:
    """One line a clinician reads: which model said what (shared by the FHIR and HL7 mappings)."""
    present = [f for f in output.findings if f.present]
    if present:
        found = "; ".join(
            f"{f.display} ({f.code}) p={f.probability:.2f}, threshold {f.threshold:.2f}"
            + (f", tier {f.tier}" if f.tier else "")
            for f in present
        )
    else:
        found = "no finding above its threshold"
    severity = output.extra.get("severity4_display") or output.extra.get("severity_display")
    tier = f" Severity tier: {severity}." if severity else ""
    return f"AI ECG analysis by {output.model} {output.version} ({output.task}): {found}.{tier}"


@dataclass(frozen=True)
class Attachment:
    """A rendered explanation (PNG plot, PDF report) kept in the blob store by content hash."""

    content_type: str  # image/png | application/pdf
    title: str
    blob_sha256: str
    size: int


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the worker concluded about one message, ready for mapping."""

    message_id: str
    outputs: tuple[ModelOutput, ...]
    quality_flags: tuple[str, ...] = ()
    ecg_flags: tuple[str, ...] = ()
    label: str = NOT_FOR_CLINICAL_USE
    attachments: tuple[Attachment, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "label": self.label,
            "quality_flags": list(self.quality_flags),
            "ecg_flags": list(self.ecg_flags),
            "attachments": [a.__dict__.copy() for a in self.attachments],
            "outputs": [
                {
                    "model": o.model,
                    "version": o.version,
                    "task": o.task,
                    "extra": o.extra,
                    "findings": [f.__dict__.copy() for f in o.findings],
                }
                for o in self.outputs
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        return cls(
            message_id=data["message_id"],
            label=data.get("label", NOT_FOR_CLINICAL_USE),
            quality_flags=tuple(data.get("quality_flags", ())),
            ecg_flags=tuple(data.get("ecg_flags", ())),
            attachments=tuple(Attachment(**a) for a in data.get("attachments", ())),
            outputs=tuple(
                ModelOutput(
                    model=o["model"],
                    version=o["version"],
                    task=o["task"],
                    extra=o.get("extra", {}),
                    findings=tuple(Finding(**f) for f in o["findings"]),
                )
                for o in data["outputs"]
            ),
        )
