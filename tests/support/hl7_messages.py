"""Small edits of ER7 test messages shared by the HL7 unit and MLLP integration tests."""

from __future__ import annotations


def with_charset(message: str, charset: str) -> str:
    """Set MSH-18 of an ER7 message (python-hl7 would re-serialise everything)."""
    first, rest = message.split("\r", 1)
    parts = first.split("|")
    parts += [""] * (18 - len(parts))
    parts[17] = charset
    return "|".join(parts).rstrip("|") + "\r" + rest
