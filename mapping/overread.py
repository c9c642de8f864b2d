"""A cardiologist's statements about an ECG -> the models' classes and severity tier (pure).

An over-read (the confirmed read of an ECG) arrives as statements: coded (SNOMED CT, or
SCP-ECG statement acronyms as PTB-XL spells them) or free text in the wording of the ECG
management systems (GE MUSE, Philips TraceMasterVue, Mortara / Hillrom, and PTB-XL's English
reports). :func:`map_statements` turns them into a label the diagnosis and triage models can
be compared with. Why a table and not a learnt parser: every decision must be explainable to
the people who validate a model, and a statement no table knows must be *seen* (counted and
listed), never guessed.

**Coded statements.** SNOMED CT (``SCT``, ``SNOMED``, ``SNOMED-CT``, ``http://snomed.info/sct``)
through ``codes.SNOMED_TO_SUPERCLASS`` (superclass; plus the superclass concepts of
``codes.SUPERCLASS_SNOMED``) and ``codes.SNOMED_SEVERITY`` (tier); SCP-ECG acronyms
(``SCPECG``, ``SCP-ECG``, ``SCP``: ``CRBBB``, ``IMI``, ``SR``, ...) through
``codes.SCP_SUPERCLASS`` and ``codes.SCP_SEVERITY``. A code no table knows falls back to its
text (CE.2 / CodeMeaning).

**Free text.** :data:`TEXT_STATEMENTS` maps the common wordings (upper or lower case,
punctuation ignored, British or American spelling, the usual abbreviations such as LVH, RBBB,
LAFB, PVC, A-V) to one of those codes, e.g. ``SINUS RHYTHM`` -> SCP ``SR``, ``ANTERIOR INFARCT,
AGE UNDETERMINED`` -> ``AMI``, ``LEFT VENTRICULAR HYPERTROPHY`` -> ``LVH``, ``RIGHT BUNDLE BRANCH
BLOCK`` -> ``CRBBB``. A statement is split into clauses (at ``.``, ``;``, ``:``, ``,`` and line
ends); in each clause the longest known wordings are found. :data:`ADMINISTRATIVE` wordings
(``ABNORMAL ECG``, ``CONFIRMED BY``, ``NO PREVIOUS TRACING``, rates, lead lists) are known but
name no finding; a clause with neither is *unmatched*: listed in ``ReadLabel.unmatched``.

**Qualifiers (the negation rule).** A finding stated plainly is *confirmed*. One stated with
a hedge (:data:`HEDGES`: possible, probable, consider, cannot rule out, cannot be excluded,
suggests, consistent with, borderline, likely, ``?``, ...) is *uncertain*: it is not a
confirmed positive. One stated with a negation (:data:`NEGATIONS`: no, no evidence of,
without, absence of, ... ruled out, ... resolved) is *negated*: it says the finding is absent.
A qualifier applies to the finding it precedes in its clause (``SINUS RHYTHM WITH POSSIBLE
LVH``: only LVH is uncertain), or to the finding before it when it trails it (``myocardial
ischaemia is likely``, ``... cannot be excluded``). "ACUTE" with an infarct makes it an acute
infarct (urgent tier); "AGE UNDETERMINED" / "OLD" keep it an infarct of undetermined age.

**The label** (:class:`ReadLabel`):

- ``labels``: ``{NORM, MI, STTC, CD, HYP: 0 | 1}``, 1 when a *confirmed* finding maps to the
  superclass; None when no finding of the read (confirmed or uncertain) maps to any
  superclass: such a read (``SINUS RHYTHM`` alone) gives no diagnosis label.
- ``uncertain``: the superclasses named only by uncertain findings: their 0 is not a
  trustworthy "absent"; a validation leaves them out.
- ``severity4`` / ``severity3``: the triage tiers (``codes.SEVERITY4`` / ``SEVERITY3``), by
  the triage table's own rule: the worst tier among the confirmed *and* uncertain findings
  (the triage labels count a "possible" injury: ``codes.MIN_LIKELIHOOD``), negated ones left
  out; None when any finding or clause has no tier (an unmatched statement could be the worst
  one) or when no finding has one.
- ``unmatched``: the clauses no table knows, as written.

Nothing here logs; statement text is clinical content, never patient identity.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ecgbridge.mapping.codes import (
    SCP_SEVERITY,
    SCP_SUPERCLASS,
    SEVERITY3,
    SEVERITY4,
    SNOMED_SEVERITY,
    SNOMED_TO_SUPERCLASS,
    SUPERCLASS_SNOMED,
    to_severity3,
)

__all__ = [
    "SUPERCLASSES",
    "Statement",
    "MappedFinding",
    "ReadLabel",
    "Qualifier",
    "TEXT_STATEMENTS",
    "ADMINISTRATIVE",
    "HEDGES",
    "NEGATIONS",
    "map_statements",
    "normalise",
    "concept_of_code",
]

#: The diagnosis model's classes (PTB-XL superclasses), in the models' order.
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")

Qualifier = Literal["confirmed", "uncertain", "negated"]

_SNOMED_SYSTEMS = frozenset({"SCT", "SNOMED", "SNOMEDCT", "SNOMED-CT", "SNOMED CT", "SNM", "HTTP://SNOMED.INFO/SCT"})
_SCP_SYSTEMS = frozenset({"SCPECG", "SCP-ECG", "SCP", "SCP_ECG"})
_SUPERCLASS_OF_SNOMED_CONCEPT = {code: cls for cls, (code, _display) in SUPERCLASS_SNOMED.items()}


@dataclass(frozen=True)
class Statement:
    """One statement of a read as it came: free text, a code (with its coding system), or both."""

    text: str | None = None
    code: str | None = None
    system: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("text", self.text), ("code", self.code), ("system", self.system)) if v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Statement:
        return cls(text=data.get("text"), code=data.get("code"), system=data.get("system"))


@dataclass(frozen=True)
class MappedFinding:
    """A finding read from one statement: which concept, its superclass and tier, how it was stated."""

    statement: int  #: index of the statement it came from
    text: str  #: the wording matched (or the code's text)
    concept: str  #: "scp:CRBBB" or "sct:164865005"
    superclass: str | None
    level4: int | None  #: 0-3 (``codes.SEVERITY4``); None: the tier tables do not know it
    qualifier: Qualifier
    via: Literal["code", "text"]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ReadLabel:
    """What a read says in the models' terms (see the module docstring for each rule)."""

    findings: tuple[MappedFinding, ...] = ()
    labels: dict[str, int] | None = None
    uncertain: tuple[str, ...] = ()
    severity4: str | None = None
    severity3: str | None = None
    unmatched: tuple[str, ...] = ()
    #: Clauses of administrative wording (known, no finding).
    administrative: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """Every clause of the read was understood (nothing unmatched)."""
        return not self.unmatched

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "uncertain": list(self.uncertain),
            "severity4": self.severity4,
            "severity3": self.severity3,
            "unmatched": list(self.unmatched),
            "findings": [f.to_dict() for f in self.findings],
        }


# ----- free-text tables --------------------------------------------------------------------------
#: Normalised wording -> concept ("scp:<SCP-ECG acronym>" or "sct:<SNOMED CT id>"). Wordings are
#: written as :func:`normalise` leaves them: lower case, no punctuation, abbreviations expanded
#: (LVH -> left ventricular hypertrophy), "infarction" -> "infarct", "ischaemia" -> "ischemia",
#: plurals singular (waves -> wave), "a-v" / "1st" -> "av" / "first".
TEXT_STATEMENTS: dict[str, str] = {
    # --- normal
    "normal ecg": "scp:NORM",
    "normal ekg": "scp:NORM",
    "otherwise normal ecg": "scp:NORM",
    "otherwise normal ekg": "scp:NORM",
    "normal tracing": "scp:NORM",
    "within normal limits": "scp:NORM",
    "normal electrocardiogram": "scp:NORM",
    # --- rhythm (no superclass)
    "sinus rhythm": "scp:SR",
    "normal sinus rhythm": "scp:SR",
    "regular sinus rhythm": "scp:SR",
    "sinus arrhythmia": "scp:SARRH",
    "sinus bradycardia": "scp:SBRAD",
    "marked sinus bradycardia": "scp:SBRAD",
    "sinus tachycardia": "scp:STACH",
    "atrial fibrillation": "scp:AFIB",
    "atrial fibrillation with rapid ventricular response": "scp:AFIB",
    "atrial fibrillation with slow ventricular response": "scp:AFIB",
    "atrial fibrillation with controlled ventricular response": "scp:AFIB",
    "atrial flutter": "scp:AFLT",
    "supraventricular tachycardia": "scp:SVTAC",
    "paroxysmal supraventricular tachycardia": "scp:PSVT",
    "supraventricular arrhythmia": "scp:SVARR",
    "ventricular tachycardia": "sct:164895002",
    "ventricular fibrillation": "sct:164896001",
    "junctional rhythm": "sct:426995002",
    "junctional escape rhythm": "sct:426995002",
    "accelerated junctional rhythm": "sct:426664006",
    "ectopic atrial rhythm": "sct:29320008",
    "idioventricular rhythm": "sct:61277005",
    "accelerated idioventricular rhythm": "sct:61277005",
    "electronic pacemaker": "scp:PACE",
    "electronic ventricular pacemaker": "scp:PACE",
    "electronic atrial pacemaker": "scp:PACE",
    "paced rhythm": "scp:PACE",
    "ventricular paced rhythm": "scp:PACE",
    "atrial paced rhythm": "scp:PACE",
    "av dual paced rhythm": "scp:PACE",
    "dual chamber pacemaker": "scp:PACE",
    "pacemaker rhythm": "scp:PACE",
    # --- ectopy
    "premature ventricular complex": "scp:PVC",
    "premature ventricular contraction": "scp:PVC",
    "ventricular premature complex": "scp:PVC",
    "ventricular premature beat": "scp:PVC",
    "ventricular extrasystole": "scp:PVC",
    "multifocal premature ventricular complex": "scp:PVC",
    "premature atrial complex": "scp:PAC",
    "premature atrial contraction": "scp:PAC",
    "atrial premature complex": "scp:PAC",
    "atrial premature beat": "scp:PAC",
    "premature supraventricular complex": "scp:PAC",
    "supraventricular premature complex": "scp:PAC",
    "supraventricular extrasystole": "scp:PAC",
    "premature complex": "scp:PRC(S)",
    "ventricular bigeminy": "scp:BIGU",
    "bigeminy": "scp:BIGU",
    "bigeminal pattern": "scp:BIGU",
    "ventricular trigeminy": "scp:TRIGU",
    "trigeminy": "scp:TRIGU",
    # --- AV conduction
    "first degree av block": "scp:1AVB",
    "av block first degree": "scp:1AVB",
    "prolonged pr interval": "scp:LPR",
    "prolonged pr": "scp:LPR",
    "pr interval is prolonged": "scp:LPR",
    "long pr interval": "scp:LPR",
    "short pr interval": "sct:49578007",
    "short pr": "sct:49578007",
    "second degree av block": "scp:2AVB",
    "second degree av block mobitz i": "sct:54016002",
    "second degree av block mobitz type i": "sct:54016002",
    "mobitz i": "sct:54016002",
    "mobitz type i": "sct:54016002",
    "wenckebach": "sct:54016002",
    "second degree av block mobitz ii": "sct:28189009",
    "second degree av block mobitz type ii": "sct:28189009",
    "mobitz ii": "sct:28189009",
    "mobitz type ii": "sct:28189009",
    "2 to 1 av block": "sct:164903001",
    "third degree av block": "scp:3AVB",
    "complete av block": "scp:3AVB",
    "complete heart block": "scp:3AVB",
    "av block": "sct:233917008",
    # --- intraventricular conduction
    "right bundle branch block": "scp:CRBBB",
    "complete right bundle branch block": "scp:CRBBB",
    "incomplete right bundle branch block": "scp:IRBBB",
    "left bundle branch block": "scp:CLBBB",
    "complete left bundle branch block": "scp:CLBBB",
    "incomplete left bundle branch block": "scp:ILBBB",
    "left anterior fascicular block": "scp:LAFB",
    "left posterior fascicular block": "scp:LPFB",
    "intraventricular conduction delay": "scp:IVCD",
    "intraventricular conduction defect": "scp:IVCD",
    "intraventricular conduction disturbance": "scp:IVCD",
    "nonspecific intraventricular conduction delay": "scp:IVCD",
    "nonspecific intraventricular block": "scp:IVCD",
    "nonspecific intraventricular delay": "scp:IVCD",
    "intraventricular block": "scp:IVCD",
    "wolff parkinson white": "scp:WPW",
    "ventricular preexcitation": "scp:WPW",
    "pre excitation": "scp:WPW",
    # --- hypertrophy and atria
    "left ventricular hypertrophy": "scp:LVH",
    "left ventricular hypertrophy with repolarization abnormality": "scp:LVH",
    "left ventricular hypertrophy with secondary repolarization abnormality": "scp:LVH",
    "left ventricular hypertrophy with strain": "scp:LVH",
    "left ventricular hypertrophy with qrs widening": "scp:LVH",
    "left ventricular strain": "sct:370365005",
    "right ventricular hypertrophy": "scp:RVH",
    "biventricular hypertrophy": "sct:266249003",
    "septal hypertrophy": "scp:SEHYP",
    "voltage criteria for left ventricular hypertrophy": "scp:VCLVH",
    "voltage are high": "scp:VCLVH",
    "minimal voltage criteria for left ventricular hypertrophy": "scp:VCLVH",
    "moderate voltage criteria for left ventricular hypertrophy": "scp:VCLVH",
    "left atrial enlargement": "scp:LAO/LAE",
    "left atrial abnormality": "scp:LAO/LAE",
    "left atrial overload": "scp:LAO/LAE",
    "right atrial enlargement": "scp:RAO/RAE",
    "right atrial abnormality": "scp:RAO/RAE",
    "right atrial overload": "scp:RAO/RAE",
    "biatrial enlargement": "sct:195126007",
    # --- infarction (an infarct "of undetermined age" is the default; "acute" is handled apart)
    "myocardial infarct": "sct:164865005",
    "infarct": "sct:164865005",
    "old infarct": "sct:164867002",
    "old myocardial infarct": "sct:164867002",
    "anterior infarct": "scp:AMI",
    "anterior myocardial infarct": "scp:AMI",
    "extensive anterior infarct": "scp:AMI",
    "anteroseptal infarct": "scp:ASMI",
    "anteroseptal myocardial infarct": "scp:ASMI",
    "septal infarct": "scp:ASMI",
    "anterolateral infarct": "scp:ALMI",
    "anterolateral myocardial infarct": "scp:ALMI",
    "lateral infarct": "scp:LMI",
    "high lateral infarct": "scp:LMI",
    "lateral myocardial infarct": "scp:LMI",
    "inferior infarct": "scp:IMI",
    "inferior myocardial infarct": "scp:IMI",
    "inferolateral infarct": "scp:ILMI",
    "inferolateral myocardial infarct": "scp:ILMI",
    "inferoposterior infarct": "scp:IPMI",
    "inferoposterior myocardial infarct": "scp:IPMI",
    "inferoposterolateral infarct": "scp:IPLMI",
    "posterior infarct": "scp:PMI",
    "posterior myocardial infarct": "scp:PMI",
    "acute myocardial infarct": "sct:57054005",
    "acute mi": "sct:57054005",
    "st elevation myocardial infarct": "sct:57054005",
    "stemi": "sct:57054005",
    "subendocardial injury": "scp:INJAS",
    "anteroseptal injury": "scp:INJAS",
    "anterolateral injury": "scp:INJAL",
    "inferior injury": "scp:INJIN",
    "lateral injury": "scp:INJLA",
    "inferolateral injury": "scp:INJIL",
    "injury pattern": "scp:INJAS",
    "ventricular aneurysm": "scp:ANEUR",
    # --- ST-T
    "st elevation": "scp:STE_",
    "st segment elevation": "scp:STE_",
    "st depression": "scp:STD_",
    "st segment depression": "scp:STD_",
    "st segment are depressed": "scp:STD_",
    "st segment depressed": "scp:STD_",
    "st segment are slightly depressed": "scp:STD_",
    "st segment are elevated": "scp:STE_",
    "st segment elevated": "scp:STE_",
    "nonspecific st abnormality": "scp:NST_",
    "nonspecific st change": "scp:NST_",
    "nonspecific st t abnormality": "scp:NST_",
    "nonspecific st t change": "scp:NST_",
    "nonspecific st t wave abnormality": "scp:NST_",
    "nonspecific st t wave change": "scp:NST_",
    "nonspecific st and t wave abnormality": "scp:NST_",
    "nonspecific st and t wave change": "scp:NST_",
    "nondiagnostic st t wave change": "scp:NST_",
    "st t abnormality": "scp:NST_",
    "st t change": "scp:NST_",
    "st t wave abnormality": "scp:NST_",
    "st t wave change": "scp:NST_",
    "st and t wave abnormality": "scp:NST_",
    "repolarization abnormality": "scp:NST_",
    "nonspecific t wave abnormality": "scp:NDT",
    "nonspecific t wave change": "scp:NDT",
    "nonspecific t wave flattening": "scp:NDT",
    "t wave abnormality": "scp:NDT",
    "t wave change": "scp:NDT",
    "t wave flattening": "scp:NDT",
    "t wave inversion": "scp:NDT",
    "inverted t wave": "scp:NDT",
    "t wave are inverted": "scp:NDT",
    "t wave inverted": "scp:NDT",
    "t wave are flat": "scp:LOWT",
    "t wave are low or flat": "scp:LOWT",
    "low amplitude t wave": "scp:LOWT",
    "flat t wave": "scp:LOWT",
    "ischemia": "scp:ISC_",
    "myocardial ischemia": "scp:ISC_",
    "ischemic st t change": "scp:ISC_",
    "ischemic heart disease": "scp:ISC_",
    "ischemic st change": "scp:ISC_",
    "anterior ischemia": "scp:ISCAN",
    "anteroseptal ischemia": "scp:ISCAS",
    "anterolateral ischemia": "scp:ISCAL",
    "lateral ischemia": "scp:ISCLA",
    "inferior ischemia": "scp:ISCIN",
    "inferolateral ischemia": "scp:ISCIL",
    "prolonged qt": "scp:LNGQT",
    "prolonged qt interval": "scp:LNGQT",
    "long qt": "scp:LNGQT",
    "long qt interval": "scp:LNGQT",
    "qt prolongation": "scp:LNGQT",
    "digitalis effect": "scp:DIG",
    "electrolyte abnormality": "scp:EL",
    "electrolyte disturbance": "scp:EL",
    "hyperkalemia": "scp:EL",
    "hypokalemia": "scp:EL",
    "drug effect": "scp:EL",
    "early repolarization": "sct:428417006",
    # --- form
    "left axis deviation": "sct:39732003",
    "right axis deviation": "sct:47665007",
    "indeterminate axis": "sct:251200008",
    "low voltage qrs": "scp:LVOLT",
    "low qrs voltage": "scp:LVOLT",
    "low voltage": "scp:LVOLT",
    "low limb lead voltage": "scp:LVOLT",
    "high qrs voltage": "scp:HVOLT",
    "poor r wave progression": "sct:365413008",
    "abnormal r wave progression": "sct:365413008",
    "poor progression of r wave": "sct:365413008",
    "qs complex": "scp:QWAVE",
    "q wave": "scp:QWAVE",
    "abnormal qrs": "scp:ABQRS",
    "u wave": "sct:164937009",
    "brugada": "sct:418818005",
}

#: Known wording that names no finding (summary lines, signatures, comparisons, rates, leads).
ADMINISTRATIVE: tuple[str, ...] = (
    "abnormal ecg",
    "abnormal ekg",
    "borderline ecg",
    "borderline ekg",
    "abnormal rhythm ecg",
    "unconfirmed",
    "unconfirmed report",
    "unconfirmed diagnosis",
    "confirmed by",
    "confirmed diagnosis",
    "overread by",
    "reviewed by",
    "read by",
    "interpreted by",
    "referred by",
    "when compared with ecg of",
    "compared with",
    "compared to",
    "no significant change",
    "not significantly changed",
    "no change",
    "no previous tracing",
    "no previous tracing available for comparison",
    "no previous ecg",
    "previous ecg",
    "trace only requested",
    "technically difficult",
    "technically limited",
    "poor quality",
    "artifact",
    "baseline wander",
    "rate",
    "ventricular rate",
    "atrial rate",
    "heart rate",
    "age undetermined",
    "age indeterminate",
    "probably old",
    "acute",
    "edit",
    "no definite pathology",
    "normal variant",
    "the age of the change is uncertain",
)

#: Wording that makes a finding uncertain: not a confirmed positive.
HEDGES: tuple[str, ...] = (
    "possible",
    "possibly",
    "probable",
    "probably",
    "consider",
    "cannot rule out",
    "can not rule out",
    "cannot exclude",
    "can not exclude",
    "rule out",
    "cannot be excluded",
    "can not be excluded",
    "cannot be ruled out",
    "not excluded",
    "not ruled out",
    "suggest",
    "suggests",
    "suggesting",
    "suggestive of",
    "suspect",
    "suspected",
    "suspicious for",
    "questionable",
    "query",
    "?",
    "borderline",
    "may be",
    "might be",
    "likely",
    "is likely",
    "consistent with",
    "compatible with",
    "versus",
    "equivocal",
    "may be due to",
    "due to",
    "a likely cause",
    "could be",
)

#: Wording that says a finding is absent.
NEGATIONS: tuple[str, ...] = (
    "no",
    "not",
    "without",
    "no evidence of",
    "no sign of",
    "absence of",
    "absent",
    "negative for",
    "no longer",
    "free of",
    "excluded",
    "ruled out",
    "resolved",
    "no longer present",
    "not present",
    "not seen",
)

#: Hedges and negations that only ever trail the finding they qualify ("... is likely", "... ruled out").
_TRAILING_ONLY: tuple[str, ...] = (
    "cannot be excluded",
    "can not be excluded",
    "cannot be ruled out",
    "not excluded",
    "not ruled out",
    "is likely",
    "is possible",
    "is probable",
    "is suspected",
    "is questionable",
    "excluded",
    "ruled out",
    "resolved",
    "no longer present",
    "not present",
    "not seen",
)
#: Qualifiers that trail a finding when nothing follows in the clause ("LVH possible", "infarct ?");
#: before another finding they are that finding's ("sinus rhythm, possible LVH").
_TRAILING_AT_END: tuple[str, ...] = ("likely", "possible", "probable", "suspected", "questionable", "?", "absent")

#: Tokens that carry nothing on their own: lead names, numbers, units, glue words.
_FILLER = frozenset(
    "i ii iii avr avl avf v1 v2 v3 v4 v5 v6 v7 v8 v9 in and or of the to a an lead leads limb chest precordial "
    "with ms msec mv bpm per min minute second seconds is are was were be this these it its at on from than by "
    "s sec beat mm degree degrees lcx lad rca".split()
)

#: Degree and frequency words that may stand beside a finding without changing it.
_MODIFIERS = frozenset(
    "occasional frequent rare multiple multifocal isolated marked mild minor moderate slight slightly minimal "
    "diffuse widespread generalized generalised extensive now also but otherwise present seen noted pattern "
    "probably due type new rapid slow ventricular response controlled uncontrolled wide narrow complex "
    "segment segments change changes nonspecific nondiagnostic secondary old inversion high".split()
)

#: Abbreviations and spellings -> the words the tables use (applied to whole words).
_WORDS: dict[str, str] = {
    "lvh": "left ventricular hypertrophy",
    "lv": "left ventricular",
    "rvh": "right ventricular hypertrophy",
    "rbbb": "right bundle branch block",
    "lbbb": "left bundle branch block",
    "irbbb": "incomplete right bundle branch block",
    "ilbbb": "incomplete left bundle branch block",
    "lafb": "left anterior fascicular block",
    "lahb": "left anterior fascicular block",
    "lpfb": "left posterior fascicular block",
    "lphb": "left posterior fascicular block",
    "ivcd": "intraventricular conduction delay",
    "wpw": "wolff parkinson white",
    "lae": "left atrial enlargement",
    "rae": "right atrial enlargement",
    "afib": "atrial fibrillation",
    "aflutter": "atrial flutter",
    "nsr": "normal sinus rhythm",
    "pvc": "premature ventricular complex",
    "pvcs": "premature ventricular complex",
    "pac": "premature atrial complex",
    "pacs": "premature atrial complex",
    "svt": "supraventricular tachycardia",
    "psvt": "paroxysmal supraventricular tachycardia",
    "chb": "complete heart block",
    "mi": "myocardial infarct",
    "1st": "first",
    "2nd": "second",
    "3rd": "third",
    "infarction": "infarct",
    "infarcts": "infarct",
    "ischaemia": "ischemia",
    "ischaemic": "ischemic",
    "repolarisation": "repolarization",
    "hyperkalaemia": "hyperkalemia",
    "hypokalaemia": "hypokalemia",
    "atrioventricular": "av",
    "hemiblock": "fascicular block",
    "enlargment": "enlargement",
    "non": "non",  # joined with the next word below
    "waves": "wave",
    "changes": "change",
    "abnormalities": "abnormality",
    "complexes": "complex",
    "contractions": "contraction",
    "beats": "beat",
    "extrasystoles": "extrasystole",
    "voltages": "voltage",
    "segments": "segment",
    "abnormal": "abnormal",
    "ekg": "ecg",
}
#: Multi-word spellings -> one form (after the word pass).
_PHRASES: tuple[tuple[str, str], ...] = (
    ("a v", "av"),
    ("atrio ventricular", "av"),
    ("non specific", "nonspecific"),
    ("non diagnostic", "nondiagnostic"),
    ("intra ventricular", "intraventricular"),
    ("pre excitation", "preexcitation"),
    ("ventricular pre excitation", "ventricular preexcitation"),
    ("a fib", "atrial fibrillation"),
    ("st t wave", "st t wave"),
    ("st t", "st t"),
    ("can t", "cannot"),
    ("left ventricular hypertrophy left ventricular hypertrophy", "left ventricular hypertrophy"),
)


def normalise(text: str) -> str:
    """Lower case, accents and punctuation dropped, abbreviations expanded (see :data:`_WORDS`)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    folded = folded.replace("?", " ? ").replace("'", "")
    words = re.sub(r"[^a-z0-9?]+", " ", folded).split()
    joined = " ".join(_WORDS.get(w, w) for w in words)
    joined = f" {joined} "
    for old, new in _PHRASES:
        joined = joined.replace(f" {old} ", f" {new} ")
    return " ".join(joined.split())


def _alternation(phrases: Iterable[str]) -> re.Pattern[str]:
    ordered = sorted({normalise(p) for p in phrases}, key=len, reverse=True)
    body = "|".join(re.escape(p) for p in ordered if p)
    return re.compile(rf"(?<![a-z0-9])(?:{body})(?![a-z0-9])")


_TEXT_CONCEPTS: dict[str, str] = {normalise(k): v for k, v in TEXT_STATEMENTS.items()}
_ADMIN = frozenset(normalise(p) for p in ADMINISTRATIVE)
_KNOWN = _alternation([*_TEXT_CONCEPTS, *_ADMIN])
_HEDGE = _alternation(HEDGES)
_NEGATION = _alternation(NEGATIONS)
_TRAILING_ONLY_RE = re.compile(r"^\s*(" + _alternation(_TRAILING_ONLY).pattern + ")")
_TRAILING_AT_END_RE = re.compile(r"^\s*(?:is |are |was |be )?(" + _alternation(_TRAILING_AT_END).pattern + ")")
_SENTENCES = re.compile(r"(?:\.(?!\d)|;|\n|\r|\\\.br\\)+")
_CLAUSES = re.compile(r"[,:]+")


# ----- codes ----------------------------------------------------------------------------------------
def concept_of_code(code: str, system: str | None) -> str | None:
    """The concept ("scp:X" / "sct:N") of a coded statement, or None when no table knows it."""
    code = (code or "").strip()
    sys_name = (system or "").strip().upper()
    if not code:
        return None
    if sys_name in _SNOMED_SYSTEMS or (not sys_name and code.isdigit()):
        known = code in SNOMED_TO_SUPERCLASS or code in SNOMED_SEVERITY or code in _SUPERCLASS_OF_SNOMED_CONCEPT
        return f"sct:{code}" if known else None
    if sys_name in _SCP_SYSTEMS or not sys_name:
        upper = code.upper()
        return f"scp:{upper}" if upper in SCP_SEVERITY else None
    return None


def _describe(concept: str) -> tuple[str | None, int | None]:
    """(superclass, 4-tier level) of a concept."""
    kind, _, code = concept.partition(":")
    if kind == "scp":
        level = SCP_SEVERITY.get(code)
        return SCP_SUPERCLASS.get(code), (level[0] if level else None)
    superclass = SNOMED_TO_SUPERCLASS[code][0] if code in SNOMED_TO_SUPERCLASS else None
    superclass = superclass or _SUPERCLASS_OF_SNOMED_CONCEPT.get(code)
    sct_level = SNOMED_SEVERITY.get(code)
    return superclass, (sct_level[0] if sct_level else None)


_ACUTE_MI = "sct:57054005"
#: What may stand between two findings of one list, which then share the first one's qualifier.
_LISTED = (["or"], ["and"], ["nor"], ["and", "or"], ["or", "and"])


def _qualifier_of(before: str, after: str, *, last: bool) -> Qualifier:
    """How a finding is stated, from the words just before it and just after it in its clause.

    ``last``: no finding follows in the clause, so a trailing "possible" / "?" is this one's.
    """
    trailing = _TRAILING_ONLY_RE.match(after) or (_TRAILING_AT_END_RE.match(after) if last else None)
    if trailing:
        words = trailing.group(1)
        return "uncertain" if _HEDGE.fullmatch(words) else "negated"
    hedges = list(_HEDGE.finditer(before))
    negations = list(_NEGATION.finditer(before))
    if not hedges and not negations:
        return "confirmed"
    if not negations:
        return "uncertain"
    if not hedges:
        return "negated"
    hedge, negation = hedges[-1], negations[-1]
    if hedge.start() <= negation.start() < hedge.end():
        return "uncertain"  # "not excluded", "cannot rule out": the negation is part of the hedge
    return "uncertain" if hedge.end() >= negation.end() else "negated"  # the nearest one decides


def _text_findings(index: int, text: str) -> tuple[list[MappedFinding], list[str], list[str]]:
    """(findings, unmatched clauses, administrative clauses) of one free-text statement."""
    findings: list[MappedFinding] = []
    unmatched: list[str] = []
    admin: list[str] = []
    for sentence in _SENTENCES.split(text):
        norm_sentence = f" {normalise(sentence)} "
        acute = " acute " in norm_sentence and not re.search(
            r" (age undetermined|age indeterminate|old) ", norm_sentence
        )
        for clause in _CLAUSES.split(sentence):
            norm = normalise(clause)
            if not norm:
                continue
            matches = [m for m in _KNOWN.finditer(norm)]
            rest = _NEGATION.sub(" ", _HEDGE.sub(" ", _KNOWN.sub(" ", norm)))
            unknown = [w for w in rest.split() if w not in _FILLER and w not in _MODIFIERS and not w.isdigit()]
            if unknown:
                unmatched.append(" ".join(clause.split()))
            elif not any(m.group(0) not in _ADMIN for m in matches):
                admin.append(" ".join(clause.split()))
            wordings = [m for m in matches if m.group(0) not in _ADMIN]
            qualifier: Qualifier = "confirmed"
            for i, m in enumerate(wordings):
                concept = _TEXT_CONCEPTS[m.group(0)]
                superclass, level = _describe(concept)
                if superclass == "MI" and acute and concept != _ACUTE_MI:
                    level = _describe(_ACUTE_MI)[1]
                start = wordings[i - 1].end() if i else 0
                end = wordings[i + 1].start() if i + 1 < len(wordings) else len(norm)
                gap = norm[start : m.start()]
                if not (i and gap.split() in _LISTED):  # "no LVH or ischaemia": both negated
                    qualifier = _qualifier_of(gap, norm[m.end() : end], last=i + 1 == len(wordings))
                findings.append(
                    MappedFinding(
                        statement=index,
                        text=m.group(0),
                        concept=concept,
                        superclass=superclass,
                        level4=level,
                        qualifier=qualifier,
                        via="text",
                    )
                )
    return findings, unmatched, admin


def _coded_qualifier(text: str | None) -> Qualifier:
    if not text:
        return "confirmed"
    norm = normalise(text)
    if _HEDGE.search(norm):
        return "uncertain"
    if _NEGATION.search(norm):
        return "negated"
    return "confirmed"


# ----- the label ----------------------------------------------------------------------------------------
def map_statements(statements: Sequence[Statement]) -> ReadLabel:
    """A read's statements -> its :class:`ReadLabel` (rules in the module docstring)."""
    findings: list[MappedFinding] = []
    unmatched: list[str] = []
    admin: list[str] = []
    for index, statement in enumerate(statements):
        concept = concept_of_code(statement.code or "", statement.system) if statement.code else None
        if concept is not None:
            superclass, level = _describe(concept)
            findings.append(
                MappedFinding(
                    statement=index,
                    text=(statement.text or statement.code or "").strip(),
                    concept=concept,
                    superclass=superclass,
                    level4=level,
                    qualifier=_coded_qualifier(statement.text),
                    via="code",
                )
            )
            continue
        if statement.text and statement.text.strip():
            found, missed, known = _text_findings(index, statement.text)
            findings += found
            unmatched += missed
            admin += known
        elif statement.code:
            unmatched.append(f"{statement.code} ({statement.system or 'no coding system'})")
    return _label(findings, unmatched, admin)


def _label(findings: list[MappedFinding], unmatched: list[str], admin: list[str]) -> ReadLabel:
    stated = [f for f in findings if f.qualifier != "negated"]
    confirmed = {f.superclass for f in stated if f.qualifier == "confirmed" and f.superclass}
    hedged = {f.superclass for f in stated if f.qualifier == "uncertain" and f.superclass}
    labels = {c: int(c in confirmed) for c in SUPERCLASSES} if (confirmed or hedged) else None
    uncertain = tuple(c for c in SUPERCLASSES if c in hedged and c not in confirmed)
    levels = [f.level4 for f in stated]
    severity4 = severity3 = None
    if levels and not unmatched and all(level is not None for level in levels):
        worst = max(level for level in levels if level is not None)
        severity4, severity3 = SEVERITY4[worst], SEVERITY3[to_severity3(worst)]
    return ReadLabel(
        findings=tuple(findings),
        labels=labels,
        uncertain=uncertain,
        severity4=severity4,
        severity3=severity3,
        unmatched=tuple(dict.fromkeys(u for u in unmatched if u)),
        administrative=tuple(admin),
    )
