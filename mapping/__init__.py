"""mapping: pure conversions between wire formats (DICOM, HL7 v2, vendor XML, WFDB, FHIR) and the canonical Ecg."""
