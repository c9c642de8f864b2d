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
    "VERIFICATION_SOP_CLASS",
    "SCPECG_LEAD_CODES",
    "MDC_LEAD_CODES",
    "LEAD_BY_MEANING",
    "LOINC",
    "SUPERCLASS_SNOMED",
    "SUPERCLASS_DISPLAY",
    "SYSTEM",
]

SOP_12_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
SOP_GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"
SOP_AMBULATORY_ECG = "1.2.840.10008.5.1.4.1.1.9.1.3"
ECG_STORAGE_SOP_CLASSES: tuple[str, ...] = (SOP_12_LEAD_ECG, SOP_GENERAL_ECG, SOP_AMBULATORY_ECG)
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

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
    "2:1": "I", "131329": "I",
    "2:2": "II", "131330": "II",
    "2:61": "III", "131389": "III",
    "2:62": "aVR", "131390": "aVR",
    "2:63": "aVL", "131391": "aVL",
    "2:64": "aVF", "131392": "aVF",
    "2:3": "V1", "131331": "V1",
    "2:4": "V2", "131332": "V2",
    "2:5": "V3", "131333": "V3",
    "2:6": "V4", "131334": "V4",
    "2:7": "V5", "131335": "V5",
    "2:8": "V6", "131336": "V6",
}

#: Code meanings some carts send without a known code value (matched case-insensitively).
LEAD_BY_MEANING: dict[str, str] = {
    "lead i": "I", "lead i (einthoven)": "I",
    "lead ii": "II", "lead ii (einthoven)": "II",
    "lead iii": "III", "lead iii (einthoven)": "III",
    "lead avr": "aVR", "lead avr (goldberger)": "aVR",
    "lead avl": "aVL", "lead avl (goldberger)": "aVL",
    "lead avf": "aVF", "lead avf (goldberger)": "aVF",
    "lead v1": "V1", "lead v2": "V2", "lead v3": "V3",
    "lead v4": "V4", "lead v5": "V5", "lead v6": "V6",
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
    "security": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "dicom_uid": "urn:dicom:uid",
    "ecgbridge_result": "urn:ecgbridge:result",
    "ecgbridge_model": "urn:ecgbridge:model",
}
