"""inbound listeners: DICOM SCP, MLLP server and HL7 handler, inbox folder. Core and mapping only; never a model runtime."""
