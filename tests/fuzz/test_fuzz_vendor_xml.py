"""Fuzz: the vendor XML readers (HL7 aECG, Philips Sierra with XLI, GE MUSE); entity attacks refused."""

from __future__ import annotations

import builtins
import io
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given

from ecgbridge.errors import DecodeError
from ecgbridge.mapping.vendor import read_xml
from tests.fuzz.harness import ci_settings
from tests.fuzz.seeds import hostile_xml
from tests.fuzz.targets import by_name

VENDOR, XLI = by_name("xml.vendor"), by_name("xml.xli")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow on hostile scales
MARKER = Path(__file__).resolve()  # the file the external entities name: the reader must never open it
HOSTILE = hostile_xml(MARKER)


def _with_hostile(test: Any) -> Any:
    for document in HOSTILE.values():
        test = example(document)(test)
    return test


@ci_settings(VENDOR.ci_examples)
@given(VENDOR.strategy)
@_with_hostile
@example(b"")
@example(b"<")
@example(b"\xff\xfe<\x00")
@example(b'<?xml version="1.0" encoding="x-unknown"?><a/>')
def test_vendor_readers_answer_every_document(data: bytes) -> None:
    VENDOR.run(data)


@ci_settings(XLI.ci_examples)
@given(XLI.strategy)
@example((b"\xf8\xff\xff\xff\x00\x00\x00\x00" * 4, 100))
@example((b"\x00" * 8, 100))
def test_xli_decoder_answers_every_payload(value: tuple[bytes, int]) -> None:
    XLI.run(value)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_entity_attacks_are_refused_without_expansion_or_file_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def spy(real: Any) -> Any:
        def wrapper(target: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(str(getattr(target, "full_url", target)))
            return real(target, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(urllib.request, "urlopen", spy(urllib.request.urlopen))
    started = time.monotonic()
    with pytest.raises(DecodeError, match="entities or external references") as refused:
        read_xml(HOSTILE[name])
    assert time.monotonic() - started < 1.0, "refused only after expanding"
    assert not any(MARKER.name in path for path in opened), opened
    assert "lol" not in str(refused.value) and "MARKER" not in str(refused.value)
