"""Fuzz: the HL7 v2 wire helpers, parser and waveform reader, and the whole inbound handler."""

from __future__ import annotations

import pytest
from hypothesis import example, given

from tests.fuzz.harness import ci_settings
from tests.fuzz.targets import by_name

WIRE, PARSE, INBOUND = by_name("hl7.wire"), by_name("hl7.parse"), by_name("hl7.inbound")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow on hostile scales


@ci_settings(WIRE.ci_examples)
@given(WIRE.strategy)
@example(b"")
@example(b"MSH")
@example(b"MSH|")
@example(b"MSH|^~\\&")
@example(b"MSH\x00^~\\&|")
@example(b"\x0b\x1c\r")
def test_msh_helpers_answer_every_message(raw: bytes) -> None:
    WIRE.run(raw)


@ci_settings(PARSE.ci_examples)
@given(PARSE.strategy)
def test_parser_and_waveform_reader_answer_every_message(raw: bytes) -> None:
    PARSE.run(raw)


@ci_settings(INBOUND.ci_examples)
@given(INBOUND.strategy)
@example(b"")
@example(b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|C1|P|2.5.1|||NE|NE")
def test_inbound_handler_always_acknowledges(raw: bytes) -> None:
    INBOUND.run(raw)
