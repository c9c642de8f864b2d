"""outbound: connections ecgbridge opens to the EHR: result delivery behind one Sender interface, and the FHIR reads of EHR context."""
