"""Terminology in one place: lead codes, LOINC, SNOMED CT, DICOM UIDs, FHIR systems.

Codes are written once here and imported everywhere else, so a mapping never
carries a private copy of a code that could drift.
"""

from __future__ import annotations

__all__ = [
    "SOP_12_LEAD_ECG",
    "SOP_GENERAL_ECG",
    "SOP_AMBULATORY_ECG",
    "ECG_STORAGE_SOP_CLASSES",
    "SOP_BASIC_TEXT_SR",
    "SOP_ENHANCED_SR",
    "SOP_COMPREHENSIVE_SR",
    "SR_STORAGE_SOP_CLASSES",
    "VERIFICATION_SOP_CLASS",
    "SCPECG_LEAD_CODES",
    "MDC_LEAD_CODES",
    "LEAD_BY_MEANING",
    "LOINC",
    "SUPERCLASS_SNOMED",
    "SUPERCLASS_DISPLAY",
    "SYSTEM",
    "ORDER_IDENTIFIER_TYPE",
    "RISK_TIER_SYSTEM",
    "RISK_TIER_DISPLAY",
    "SNOMED_TO_SUPERCLASS",
    "SEVERITY3",
    "SEVERITY4",
    "SEVERITY4_TO_3",
    "SEVERITY_SYSTEM",
    "SEVERITY_DISPLAY",
    "SEVERITY4_DISPLAY",
    "SEVERITY_SNOMED",
    "SEVERITY_INTERPRETATION",
    "SCP_SEVERITY",
    "SCP_SUPERCLASS",
    "SNOMED_SEVERITY",
    "MIN_LIKELIHOOD",
    "severity4_of_scp",
    "severity4_of_snomed",
    "to_severity3",
]

SOP_12_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
SOP_GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"
SOP_AMBULATORY_ECG = "1.2.840.10008.5.1.4.1.1.9.1.3"
ECG_STORAGE_SOP_CLASSES: tuple[str, ...] = (SOP_12_LEAD_ECG, SOP_GENERAL_ECG, SOP_AMBULATORY_ECG)
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Structured reports a cardiologist's read (over-read) may come in (``ecgbridge.core.labels``).
SOP_BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SOP_ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SOP_COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_STORAGE_SOP_CLASSES: tuple[str, ...] = (SOP_BASIC_TEXT_SR, SOP_ENHANCED_SR, SOP_COMPREHENSIVE_SR)

#: SCP-ECG lead codes (coding scheme "SCPECG", DICOM CID 3001) -> lead name.
SCPECG_LEAD_CODES: dict[str, str] = {
    "5.6.3-9-1": "I",
    "5.6.3-9-2": "II",
    "5.6.3-9-3": "V1",
    "5.6.3-9-4": "V2",
    "5.6.3-9-5": "V3",
    "5.6.3-9-6": "V4",
    "5.6.3-9-7": "V5",
    "5.6.3-9-8": "V6",
    "5.6.3-9-61": "III",
    "5.6.3-9-62": "aVR",
    "5.6.3-9-63": "aVL",
    "5.6.3-9-64": "aVF",
}

#: ISO/IEEE 11073 MDC lead codes (coding scheme "MDC") -> lead name.
MDC_LEAD_CODES: dict[str, str] = {
    "2:1": "I",
    "131329": "I",
    "2:2": "II",
    "131330": "II",
    "2:61": "III",
    "131389": "III",
    "2:62": "aVR",
    "131390": "aVR",
    "2:63": "aVL",
    "131391": "aVL",
    "2:64": "aVF",
    "131392": "aVF",
    "2:3": "V1",
    "131331": "V1",
    "2:4": "V2",
    "131332": "V2",
    "2:5": "V3",
    "131333": "V3",
    "2:6": "V4",
    "131334": "V4",
    "2:7": "V5",
    "131335": "V5",
    "2:8": "V6",
    "131336": "V6",
}

#: Code meanings some carts send without a known code value (matched case-insensitively).
LEAD_BY_MEANING: dict[str, str] = {
    "lead i": "I",
    "lead i (einthoven)": "I",
    "lead ii": "II",
    "lead ii (einthoven)": "II",
    "lead iii": "III",
    "lead iii (einthoven)": "III",
    "lead avr": "aVR",
    "lead avr (goldberger)": "aVR",
    "lead avl": "aVL",
    "lead avl (goldberger)": "aVL",
    "lead avf": "aVF",
    "lead avf (goldberger)": "aVF",
    "lead v1": "V1",
    "lead v2": "V2",
    "lead v3": "V3",
    "lead v4": "V4",
    "lead v5": "V5",
    "lead v6": "V6",
}

LOINC: dict[str, tuple[str, str]] = {
    "ecg_panel": ("34534-8", "12 lead EKG panel"),
    "ecg_impression": ("8601-7", "EKG impression"),
    "heart_rate": ("8867-4", "Heart rate"),
    "pr_interval": ("8625-6", "P-R Interval"),
    "qrs_duration": ("8633-0", "QRS duration"),
    "qt_interval": ("8634-8", "Q-T interval"),
    "qtc_interval": ("8636-3", "Q-T interval corrected"),
    "p_axis": ("8626-4", "P wave axis"),
    "qrs_axis": ("8632-2", "R wave axis"),
    "t_axis": ("8638-9", "T wave axis"),
    "lvef": ("10230-1", "Left ventricular Ejection fraction"),
}

#: PTB-XL diagnostic superclasses -> SNOMED CT findings (the closest ECG-finding concepts).
SUPERCLASS_SNOMED: dict[str, tuple[str, str]] = {
    "NORM": ("164854000", "Electrocardiogram normal"),
    "MI": ("164865005", "Electrocardiographic myocardial infarction"),
    "STTC": ("428750005", "Nonspecific ST-T abnormality on electrocardiogram"),
    "CD": ("44808001", "Conduction disorder of the heart"),
    "HYP": ("164873001", "Electrocardiographic left ventricular hypertrophy"),
}

SUPERCLASS_DISPLAY: dict[str, str] = {
    "NORM": "Normal ECG",
    "MI": "Myocardial infarction",
    "STTC": "ST/T change",
    "CD": "Conduction disturbance",
    "HYP": "Hypertrophy",
}

SYSTEM: dict[str, str] = {
    "loinc": "http://loinc.org",
    "snomed": "http://snomed.info/sct",
    "ucum": "http://unitsofmeasure.org",
    "v2_0074": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "obs_category": "http://terminology.hl7.org/CodeSystem/observation-category",
    "obs_interpretation": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    "v2_0203": "http://terminology.hl7.org/CodeSystem/v2-0203",
    "security": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "dicom_uid": "urn:dicom:uid",
    "ecgbridge_result": "urn:ecgbridge:result",
    "ecgbridge_model": "urn:ecgbridge:model",
}

#: Kind of order number -> its identifier type (HL7 table 0203, ``SYSTEM["v2_0203"]``), as a
#: FHIR report's ``basedOn`` names the order it answers (``mapping.fhir_report``).
ORDER_IDENTIFIER_TYPE: dict[str, tuple[str, str]] = {
    "placer": ("PLAC", "Placer Identifier"),
    "filler": ("FILL", "Filler Identifier"),
    "accession": ("ACSN", "Accession ID"),
}

#: Code system of a finding's risk tier (``Finding.tier``: where the class probability falls among
#: the model's ``tiers`` cut-offs, ``inference.models.Manifest.tier``). The tier grades how likely
#: the class is, not how abnormal the ECG is (NORM has tiers too), so no v3 ObservationInterpretation
#: code (H / HH are "above the reference range" of a measured value) fits it; FHIR carries it in this
#: system (an ``interpretation`` and a ``component``), HL7 as the CWE tier OBX.
RISK_TIER_SYSTEM = "urn:ecgbridge:risk-tier"

#: Risk tier code -> display. A tier code not listed (a model's own tier names) is sent as it is.
RISK_TIER_DISPLAY: dict[str, str] = {
    "low": "Low risk tier",
    "moderate": "Moderate risk tier",
    "high": "High risk tier",
}


# --------------------------------------------------------------------------------------------
# PhysioNet/CinC challenge SNOMED CT codes -> PTB-XL diagnostic superclass
# (moved here from ``training.datasets.challenge``, which imports it; the rules behind the
# table are described in that module's docstring).
# --------------------------------------------------------------------------------------------

#: SNOMED CT id -> (PTB-XL superclass, challenge description, PTB-XL analogue).
SNOMED_TO_SUPERCLASS: dict[str, tuple[str, str, str]] = {
    # MI
    "164865005": ("MI", "myocardial infarction", "IMI/AMI/... (MI)"),
    "164867002": ("MI", "old myocardial infarction", "MI statements"),
    "54329005": ("MI", "anterior myocardial infarction", "AMI"),
    "57054005": ("MI", "acute myocardial infarction", "INJ* / MI statements"),
    # STTC
    "428750005": ("STTC", "nonspecific ST-T abnormality", "NDT / NST_"),
    "164934002": ("STTC", "T wave abnormal", "NDT"),
    "59931005": ("STTC", "T wave inversion", "NDT"),
    "55930002": ("STTC", "ST changes", "NST_"),
    "429622005": ("STTC", "ST depression", "NST_ / ISC_"),
    "164931005": ("STTC", "ST elevation", "NST_"),
    "164930006": ("STTC", "ST interval abnormal", "NST_"),
    "111975006": ("STTC", "prolonged QT interval", "LNGQT"),
    "164861001": ("STTC", "myocardial ischemia", "ISC_"),
    "413444003": ("STTC", "acute myocardial ischemia", "ISC_"),
    "413844008": ("STTC", "chronic myocardial ischemia", "ISC_"),
    "426434006": ("STTC", "anterior ischemia", "ISCAN"),
    "425419005": ("STTC", "inferior ischaemia", "ISCIN"),
    "425623009": ("STTC", "lateral ischaemia", "ISCLA"),
    "704997005": ("STTC", "inferior ST segment depression", "ISCIN"),
    # CD
    "270492004": ("CD", "1st degree AV block", "1AVB"),
    "164947007": ("CD", "prolonged PR interval", "1AVB"),
    "195042002": ("CD", "2nd degree AV block", "2AVB"),
    "54016002": ("CD", "Mobitz I AV block", "2AVB"),
    "28189009": ("CD", "Mobitz II AV block", "2AVB"),
    "164903001": ("CD", "2:1 AV block", "2AVB"),
    "233917008": ("CD", "AV block", "_AVB"),
    "27885002": ("CD", "complete heart block", "3AVB"),
    "713427006": ("CD", "complete right bundle branch block", "CRBBB"),
    "59118001": ("CD", "right bundle branch block", "CRBBB"),
    "713426002": ("CD", "incomplete right bundle branch block", "IRBBB"),
    "164909002": ("CD", "left bundle branch block", "CLBBB"),
    "733534002": ("CD", "complete left bundle branch block", "CLBBB"),
    "251120003": ("CD", "incomplete left bundle branch block", "ILBBB"),
    "6374002": ("CD", "bundle branch block", "CRBBB/CLBBB"),
    "445118002": ("CD", "left anterior fascicular block", "LAFB"),
    "445211001": ("CD", "left posterior fascicular block", "LPFB"),
    "698252002": ("CD", "nonspecific intraventricular conduction disorder", "IVCD"),
    "82226007": ("CD", "diffuse intraventricular block", "IVCD"),
    "74390002": ("CD", "Wolff-Parkinson-White pattern", "WPW"),
    "195060002": ("CD", "ventricular pre-excitation", "WPW"),
    # HYP
    "164873001": ("HYP", "left ventricular hypertrophy", "LVH"),
    "370365005": ("HYP", "left ventricular strain", "LVH"),
    "89792004": ("HYP", "right ventricular hypertrophy", "RVH"),
    "266249003": ("HYP", "ventricular hypertrophy", "LVH/RVH"),
    "67741000119109": ("HYP", "left atrial enlargement", "LAO/LAE"),
    "253352002": ("HYP", "left atrial abnormality", "LAO/LAE"),
    "446813000": ("HYP", "left atrial hypertrophy", "LAO/LAE"),
    "253339007": ("HYP", "right atrial abnormality", "RAO/RAE"),
    "446358003": ("HYP", "right atrial hypertrophy", "RAO/RAE"),
    "195126007": ("HYP", "atrial hypertrophy", "LAO/LAE / RAO/RAE"),
}


# --------------------------------------------------------------------------------------------
# Severity triage: SCP-ECG statements and SNOMED CT codes -> a 4-tier and a 3-tier severity.
# --------------------------------------------------------------------------------------------
#
# Two nested scales. The 4-tier one is hierarchical; the 3-tier one merges its two middle
# levels, so one 4-tier label (or one model with three cumulative outputs) gives both:
#
#   level  4-tier (SEVERITY4)   3-tier (SEVERITY3)    meaning for the reading clinician
#   0      normal               normal                 no finding that needs follow-up
#   1      minor_abnormality    abnormal_nonurgent     a finding worth noting, usually benign
#                                                      or needing routine follow-up only
#   2      major_nonurgent      abnormal_nonurgent     structural / conduction / rhythm disease
#                                                      that needs a cardiology work-up, not today
#   3      urgent               urgent                 could be an emergency now: read at once
#
# The clinical rules that place a statement (each row of the tables says which one applied):
#
#   U-ACS    acute coronary syndrome signs: ST elevation (STEMI cannot be excluded from the
#            ECG alone), subendocardial injury, acute MI, acute ischaemia -> urgent
#   U-AVB    high-grade AV block: complete (third-degree) block, Mobitz II, 2:1 and
#            unspecified second-degree block (Mobitz II cannot be excluded) -> urgent
#   U-TACHY  ventricular tachycardia / fibrillation / flutter and supraventricular tachycardias
#            (SVT, PSVT, junctional tachycardia, atrial tachycardia) -> urgent
#   U-QT     long QT (risk of torsades de pointes; the statements carry no QTc value, so every
#            "long QT" is triaged as if it were very long) -> urgent
#   M-MI     infarction pattern of undetermined age (PTB-XL's MI statements say where, not
#            when; most are old infarcts) -> major
#   M-BBB    complete bundle branch block, pre-excitation (WPW), diffuse IV block -> major
#   M-HYP    ventricular hypertrophy (LVH, RVH, septal), LV strain -> major
#   M-ISCH   ischaemic ST-T changes without injury/elevation, aneurysm pattern -> major
#   M-RHYTHM atrial fibrillation / flutter (rate not given by the statement), pacing,
#            AV block of unspecified degree, escape rhythms, Brugada pattern -> major
#   M-EL     electrolyte or drug effect other than digitalis (hyperkalaemia cannot be told
#            apart from the statement) -> major
#   m-RATE   sinus bradycardia / tachycardia, bradycardia (the statement gives no extreme rate)
#            -> minor
#   m-COND   first-degree AV block / long PR, incomplete BBB, fascicular blocks,
#            nonspecific IV conduction delay -> minor
#   m-ECT    isolated ectopy (PAC, PVC, bigeminy/trigeminy patterns, escape beats) -> minor
#   m-STT    nonspecific ST-T / T-wave changes, ST depression not called ischaemic,
#            digitalis effect -> minor
#   m-FORM   voltage criteria only, low voltage, atrial enlargement, axis deviation, Q waves or
#            abnormal QRS / R progression without an infarct statement, short PR, U waves
#            -> minor
#   N        normal ECG, sinus rhythm, sinus arrhythmia (a physiological variant) -> normal
#
# An ECG's tier is the WORST tier among its statements ("worst-statement rule"): one urgent
# statement makes the ECG urgent whatever else it carries; an ECG is normal only when every
# statement it carries is normal. Likelihoods: PTB-XL gives each *diagnostic* statement a
# likelihood (15, 35, 50, 80, 100, from the cardiologist's wording, "cannot be excluded" ...
# "certain"; 0 = not stated), form and rhythm statements carry 0. PTB-XL's own label
# aggregation (and this project's superclass labels, ``training.datasets.ptbxl``) counts a
# statement whatever its likelihood; so does the tier by default (``MIN_LIKELIHOOD = 0``): a
# triage label must not drop a "possible" injury. ``severity4_of_scp(..., min_likelihood=x)``
# ignores diagnostic statements stated with a likelihood below x (likelihood 0 = not stated is
# always kept, so form and rhythm statements always count).

SEVERITY4: tuple[str, ...] = ("normal", "minor_abnormality", "major_nonurgent", "urgent")
SEVERITY3: tuple[str, ...] = ("normal", "abnormal_nonurgent", "urgent")
#: 4-tier level -> 3-tier level (the two middle levels merge).
SEVERITY4_TO_3: tuple[int, ...] = (0, 1, 1, 2)
MIN_LIKELIHOOD: float = 0.0

_N, _MINOR, _MAJOR, _URGENT = 0, 1, 2, 3

#: Code system of the tier codes in FHIR ``valueCodeableConcept`` / HL7 OBX-5 CWE.
SEVERITY_SYSTEM = "urn:ecgbridge:severity"

#: FHIR/HL7-facing display strings of the 3-tier result (tier code -> display).
SEVERITY_DISPLAY: dict[str, str] = {
    "normal": "Normal ECG (AI triage)",
    "abnormal_nonurgent": "Abnormal ECG, not urgent (AI triage)",
    "urgent": "Urgent: possible emergency, review now (AI triage)",
}

#: Display strings of the 4-tier result.
SEVERITY4_DISPLAY: dict[str, str] = {
    "normal": "Normal ECG (AI triage)",
    "minor_abnormality": "Minor abnormality, routine follow-up (AI triage)",
    "major_nonurgent": "Major abnormality, cardiology review, not urgent (AI triage)",
    "urgent": "Urgent: possible emergency, review now (AI triage)",
}

#: SNOMED CT concepts a 3-tier result may also be coded with (urgent: no ECG-specific concept,
#: it is "abnormal" plus the critical interpretation flag below).
SEVERITY_SNOMED: dict[str, tuple[str, str]] = {
    "normal": ("164854000", "Electrocardiogram normal"),
    "abnormal_nonurgent": ("102594003", "Electrocardiogram abnormal"),
    "urgent": ("102594003", "Electrocardiogram abnormal"),
}

#: Interpretation flag (HL7 v2 table 0078 in OBX-8 = FHIR v3-ObservationInterpretation code).
SEVERITY_INTERPRETATION: dict[str, tuple[str, str]] = {
    "normal": ("N", "Normal"),
    "abnormal_nonurgent": ("A", "Abnormal"),
    "urgent": ("AA", "Critical abnormal"),
}

#: Every SCP-ECG statement of PTB-XL's ``scp_statements.csv`` (44 diagnostic, 19 form -- 4 of
#: them also diagnostic -- and 12 rhythm: 71) -> (4-tier level, rule from the list above).
SCP_SEVERITY: dict[str, tuple[int, str]] = {
    # normal
    "NORM": (_N, "N"),
    "SR": (_N, "N"),
    "SARRH": (_N, "N"),
    # urgent
    "INJAS": (_URGENT, "U-ACS"),  # subendocardial injury, anteroseptal
    "INJAL": (_URGENT, "U-ACS"),
    "INJIN": (_URGENT, "U-ACS"),
    "INJLA": (_URGENT, "U-ACS"),
    "INJIL": (_URGENT, "U-ACS"),
    "STE_": (_URGENT, "U-ACS"),  # non-specific ST elevation
    "3AVB": (_URGENT, "U-AVB"),
    "2AVB": (_URGENT, "U-AVB"),  # type not given: Mobitz II cannot be excluded
    "SVTAC": (_URGENT, "U-TACHY"),
    "PSVT": (_URGENT, "U-TACHY"),
    "LNGQT": (_URGENT, "U-QT"),
    # major, not urgent
    "IMI": (_MAJOR, "M-MI"),
    "ASMI": (_MAJOR, "M-MI"),
    "ILMI": (_MAJOR, "M-MI"),
    "AMI": (_MAJOR, "M-MI"),  # anterior (a location, not "acute")
    "ALMI": (_MAJOR, "M-MI"),
    "LMI": (_MAJOR, "M-MI"),
    "IPLMI": (_MAJOR, "M-MI"),
    "IPMI": (_MAJOR, "M-MI"),
    "PMI": (_MAJOR, "M-MI"),
    "CLBBB": (_MAJOR, "M-BBB"),
    "CRBBB": (_MAJOR, "M-BBB"),
    "WPW": (_MAJOR, "M-BBB"),
    "LVH": (_MAJOR, "M-HYP"),
    "RVH": (_MAJOR, "M-HYP"),
    "SEHYP": (_MAJOR, "M-HYP"),
    "ISC_": (_MAJOR, "M-ISCH"),
    "ISCAL": (_MAJOR, "M-ISCH"),
    "ISCIN": (_MAJOR, "M-ISCH"),
    "ISCIL": (_MAJOR, "M-ISCH"),
    "ISCAS": (_MAJOR, "M-ISCH"),
    "ISCLA": (_MAJOR, "M-ISCH"),
    "ISCAN": (_MAJOR, "M-ISCH"),
    "ANEUR": (_MAJOR, "M-ISCH"),
    "AFIB": (_MAJOR, "M-RHYTHM"),
    "AFLT": (_MAJOR, "M-RHYTHM"),
    "PACE": (_MAJOR, "M-RHYTHM"),  # a device patient: reviewed by cardiology, not normal
    "EL": (_MAJOR, "M-EL"),
    # minor
    "SBRAD": (_MINOR, "m-RATE"),
    "STACH": (_MINOR, "m-RATE"),
    "1AVB": (_MINOR, "m-COND"),
    "LPR": (_MINOR, "m-COND"),
    "IRBBB": (_MINOR, "m-COND"),
    "ILBBB": (_MINOR, "m-COND"),
    "LAFB": (_MINOR, "m-COND"),
    "LPFB": (_MINOR, "m-COND"),
    "IVCD": (_MINOR, "m-COND"),
    "PAC": (_MINOR, "m-ECT"),
    "PVC": (_MINOR, "m-ECT"),
    "PRC(S)": (_MINOR, "m-ECT"),
    "BIGU": (_MINOR, "m-ECT"),
    "TRIGU": (_MINOR, "m-ECT"),
    "SVARR": (_MINOR, "m-ECT"),  # supraventricular arrhythmia, not a tachycardia
    "NDT": (_MINOR, "m-STT"),
    "NST_": (_MINOR, "m-STT"),
    "NT_": (_MINOR, "m-STT"),
    "STD_": (_MINOR, "m-STT"),
    "TAB_": (_MINOR, "m-STT"),
    "INVT": (_MINOR, "m-STT"),
    "LOWT": (_MINOR, "m-STT"),
    "DIG": (_MINOR, "m-STT"),
    "VCLVH": (_MINOR, "m-FORM"),
    "HVOLT": (_MINOR, "m-FORM"),
    "LVOLT": (_MINOR, "m-FORM"),
    "LAO/LAE": (_MINOR, "m-FORM"),
    "RAO/RAE": (_MINOR, "m-FORM"),
    "QWAVE": (_MINOR, "m-FORM"),
    "ABQRS": (_MINOR, "m-FORM"),
}

#: PTB-XL's 44 diagnostic SCP-ECG statements -> their superclass (``diagnostic_class`` of
#: ``scp_statements.csv``, as ``training.datasets.ptbxl`` labels records). Form and rhythm
#: statements (SR, AFIB, PVC, LOWT, ...) have no superclass: they name no diagnosis.
_SCP_BY_SUPERCLASS: dict[str, tuple[str, ...]] = {
    "NORM": ("NORM",),
    "MI": (
        "IMI",
        "ASMI",
        "ILMI",
        "AMI",
        "ALMI",
        "INJAS",
        "LMI",
        "INJAL",
        "IPLMI",
        "IPMI",
        "INJIN",
        "INJLA",
        "PMI",
        "INJIL",
    ),
    "STTC": (
        "NDT",
        "NST_",
        "DIG",
        "LNGQT",
        "ISC_",
        "ISCAL",
        "ISCIN",
        "ISCIL",
        "ISCAS",
        "ISCLA",
        "ANEUR",
        "EL",
        "ISCAN",
    ),
    "CD": ("LAFB", "IRBBB", "1AVB", "IVCD", "CRBBB", "CLBBB", "LPFB", "WPW", "ILBBB", "3AVB", "2AVB"),
    "HYP": ("LVH", "LAO/LAE", "RVH", "RAO/RAE", "SEHYP"),
}
SCP_SUPERCLASS: dict[str, str] = {code: cls for cls, codes in _SCP_BY_SUPERCLASS.items() for code in codes}

#: SNOMED CT codes of the PhysioNet/CinC 2020-2021 challenge (its Dx map, scored and unscored,
#: plus the codes of ``SNOMED_TO_SUPERCLASS``) -> (4-tier level, rule, description).
SNOMED_SEVERITY: dict[str, tuple[int, str, str]] = {
    # normal
    "164854000": (_N, "N", "electrocardiogram normal"),
    "426783006": (_N, "N", "sinus rhythm"),
    "427393009": (_N, "N", "sinus arrhythmia"),
    # urgent
    "164931005": (_URGENT, "U-ACS", "ST elevation"),
    "57054005": (_URGENT, "U-ACS", "acute myocardial infarction"),
    "413444003": (_URGENT, "U-ACS", "acute myocardial ischemia"),
    "27885002": (_URGENT, "U-AVB", "complete heart block"),
    "28189009": (_URGENT, "U-AVB", "Mobitz type II second degree AV block"),
    "195042002": (_URGENT, "U-AVB", "2nd degree AV block (type not given)"),
    "164903001": (_URGENT, "U-AVB", "partial AV block 2:1"),
    "164895002": (_URGENT, "U-TACHY", "ventricular tachycardia"),
    "164896001": (_URGENT, "U-TACHY", "ventricular fibrillation"),
    "111288001": (_URGENT, "U-TACHY", "ventricular flutter"),
    "426761007": (_URGENT, "U-TACHY", "supraventricular tachycardia"),
    "67198005": (_URGENT, "U-TACHY", "paroxysmal supraventricular tachycardia"),
    "426648003": (_URGENT, "U-TACHY", "junctional tachycardia"),
    "713422000": (_URGENT, "U-TACHY", "atrial tachycardia"),
    "713423005": (_URGENT, "U-TACHY", "multifocal atrial tachycardia"),
    "111975006": (_URGENT, "U-QT", "prolonged QT interval"),
    # major, not urgent
    "164865005": (_MAJOR, "M-MI", "myocardial infarction"),
    "164867002": (_MAJOR, "M-MI", "old myocardial infarction"),
    "54329005": (_MAJOR, "M-MI", "anterior myocardial infarction"),
    "164909002": (_MAJOR, "M-BBB", "left bundle branch block"),
    "733534002": (_MAJOR, "M-BBB", "complete left bundle branch block"),
    "713427006": (_MAJOR, "M-BBB", "complete right bundle branch block"),
    "59118001": (_MAJOR, "M-BBB", "right bundle branch block"),
    "6374002": (_MAJOR, "M-BBB", "bundle branch block"),
    "82226007": (_MAJOR, "M-BBB", "diffuse intraventricular block"),
    "74390002": (_MAJOR, "M-BBB", "Wolff-Parkinson-White pattern"),
    "195060002": (_MAJOR, "M-BBB", "ventricular pre-excitation"),
    "164873001": (_MAJOR, "M-HYP", "left ventricular hypertrophy"),
    "370365005": (_MAJOR, "M-HYP", "left ventricular strain"),
    "89792004": (_MAJOR, "M-HYP", "right ventricular hypertrophy"),
    "266249003": (_MAJOR, "M-HYP", "ventricular hypertrophy"),
    "164861001": (_MAJOR, "M-ISCH", "myocardial ischemia"),
    "413844008": (_MAJOR, "M-ISCH", "chronic myocardial ischemia"),
    "426434006": (_MAJOR, "M-ISCH", "anterior ischemia"),
    "425419005": (_MAJOR, "M-ISCH", "inferior ischaemia"),
    "425623009": (_MAJOR, "M-ISCH", "lateral ischaemia"),
    "704997005": (_MAJOR, "M-ISCH", "inferior ST segment depression"),
    "164889003": (_MAJOR, "M-RHYTHM", "atrial fibrillation"),
    "426749004": (_MAJOR, "M-RHYTHM", "chronic atrial fibrillation"),
    "164890007": (_MAJOR, "M-RHYTHM", "atrial flutter"),
    "195080001": (_MAJOR, "M-RHYTHM", "atrial fibrillation and flutter"),
    "74615001": (_MAJOR, "M-RHYTHM", "brady-tachy syndrome"),
    "233917008": (_MAJOR, "M-RHYTHM", "AV block (degree not given)"),
    "54016002": (_MAJOR, "M-RHYTHM", "Mobitz type I (Wenckebach) AV block"),
    "10370003": (_MAJOR, "M-RHYTHM", "pacing rhythm"),
    "251268003": (_MAJOR, "M-RHYTHM", "atrial pacing pattern"),
    "251266004": (_MAJOR, "M-RHYTHM", "ventricular pacing pattern"),
    "61277005": (_MAJOR, "M-RHYTHM", "accelerated idioventricular rhythm"),
    "426664006": (_MAJOR, "M-RHYTHM", "accelerated junctional rhythm"),
    "29320008": (_MAJOR, "M-RHYTHM", "ectopic rhythm"),
    "81898007": (_MAJOR, "M-RHYTHM", "ventricular escape rhythm"),
    "426995002": (_MAJOR, "M-RHYTHM", "junctional escape"),
    "50799005": (_MAJOR, "M-RHYTHM", "isorhythmic dissociation"),
    "418818005": (_MAJOR, "M-RHYTHM", "Brugada syndrome"),
    "423863005": (_MAJOR, "M-RHYTHM", "electrical alternans"),
    "78069008": (_MAJOR, "M-RHYTHM", "chronic rheumatic pericarditis"),
    # minor
    "426177001": (_MINOR, "m-RATE", "sinus bradycardia"),
    "427084000": (_MINOR, "m-RATE", "sinus tachycardia"),
    "426627000": (_MINOR, "m-RATE", "bradycardia"),
    "270492004": (_MINOR, "m-COND", "1st degree AV block"),
    "164947007": (_MINOR, "m-COND", "prolonged PR interval"),
    "713426002": (_MINOR, "m-COND", "incomplete right bundle branch block"),
    "251120003": (_MINOR, "m-COND", "incomplete left bundle branch block"),
    "445118002": (_MINOR, "m-COND", "left anterior fascicular block"),
    "445211001": (_MINOR, "m-COND", "left posterior fascicular block"),
    "698252002": (_MINOR, "m-COND", "nonspecific intraventricular conduction disorder"),
    "65778007": (_MINOR, "m-COND", "non-specific interatrial conduction block"),
    "284470004": (_MINOR, "m-ECT", "premature atrial contraction"),
    "63593006": (_MINOR, "m-ECT", "supraventricular premature beats"),
    "427172004": (_MINOR, "m-ECT", "premature ventricular contractions"),
    "164884008": (_MINOR, "m-ECT", "ventricular ectopics"),
    "17338001": (_MINOR, "m-ECT", "ventricular premature beats"),
    "251170000": (_MINOR, "m-ECT", "blocked premature atrial contraction"),
    "251164006": (_MINOR, "m-ECT", "junctional premature complex"),
    "251173003": (_MINOR, "m-ECT", "atrial bigeminy"),
    "11157007": (_MINOR, "m-ECT", "ventricular bigeminy"),
    "251180001": (_MINOR, "m-ECT", "ventricular trigeminy"),
    "251187003": (_MINOR, "m-ECT", "atrial escape beat"),
    "75532003": (_MINOR, "m-ECT", "ventricular escape beat"),
    "195101003": (_MINOR, "m-ECT", "wandering atrial pacemaker"),
    "428750005": (_MINOR, "m-STT", "nonspecific ST-T abnormality"),
    "164934002": (_MINOR, "m-STT", "T wave abnormal"),
    "59931005": (_MINOR, "m-STT", "T wave inversion"),
    "55930002": (_MINOR, "m-STT", "ST changes"),
    "429622005": (_MINOR, "m-STT", "ST depression"),
    "164930006": (_MINOR, "m-STT", "ST interval abnormal"),
    "428417006": (_MINOR, "m-STT", "early repolarization"),
    "251259000": (_MINOR, "m-STT", "high T voltage"),
    "164937009": (_MINOR, "m-FORM", "U wave abnormal"),
    "251242005": (_MINOR, "m-FORM", "tall U wave"),
    "55827005": (_MINOR, "m-FORM", "left ventricular high voltage"),
    "251146004": (_MINOR, "m-FORM", "low QRS voltages"),
    "251147008": (_MINOR, "m-FORM", "low QRS voltages in the limb leads"),
    "251148003": (_MINOR, "m-FORM", "low QRS voltages in the precordial leads"),
    "67741000119109": (_MINOR, "m-FORM", "left atrial enlargement"),
    "253352002": (_MINOR, "m-FORM", "left atrial abnormality"),
    "446813000": (_MINOR, "m-FORM", "left atrial hypertrophy"),
    "253339007": (_MINOR, "m-FORM", "right atrial abnormality"),
    "446358003": (_MINOR, "m-FORM", "right atrial hypertrophy"),
    "195126007": (_MINOR, "m-FORM", "atrial hypertrophy"),
    "39732003": (_MINOR, "m-FORM", "left axis deviation"),
    "47665007": (_MINOR, "m-FORM", "right axis deviation"),
    "251200008": (_MINOR, "m-FORM", "indeterminate cardiac axis"),
    "164917005": (_MINOR, "m-FORM", "Q wave abnormal"),
    "164921003": (_MINOR, "m-FORM", "R wave abnormal"),
    "365413008": (_MINOR, "m-FORM", "poor R wave progression"),
    "164951009": (_MINOR, "m-FORM", "abnormal QRS"),
    "49578007": (_MINOR, "m-FORM", "shortened PR interval"),
    "77867006": (_MINOR, "m-FORM", "decreased QT interval"),
}
# Deliberately absent (not findings about the heart): 251143007 ECG artefacts, 251139008
# suspected arm lead reversal, 266257000 transient ischaemic attack. A record carrying a code
# that is not in the table gets no tier (``severity4_of_snomed`` returns None): its worst
# finding is unknown, so it is left out of evaluation and counted, never guessed.


def severity4_of_scp(
    scp_codes: dict[str, float] | list[str] | tuple[str, ...],
    *,
    min_likelihood: float = MIN_LIKELIHOOD,
) -> int | None:
    """4-tier level (0-3) of one PTB-XL record: the worst of its statements.

    ``scp_codes`` is PTB-XL's ``{statement: likelihood}`` (or a plain list, all counted).
    Diagnostic statements with a stated likelihood (> 0) below ``min_likelihood`` are
    ignored. None when no statement is left, or when one is not in ``SCP_SEVERITY``
    (an unknown statement could be the worst one).
    """
    items = scp_codes.items() if isinstance(scp_codes, dict) else ((c, 0.0) for c in scp_codes)
    levels: list[int] = []
    for code, likelihood in items:
        if code not in SCP_SEVERITY:
            return None
        if likelihood and float(likelihood) < min_likelihood:
            continue
        levels.append(SCP_SEVERITY[code][0])
    return max(levels) if levels else None


def severity4_of_snomed(codes: list[str] | tuple[str, ...]) -> int | None:
    """4-tier level of one record's SNOMED CT codes (worst code); None if empty or any code is unmapped."""
    codes = [str(c).strip() for c in codes if str(c).strip()]
    if not codes or any(c not in SNOMED_SEVERITY for c in codes):
        return None
    return max(SNOMED_SEVERITY[c][0] for c in codes)


def to_severity3(level4: int) -> int:
    """3-tier level of a 4-tier level (minor and major merge into abnormal, not urgent)."""
    return SEVERITY4_TO_3[int(level4)]
