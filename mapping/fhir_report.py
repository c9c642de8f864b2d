"""Map an :class:`~mapping.ecg.AnalysisResult` to FHIR R4 resources (pure, no I/O).

One ECG analysis becomes:

* one ``Device`` per model (name@version), so the EHR can tell which software said what;
* one ``Observation`` per class probability per model output; the global measurements
  (``task == "measurements"``) as LOINC / UCUM Observations (:mod:`mapping.fhir_measurements`)
  and an LVEF tier (``task == "lvef"``) as one LOINC 10230-1 Observation
  (:mod:`mapping.fhir_lvef`);
* one ``Observation`` per clinical abnormality a model predicts from the ECG (the
  knowledge-transfer model's explanations, :mod:`mapping.fhir_abnormality`): coded in
  ``urn:ecgbridge:predicted-abnormality``, never with the variable's LOINC, ``method`` "predicted
  from the ECG ... not a measurement", ``derivedFrom`` the same model's finding Observations;
  the conclusion gets one line for them (or says a poor-quality ECG withheld them);
* one ``DiagnosticReport`` (v2-0074 ``EC``, LOINC 34534-8) whose ``result`` lists them;
* one ``Provenance`` naming the model Device as author, built once the report's
  server id is known (:meth:`ReportBundle.provenance_for`).

Every resource is a plain JSON dict, checked against the ``fhir.resources.R4B`` models
before it leaves this module, and carries the conditional-create query
(``If-None-Exist``) that makes re-delivery idempotent. Inside the bundle resources
point at each other through deterministic ``urn:uuid:`` placeholders (the same form a
FHIR transaction Bundle uses); :func:`resolve_references` swaps them for server ids.

Decisions, and why:

* **status ``preliminary``** on the report and every Observation: the content is a
  machine assertion no clinician has reviewed; ``final`` would tell the EHR it is
  verified. A reviewer (or the EHR workflow) promotes it.
* **a re-analysis (result ``version`` 2, 3, ...) amends the same report**: the same
  identifiers (so the sender finds and updates the same DiagnosticReport and the same
  Observations), status ``amended`` on the report and its Observations (HL7 v2 says ``C``),
  a ``meta.tag`` :data:`RESULT_VERSION_SYSTEM` naming the version, a conclusion line
  saying so, and a Provenance with activity ``UPDATE`` tagged the same way. Version 1 is
  exactly what it always was.
* **Observation category ``procedure``**: the HL7 observation-category definition puts
  electrodiagnostics (ECG) under ``procedure``; ``exam`` is for physical examination.
* **probability as UCUM ``1``** (unity), value 0..1 with ``unit`` "probability": the
  number the model produced and its threshold share one scale, and UCUM ``1`` is the
  standard code for a dimensionless ratio (``%`` would invite 0-100 confusion).
* **flags** (signal quality, reader decisions such as ``derived_leads:...``,
  ``no_patient_id``) go into ``DiagnosticReport.conclusion`` as a ``Flags:`` line:
  R4 DiagnosticReport has no ``note``, and the conclusion is what a reader sees.
* **AI labelling**: ``meta.security`` AIAST on the report and Observations, a
  ``meta.tag`` naming model and version, and the "not for clinical use" label in the
  conclusion, in every Observation note and in the Device note. R4
  ``DiagnosticReport.performer`` does not allow Device, so the model is named through
  ``Observation.device`` and ``Provenance.agent.who``.
* **patient**: a literal reference when the caller resolved one, else a logical
  reference by identifier; no name unless asked (the identifier is enough to match).
* **presentedForm**: the rendered PDF report, then the PNG page (``inference.explain``),
  as inline ``data`` with ``size`` and ``hash`` (base64 SHA-1, as R4 defines it), only
  when the caller passes the bytes and they match the attachment's SHA-256; otherwise
  the report is sent without them and flagged ``attachment_unavailable`` /
  ``attachment_hash_mismatch``. Inline rather than a Binary ``url``: one conditional
  create stays atomic and the EHR needs no second fetch.
* **times**: FHIR dateTime with a time needs an offset. An aware acquisition time keeps
  its offset; a naive one is read in ``assume_tz`` (default: this machine's local
  zone, i.e. the hospital's), converted to UTC and flagged.
* **the order** (:class:`OrderLink`): ``basedOn`` names the ServiceRequest the ECG was
  recorded for, so the EHR can join the order, this AI result and the cardiologist's
  over-read. The sender searches the EHR once per report for a ServiceRequest carrying any
  of the order's identifiers (:func:`order_search_query`); exactly one match (not
  ``entered-in-error``, same patient) gives a literal ``ServiceRequest/<id>``, anything else
  a logical reference by the order's identifier (placer number first: it is the order's own;
  then filler, then the DICOM accession number), typed PLAC / FILL / ACSN from HL7 table
  0203. The literal reference carries that identifier too, so the link survives a merged or
  re-keyed order. Several matches or a ServiceRequest of another patient are flagged
  (``order_ambiguous``, ``order_patient_differs``), never linked. The order numbers are not
  added to ``DiagnosticReport.identifier``: two ECGs recorded for one order (a repeat ECG)
  would then share a business identifier, and the report's identity (its conditional-create
  key) stays the ECG's alone.
* **risk tiers** (``Finding.tier``, the model's ``tiers`` cut-offs of a class probability)
  are coded, not only written in the note: a second ``interpretation`` and a ``component``
  (code ``<CLASS>-tier`` of the model's system, as HL7's tier OBX-3) whose
  ``valueCodeableConcept`` is in :data:`~mapping.codes.RISK_TIER_SYSTEM`, which a search
  finds (``Observation?component-value-concept=urn:ecgbridge:risk-tier|high``). The tier
  grades how likely the class is (NORM has tiers too), so no v3 interpretation code (H / HH
  mean above a reference range) is borrowed for it; POS / NEG stays the first
  interpretation. The triage severity is coded on its own Observation (LOINC 8601-7).
  The codes:

  =======================  ======================================  ==========================================
  system                   code                                    where
  =======================  ======================================  ==========================================
  urn:ecgbridge:risk-tier  low, moderate, high                     finding Observation: interpretation,
                                                                   component value
  urn:ecgbridge:severity   normal, abnormal_nonurgent, urgent      8601-7 Observation value (3-tier,
                                                                   interpretation N / A / AA), conclusionCode
  urn:ecgbridge:severity   4tier-normal, 4tier-minor_abnormality,  the same, 4-tier triage models
                           4tier-major_nonurgent, 4tier-urgent
  urn:ecgbridge:lvef-tier  LVEF_GT50 ... LVEF_LT30                 LVEF Observation (mapping.fhir_lvef)
  urn:ecgbridge:predicted- the head's code, e.g. nt_probnp_high    predicted-abnormality Observation code
  abnormality                                                      (mapping.fhir_abnormality)
  urn:ecgbridge:method     ecg-model-prediction; predicted-        its method; its component codes (value:
                           variable, predicted-criterion           the variable's LOINC; the cut-off)
  =======================  ======================================  ==========================================
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any
from urllib.parse import quote, urlencode

from ecgbridge.errors import MappingError
from ecgbridge.mapping.abnormality_result import predicted_abnormalities, summary_lines
from ecgbridge.mapping.codes import (
    LOINC,
    ORDER_IDENTIFIER_TYPE,
    RISK_TIER_DISPLAY,
    RISK_TIER_SYSTEM,
    SUPERCLASS_SNOMED,
    SYSTEM,
)
from ecgbridge.mapping.ecg import (
    AnalysisResult,
    Attachment,
    Finding,
    ModelOutput,
    Patient,
    Study,
    acquisition_time,
    output_summary,
)
from ecgbridge.mapping.fhir_abnormality import abnormality_observation
from ecgbridge.mapping.fhir_lvef import lvef_observation
from ecgbridge.mapping.fhir_measurements import measurement_observations, measurement_panel
from ecgbridge.mapping.fhir_observation import observation_base
from ecgbridge.mapping.fhir_validate import validate_resource
from ecgbridge.mapping.lvef_result import LVEF_TASK, explanation_text
from ecgbridge.mapping.severity_result import Severity, severity_of_output

__all__ = [
    "AI_SECURITY_LABEL",
    "RESULT_VERSION_SYSTEM",
    "DEFAULT_PATIENT_ID_SYSTEM",
    "PlannedResource",
    "ReportBundle",
    "OrderIdentifier",
    "OrderLink",
    "order_identifiers",
    "order_search_query",
    "link_order",
    "build_report",
    "resolve_references",
    "revision_note",
    "operation_outcome_text",
    "identifier_query",
    "validate_resource",
]

#: HL7 AI transparency security label (v3-ObservationValue AIAST).
AI_SECURITY_LABEL: dict[str, str] = {
    "system": SYSTEM["security"],
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

#: Identifier system for a patient id when the route configures none.
DEFAULT_PATIENT_ID_SYSTEM = "urn:ecgbridge:patient-id"

#: ``meta.tag`` system of a revised report and of its Provenance: the code is the result version.
RESULT_VERSION_SYSTEM = "urn:ecgbridge:result-version"

_PROBABILITY_UNIT: dict[str, str] = {"unit": "probability", "system": SYSTEM["ucum"], "code": "1"}
_PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_SNOMED_DISPLAY: dict[str, str] = {code: display for code, display in SUPERCLASS_SNOMED.values()}
_PLACEHOLDER_NS = uuid.UUID("5d1f3c2e-8f0a-4d43-9a57-6f0b6a1e2c11")


@dataclass(frozen=True)
class PlannedResource:
    """A resource ready to send, with how to create it idempotently.

    ``placeholder`` is the ``urn:uuid:`` other resources in the bundle use to refer to
    this one until the server has given it an id.
    """

    resource: dict[str, Any]
    if_none_exist: str | None
    placeholder: str

    @property
    def resource_type(self) -> str:
        return str(self.resource["resourceType"])


@dataclass(frozen=True)
class ReportBundle:
    """Everything one analysis writes to a FHIR server, in creation order."""

    devices: list[PlannedResource]
    observations: list[PlannedResource]
    report: PlannedResource
    issued: str
    #: Source ECG identifier (system, value) for Provenance.entity, when known.
    source_identifier: tuple[str, str] | None = None
    #: The result version: 1 is the first analysis, 2 and later amend the same report.
    version: int = 1

    @property
    def revision_tag(self) -> dict[str, str]:
        """The ``meta.tag`` a revision's report and Provenance carry."""
        return _version_tag(self.version)

    def is_provenance_of_version(self, provenance: Mapping[str, Any]) -> bool:
        """Whether a Provenance found on the server records this bundle's revision (version >= 2)."""
        tags = (provenance.get("meta") or {}).get("tag") or []
        tag = self.revision_tag
        return any(t.get("system") == tag["system"] and t.get("code") == tag["code"] for t in tags)

    @property
    def device(self) -> PlannedResource:
        """The (first) model Device; most results come from one model."""
        return self.devices[0]

    def provenance_query(self, report_ref: str) -> str:
        """Search query that finds this report's Provenance (``Provenance?<query>``).

        Provenance has no business identifier every server indexes, so idempotency is a
        search by target instead of a conditional create.
        """
        return urlencode({"target": report_ref})

    def provenance_for(self, report_ref: str, refs: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A validated Provenance for the delivered report.

        ``refs`` maps bundle placeholders to server references ("Device/7"); without it
        the placeholders stay (usable inside a transaction Bundle).
        """
        refs = refs or {}
        targets = [{"reference": report_ref}] + [
            {"reference": refs.get(o.placeholder, o.placeholder)} for o in self.observations
        ]
        agents = [
            {
                "type": {"coding": [{"system": _PROVENANCE_PARTICIPANT, "code": "author", "display": "Author"}]},
                "who": {
                    "reference": refs.get(d.placeholder, d.placeholder),
                    "display": _device_display(d.resource),
                },
            }
            for d in self.devices
        ]
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "target": targets,
            "recorded": self.issued,
            "activity": {"coding": [{"system": _DATA_OPERATION, "code": "CREATE", "display": "create"}]},
            "agent": agents,
        }
        if self.version > 1:  # a revision: the report was updated, and to which result version
            prov = {"resourceType": "Provenance", "meta": {"tag": [self.revision_tag]}, **prov}
            prov["activity"] = {"coding": [{"system": _DATA_OPERATION, "code": "UPDATE", "display": "revise"}]}
        if self.source_identifier is not None:
            system, value = self.source_identifier
            prov["entity"] = [
                {
                    "role": "source",
                    "what": {
                        "identifier": {"system": system, "value": value},
                        "display": "Source ECG",
                    },
                }
            ]
        return validate_resource(prov)

    def all_planned(self) -> list[PlannedResource]:
        """Devices, then Observations, then the report: the order references allow."""
        return [*self.devices, *self.observations, self.report]


# --------------------------------------------------------------------------- the order

#: Order number kinds, in the order a logical ``basedOn`` prefers them: the placer number is the
#: order's own (the EHR issued it); the filler number is the ECG department's; the accession
#: number is what a DICOM cart copied from the worklist.
ORDER_KINDS: tuple[str, ...] = ("placer", "filler", "accession")


@dataclass(frozen=True)
class OrderIdentifier:
    """One identifier of the order an ECG was recorded for (PHI-bearing: never log ``value``)."""

    kind: str  # placer | filler | accession (:data:`ORDER_KINDS`)
    system: str
    value: str

    def as_identifier(self) -> dict[str, Any]:
        """The FHIR Identifier, typed PLAC / FILL / ACSN (HL7 table 0203)."""
        code, display = ORDER_IDENTIFIER_TYPE[self.kind]
        return {
            "type": {"coding": [{"system": SYSTEM["v2_0203"], "code": code, "display": display}]},
            "system": self.system,
            "value": self.value,
        }


@dataclass(frozen=True)
class OrderLink:
    """What the report's ``basedOn`` says about its order (:func:`link_order` decides it).

    ``identifiers`` are the order's, best first; ``reference`` is ``ServiceRequest/<id>`` when
    the EHR's ServiceRequest was found, unambiguously; ``flag`` says why a ServiceRequest that
    was found is not linked (it goes to the report's ``Flags:`` line).
    """

    identifiers: tuple[OrderIdentifier, ...]
    reference: str | None = None
    flag: str | None = None

    def based_on(self) -> list[dict[str, Any]]:
        """``DiagnosticReport.basedOn``: one Reference, literal when found, else by identifier."""
        if not self.identifiers and self.reference is None:
            return []
        ref: dict[str, Any] = {}
        if self.reference is not None:
            ref["reference"] = self.reference
        ref["type"] = "ServiceRequest"
        if self.identifiers:
            ref["identifier"] = self.identifiers[0].as_identifier()
        return [ref]


def order_identifiers(
    order: Mapping[str, Any] | None,
    study: Study,
    *,
    placer_system: str,
    filler_system: str,
    accession_system: str,
) -> tuple[OrderIdentifier, ...]:
    """The order's identifiers, placer, filler, accession: the linked order's numbers, else the ECG's.

    ``order`` is the stored order's details (``Outgoing.order``: ``placer_order_number``,
    ``filler_order_number``); the ECG's own numbers (HL7 OBR-2 / OBR-3, DICOM order attributes)
    stand in for a number the order lacks, as in the HL7 ORU. The accession number is the
    ECG's (DICOM Accession Number). Empty when the ECG has no order at all.
    """
    order = order or {}
    values = {
        "placer": order.get("placer_order_number") or study.placer_order_number,
        "filler": order.get("filler_order_number") or study.filler_order_number,
        "accession": study.accession_number,
    }
    systems = {"placer": placer_system, "filler": filler_system, "accession": accession_system}
    out: list[OrderIdentifier] = []
    for kind in ORDER_KINDS:
        value = str(values[kind] or "").strip()
        if value:
            out.append(OrderIdentifier(kind, systems[kind], value))
    return tuple(out)


def order_search_query(identifiers: Sequence[OrderIdentifier]) -> str:
    """``identifier=<system>|<value>,...``: one search finds a ServiceRequest by any of the order's identifiers.

    A comma between token values is FHIR's OR; each system and value is escaped, so a comma
    inside an order number stays part of it.
    """
    if not identifiers:
        raise ValueError("an order search needs at least one identifier")
    joined = ",".join(f"{_escape_search(i.system)}|{_escape_search(i.value)}" for i in identifiers)
    return urlencode({"identifier": joined})


def _same_reference(a: str, b: str) -> bool:
    """``Patient/1`` and ``https://ehr/fhir/Patient/1`` name the same resource (type and id)."""
    return a.rstrip("/").split("/")[-2:] == b.rstrip("/").split("/")[-2:]


def link_order(
    identifiers: Sequence[OrderIdentifier],
    matches: Sequence[Mapping[str, Any]] | None,
    *,
    patient_reference: str | None = None,
    complete: bool = True,
) -> OrderLink:
    """Decide ``basedOn`` from the ServiceRequests a search by the order's identifiers found.

    ``matches`` None: the EHR could not be searched (the reference is by identifier).
    Exactly one match, not ``entered-in-error``, gives its literal reference, unless it
    belongs to another patient than the report's (``patient_reference``, when the patient was
    resolved): then ``order_patient_differs``. Several (or ``complete`` False: the search had
    more pages) are ``order_ambiguous``. Either way the identifier stays, so the link by order
    number is never lost.
    """
    idents = tuple(identifiers)
    found = {str(m["id"]): m for m in matches or [] if m.get("id") and m.get("status") != "entered-in-error"}
    if matches is None or not found:
        return OrderLink(idents)
    if len(found) > 1 or not complete:
        return OrderLink(idents, flag="order_ambiguous")
    rid, service_request = next(iter(found.items()))
    subject = (service_request.get("subject") or {}).get("reference")
    if patient_reference and isinstance(subject, str) and not _same_reference(subject, patient_reference):
        return OrderLink(idents, flag="order_patient_differs")
    return OrderLink(idents, reference=f"ServiceRequest/{rid}")


# --------------------------------------------------------------------------- helpers


def _escape_search(value: str) -> str:
    """Escape FHIR search separators (``\\ | , $``) inside one token part."""
    for ch in ("\\", "|", ",", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def identifier_query(system: str, value: str) -> str:
    """``identifier=<system>|<value>``, escaped per FHIR search and URL-encoded."""
    return urlencode({"identifier": f"{_escape_search(system)}|{_escape_search(value)}"})


def _placeholder(resource_type: str, system: str, value: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(_PLACEHOLDER_NS, f"{resource_type}|{system}|{value}"))


def _fhir_instant(dt: datetime) -> str:
    """ISO 8601 with an offset; UTC as ``Z``; milliseconds only when present."""
    spec = "milliseconds" if dt.microsecond else "seconds"
    text = dt.isoformat(timespec=spec)
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _version_tag(version: int) -> dict[str, str]:
    return {"system": RESULT_VERSION_SYSTEM, "code": str(version), "display": f"result version {version}"}


def _amended(planned: PlannedResource) -> PlannedResource:
    """The same planned resource with status ``amended`` (a revision's report and Observations)."""
    return PlannedResource(
        resource=validate_resource({**planned.resource, "status": "amended"}),
        if_none_exist=planned.if_none_exist,
        placeholder=planned.placeholder,
    )


def _model_tag(output: ModelOutput) -> dict[str, str]:
    return {
        "system": SYSTEM["ecgbridge_model"],
        "code": f"{output.model}@{output.version}",
        "display": f"{output.model} {output.version}",
    }


def _device_display(device: Mapping[str, Any]) -> str:
    name = device["deviceName"][0]["name"]
    version = device["version"][0]["value"]
    return f"{name} {version}"


def _local_system(output: ModelOutput) -> str:
    """The model's own code system; the name is percent-encoded to stay a valid URI."""
    return f"{SYSTEM['ecgbridge_model']}:{quote(output.model, safe='@.-_~')}"


def _finding_codings(finding: Finding, output: ModelOutput) -> list[dict[str, str]]:
    codings: list[dict[str, str]] = []
    if finding.snomed:
        codings.append(
            {
                "system": SYSTEM["snomed"],
                "code": finding.snomed,
                "display": _SNOMED_DISPLAY.get(finding.snomed, finding.display),
            }
        )
    codings.append({"system": _local_system(output), "code": finding.code, "display": finding.display})
    return codings


def _probability(finding: Finding, output: ModelOutput) -> float:
    p = float(finding.probability)
    t = float(finding.threshold)
    for name, v in (("probability", p), ("threshold", t)):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise MappingError(f"{output.model} {output.version} finding {finding.code}: {name} {v!r} is not in [0, 1]")
    return round(p, 4)


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item:
            seen.setdefault(item, None)
    return list(seen)


def resolve_references(resource: Mapping[str, Any], refs: Mapping[str, str]) -> dict[str, Any]:
    """A deep copy of ``resource`` with every ``reference`` found in ``refs`` replaced."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            ref = out.get("reference")
            if isinstance(ref, str) and ref in refs:
                out["reference"] = refs[ref]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return copy.copy(node)

    result = walk(resource)
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------- builders


def _subject(
    patient: Patient,
    patient_reference: str | None,
    patient_identifier_system: str | None,
    include_patient_name: bool,
) -> dict[str, Any] | None:
    subject: dict[str, Any]
    if patient_reference:
        subject = {"reference": patient_reference}
    elif patient.id:
        identifier: dict[str, Any] = {
            "system": patient_identifier_system or DEFAULT_PATIENT_ID_SYSTEM,
            "value": patient.id,
        }
        if patient.id_issuer:
            identifier["assigner"] = {"display": patient.id_issuer}
        subject = {"type": "Patient", "identifier": identifier}
    else:
        return None
    if include_patient_name and patient.name:
        subject["display"] = patient.name
    return subject


def _device(output: ModelOutput, label: str) -> PlannedResource:
    value = f"{output.model}@{output.version}"
    system = SYSTEM["ecgbridge_model"]
    resource = {
        "resourceType": "Device",
        "identifier": [{"system": system, "value": value}],
        "status": "active",
        "deviceName": [{"name": output.model, "type": "model-name"}],
        "type": {"text": f"ECG analysis software ({output.task} model)"},
        "version": [{"value": output.version}],
        "note": [{"text": label}],
    }
    return PlannedResource(
        resource=validate_resource(resource),
        if_none_exist=identifier_query(system, value),
        placeholder=_placeholder("Device", system, value),
    )


def _observation(
    finding: Finding,
    output: ModelOutput,
    *,
    report_id_value: str,
    device_placeholder: str,
    subject: dict[str, Any] | None,
    effective: str | None,
    issued: str,
    label: str,
) -> PlannedResource:
    system = SYSTEM["ecgbridge_result"]
    value = f"{report_id_value}/{output.model}/{output.version}/{finding.code}"
    probability = _probability(finding, output)
    decision = "above" if finding.present else "below"
    note = (
        f"Model {output.model} {output.version}: probability {probability:.4f}, "
        f"decision threshold {finding.threshold:.4f} ({decision} threshold"
        + (f"; tier {finding.tier}" if finding.tier else "")
        + f"). {label}"
    )
    obs = observation_base(
        identifier_value=value,
        code={"coding": _finding_codings(finding, output), "text": f"{finding.display} (model probability)"},
        subject=subject,
        effective=effective,
        issued=issued,
        meta={"security": [dict(AI_SECURITY_LABEL)], "tag": [_model_tag(output)]},
    )
    obs["valueQuantity"] = {"value": probability, **_PROBABILITY_UNIT}
    obs["interpretation"] = [
        {
            "coding": [
                {
                    "system": SYSTEM["obs_interpretation"],
                    "code": "POS" if finding.present else "NEG",
                    "display": "Positive" if finding.present else "Negative",
                }
            ]
        }
    ]
    obs["note"] = [{"text": note}]
    obs["device"] = {"reference": device_placeholder, "display": f"{output.model} {output.version}"}
    if finding.tier:
        _add_risk_tier(obs, finding, output)
    return PlannedResource(
        resource=validate_resource(obs),
        if_none_exist=identifier_query(system, value),
        placeholder=_placeholder("Observation", system, value),
    )


def _add_risk_tier(obs: dict[str, Any], finding: Finding, output: ModelOutput) -> None:
    """The finding's risk tier, coded: a second interpretation (what a results view shows beside
    the value) and a component (what ``component-value-concept`` searches find); the code is the
    tier as the model names it, the same code as HL7's tier OBX-5."""
    tier = str(finding.tier)
    display = RISK_TIER_DISPLAY.get(tier, tier.replace("_", " "))
    coding = {"system": RISK_TIER_SYSTEM, "code": tier, "display": display}
    obs["interpretation"].append({"coding": [dict(coding)], "text": f"{finding.display}: {display.lower()}"})
    what = f"{finding.display} risk tier"
    obs["component"] = [
        {
            "code": {
                "coding": [{"system": _local_system(output), "code": f"{finding.code}-tier", "display": what}],
                "text": what,
            },
            "valueCodeableConcept": {"coding": [coding], "text": display},
        }
    ]


def _planned(resource: dict[str, Any]) -> PlannedResource:
    """A validated Observation keyed by its (first) identifier for the conditional create."""
    ident = resource["identifier"][0]
    return PlannedResource(
        resource=validate_resource(resource),
        if_none_exist=identifier_query(ident["system"], ident["value"]),
        placeholder=_placeholder(resource["resourceType"], ident["system"], ident["value"]),
    )


def _measurement_observations(
    output: ModelOutput,
    *,
    id_value: str,
    device: PlannedResource,
    subject: dict[str, Any] | None,
    effective: str | None,
    issued: str,
    label: str,
    panel: bool = False,
) -> list[PlannedResource]:
    """The global measurements (LOINC, UCUM) as Observations, one per value measured, or one panel."""
    extra = output.extra if isinstance(output.extra, Mapping) else {}
    values = dict(extra.get("measurements") or {})
    raw_features = extra.get("features")
    features: Mapping[str, Any] = raw_features if isinstance(raw_features, Mapping) else {}
    for key in ("qtc_fridericia", "rr_interval"):
        if key in features and key not in values:
            values[key] = features[key]
    build = measurement_observations if not panel else _panel_as_list
    try:
        resources = build(
            values,
            subject=subject,
            effective=effective,
            device_ref=device.placeholder,
            identifier_base=f"{id_value}/{output.model}/{output.version}",
            issued=issued,
            label=label,
        )
    except ValueError as exc:
        raise MappingError(f"measurements of {output.model} {output.version}: {exc}") from exc
    return [_planned(r) for r in resources]


def _panel_as_list(values: Mapping[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    panel = measurement_panel(values, **kwargs)
    return [panel] if panel is not None else []


def _lvef_observation(
    output: ModelOutput,
    *,
    id_value: str,
    device: PlannedResource,
    subject: dict[str, Any] | None,
    effective: str | None,
    issued: str,
    label: str,
) -> PlannedResource:
    resource = lvef_observation(
        output,
        subject=subject,
        effective=effective,
        device_ref=device.placeholder,
        identifier_value=f"{id_value}/{output.model}/{output.version}/lvef-tier",
        issued=issued,
        meta={"security": [dict(AI_SECURITY_LABEL)], "tag": [_model_tag(output)]},
        label=label,
    )
    return _planned(resource)


def _severity_codings(severity: Severity) -> list[dict[str, str]]:
    codings = [
        {"system": SYSTEM["snomed"], "code": severity.snomed[0], "display": severity.snomed[1]},
        {"system": severity.system, "code": severity.code, "display": severity.display},
    ]
    if severity.code4 and severity.display4:
        codings.append({"system": severity.system, "code": f"4tier-{severity.code4}", "display": severity.display4})
    return codings


def _severity_observation(
    output: ModelOutput,
    severity: Severity,
    *,
    id_value: str,
    device: PlannedResource,
    subject: dict[str, Any] | None,
    effective: str | None,
    issued: str,
    label: str,
) -> PlannedResource:
    """The triage tier as one "EKG impression" (LOINC 8601-7) a worklist can filter on."""
    code, display = LOINC["ecg_impression"]
    obs = observation_base(
        identifier_value=f"{id_value}/{output.model}/{output.version}/severity",
        code={
            "coding": [{"system": SYSTEM["loinc"], "code": code, "display": display}],
            "text": "ECG severity tier (AI triage)",
        },
        subject=subject,
        effective=effective,
        issued=issued,
        meta={"security": [dict(AI_SECURITY_LABEL)], "tag": [_model_tag(output)]},
    )
    obs["valueCodeableConcept"] = {"coding": _severity_codings(severity), "text": severity.display4 or severity.display}
    obs["interpretation"] = [
        {"coding": [{"system": SYSTEM["obs_interpretation"], "code": severity.flag[0], "display": severity.flag[1]}]}
    ]
    rule = output.extra.get("severity_rule")
    obs["note"] = [{"text": f"Model {output.model} {output.version}" + (f": {rule}" if rule else "") + f". {label}"}]
    obs["device"] = {"reference": device.placeholder, "display": f"{output.model} {output.version}"}
    return _planned(obs)


def _abnormality_observations(
    output: ModelOutput,
    *,
    id_value: str,
    device: PlannedResource,
    subject: dict[str, Any] | None,
    effective: str | None,
    issued: str,
    label: str,
    derived_from: Sequence[str],
) -> list[PlannedResource]:
    """The clinical abnormalities the model predicted from the ECG, one Observation each (none when withheld)."""
    return [
        _planned(
            abnormality_observation(
                a,
                output,
                identifier_base=f"{id_value}/{output.model}/{output.version}",
                subject=subject,
                effective=effective,
                issued=issued,
                device_ref=device.placeholder,
                derived_from=derived_from,
                meta={"security": [dict(AI_SECURITY_LABEL)], "tag": [_model_tag(output)]},
                label=label,
            )
        )
        for a in predicted_abnormalities(output)
    ]


def _conclusion(result: AnalysisResult, flags: list[str], version: int = 1) -> str:
    lines: list[str] = []
    for output in result.outputs:
        if output.findings:
            lines.append(explanation_text(output) if output.task == LVEF_TASK else output_summary(output))
        lines.extend(summary_lines(output))  # what the model predicted from the ECG, never measured
    if flags:
        lines.append("Flags: " + "; ".join(flags) + ".")
    if version > 1:
        lines.append(revision_note(version))
    lines.append(result.label)
    return "\n".join(lines)


def revision_note(version: int) -> str:
    """The line a revised result carries for its reader (FHIR conclusion, HL7 NTE)."""
    return f"Amended: result version {version}, re-analysed with the current models; it replaces the earlier result."


#: presentedForm order: the PDF report first, then the PNG image, then anything else.
_FORM_ORDER = {"application/pdf": 0, "image/png": 1}


def _presented_form(
    attachments: Iterable[Attachment], data: Mapping[str, bytes] | None, flags: list[str]
) -> list[dict[str, Any]]:
    """FHIR Attachments for the rendered report and image whose bytes the caller supplied.

    ``hash`` is the base64 SHA-1 of the data, as R4 defines Attachment.hash; ``size``
    the byte count. An attachment without bytes (or whose bytes do not match its
    SHA-256) is left out and flagged: the EHR must not get a silently different file.
    """
    forms: list[dict[str, Any]] = []
    for att in sorted(attachments, key=lambda a: _FORM_ORDER.get(a.content_type, 9)):
        blob = (data or {}).get(att.blob_sha256)
        if blob is None:
            flags.append(f"attachment_unavailable:{att.content_type}")
            continue
        if hashlib.sha256(blob).hexdigest() != att.blob_sha256:
            flags.append(f"attachment_hash_mismatch:{att.content_type}")
            continue
        forms.append(
            {
                "contentType": att.content_type,
                "data": base64.b64encode(blob).decode("ascii"),
                "size": len(blob),
                "hash": base64.b64encode(hashlib.sha1(blob).digest()).decode("ascii"),
                "title": att.title,
            }
        )
    return forms


def build_report(
    result: AnalysisResult,
    *,
    patient: Patient,
    study: Study,
    message_id: str,
    patient_reference: str | None = None,
    patient_identifier_system: str | None = None,
    issued: datetime | None = None,
    assume_tz: tzinfo | None = None,
    include_patient_name: bool = False,
    attachments_data: Mapping[str, bytes] | None = None,
    version: int = 1,
    measurements_panel: bool = False,
    order: OrderLink | None = None,
) -> ReportBundle:
    """Map one analysis to validated FHIR R4 resources with their If-None-Exist queries.

    ``message_id`` identifies the report when the ECG has no SOP Instance UID, so the
    same message always maps to the same identifiers (idempotent re-delivery).
    ``issued`` defaults to now (UTC); a naive ``issued`` is taken as UTC.
    ``attachments_data`` maps an attachment's ``blob_sha256`` to its bytes: each of
    ``result.attachments`` found there becomes a ``presentedForm`` (PDF, then PNG).
    ``version`` >= 2 (a re-analysis) gives the same identifiers with status ``amended``.
    ``measurements_panel``: the global measurements as one Observation with a component each
    (:func:`mapping.fhir_measurements.measurement_panel`) instead of one Observation each.
    ``order``: the order the ECG was recorded for, as ``basedOn`` (:class:`OrderLink`; the
    caller searched the EHR for it); None or no identifiers: no ``basedOn``. It never
    changes the report's identifier, so re-delivery stays idempotent.
    Raises :class:`MappingError` when the result cannot form valid FHIR.
    """
    if not result.outputs:
        raise MappingError("analysis result has no model outputs to report")
    if version < 1:
        raise MappingError(f"result version {version} is not 1 or more")
    issued_dt = issued or datetime.now(UTC)
    if issued_dt.tzinfo is None:
        issued_dt = issued_dt.replace(tzinfo=UTC)
    issued_s = _fhir_instant(issued_dt.astimezone(UTC))
    label = result.label

    if study.sop_instance_uid:
        id_system, id_value = SYSTEM["dicom_uid"], f"urn:oid:{study.sop_instance_uid}"
        source: tuple[str, str] | None = (id_system, id_value)
    else:
        id_system, id_value = SYSTEM["ecgbridge_result"], message_id
        source = None

    report_flags: list[str] = []
    subject = _subject(patient, patient_reference, patient_identifier_system, include_patient_name)
    if subject is None:
        report_flags.append("no_patient_id")
    acquired, time_flag = acquisition_time(study.acquired_at, assume_tz)
    effective = _fhir_instant(acquired) if acquired is not None else None
    if time_flag:
        report_flags.append(time_flag)
    presented = _presented_form(result.attachments, attachments_data, report_flags)
    if order is not None and order.flag:
        report_flags.append(order.flag)
    flags = _dedupe([*result.quality_flags, *result.ecg_flags, *report_flags])

    devices: dict[str, PlannedResource] = {}
    observations: list[PlannedResource] = []
    conclusion_codes: list[dict[str, Any]] = []
    for output in result.outputs:
        key = f"{output.model}@{output.version}"
        if key not in devices:
            devices[key] = _device(output, label)
        device = devices[key]
        if output.task == "measurements":
            observations.extend(
                _measurement_observations(
                    output,
                    id_value=id_value,
                    device=device,
                    subject=subject,
                    effective=effective,
                    issued=issued_s,
                    label=label,
                    panel=measurements_panel,
                )
            )
            continue
        if output.task == LVEF_TASK and output.findings:
            observations.append(
                _lvef_observation(
                    output,
                    id_value=id_value,
                    device=device,
                    subject=subject,
                    effective=effective,
                    issued=issued_s,
                    label=label,
                )
            )
            continue
        severity = severity_of_output(output)
        if severity is not None:
            observations.append(
                _severity_observation(
                    output,
                    severity,
                    id_value=id_value,
                    device=device,
                    subject=subject,
                    effective=effective,
                    issued=issued_s,
                    label=label,
                )
            )
            conclusion_codes.append({"coding": _severity_codings(severity), "text": severity.display})
        finding_refs: list[str] = []
        for finding in output.findings:
            obs = _observation(
                finding,
                output,
                report_id_value=id_value,
                device_placeholder=device.placeholder,
                subject=subject,
                effective=effective,
                issued=issued_s,
                label=label,
            )
            observations.append(obs)
            finding_refs.append(obs.placeholder)
            if finding.present and severity is None:  # a triage output is summed up by its tier
                conclusion_codes.append({"coding": _finding_codings(finding, output), "text": finding.display})
        observations.extend(
            _abnormality_observations(
                output,
                id_value=id_value,
                device=device,
                subject=subject,
                effective=effective,
                issued=issued_s,
                label=label,
                derived_from=finding_refs,
            )
        )

    tags = _dedupe_tags(_model_tag(o) for o in result.outputs)
    if version > 1:
        tags.append(_version_tag(version))
        observations = [_amended(o) for o in observations]
    loinc_code, loinc_display = LOINC["ecg_panel"]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [dict(AI_SECURITY_LABEL)], "tag": tags},
        "identifier": [{"system": id_system, "value": id_value}],
    }
    based_on = order.based_on() if order is not None else []
    if based_on:
        report["basedOn"] = based_on
    report |= {
        "status": "preliminary" if version == 1 else "amended",
        "category": [{"coding": [{"system": SYSTEM["v2_0074"], "code": "EC", "display": "Electrocardiac"}]}],
        "code": {
            "coding": [{"system": SYSTEM["loinc"], "code": loinc_code, "display": loinc_display}],
            "text": loinc_display,
        },
    }
    if subject is not None:
        report["subject"] = copy.deepcopy(subject)
    if effective is not None:
        report["effectiveDateTime"] = effective
    report["issued"] = issued_s
    report["result"] = [{"reference": o.placeholder} for o in observations]
    report["conclusion"] = _conclusion(result, flags, version)
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    if presented:
        report["presentedForm"] = presented
    planned_report = PlannedResource(
        resource=validate_resource(report),
        if_none_exist=identifier_query(id_system, id_value),
        placeholder=_placeholder("DiagnosticReport", id_system, id_value),
    )
    return ReportBundle(
        devices=list(devices.values()),
        observations=observations,
        report=planned_report,
        issued=issued_s,
        source_identifier=source,
        version=version,
    )


def _dedupe_tags(tags: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for tag in tags:
        if tag not in out:
            out.append(tag)
    return out


# --------------------------------------------------------------------------- outcomes


def operation_outcome_text(body: Mapping[str, Any] | None, *, limit: int = 500) -> str:
    """One line summarising an OperationOutcome, for error records and exceptions.

    Keeps severity, code, diagnostics and details.text of each issue; anything that is
    not an OperationOutcome summarises as ``""`` so callers can fall back to the status.
    """
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        head = "/".join(str(issue[k]) for k in ("severity", "code") if issue.get(k))
        texts: list[str] = []
        diagnostics = issue.get("diagnostics")
        if diagnostics:
            texts.append(str(diagnostics))
        details = issue.get("details")
        if isinstance(details, Mapping) and details.get("text"):
            if str(details["text"]) not in texts:
                texts.append(str(details["text"]))
        expression = issue.get("expression") or issue.get("location")
        if isinstance(expression, list) and expression:
            texts.append("at " + ", ".join(str(e) for e in expression))
        parts.append((head + ": " if head and texts else head) + " ".join(texts))
    text = "; ".join(p for p in parts if p)
    return text if len(text) <= limit else text[: limit - 3] + "..."
