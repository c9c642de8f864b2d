"""Fuzz: the DICOM reader (read_bytes + to_ecg) on mutated ECG files and on generated data sets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given

from tests.fuzz.harness import ci_settings
from tests.fuzz.targets import by_name

MUTATED, FIXTURE, GENERATED = by_name("dicom.mutated"), by_name("dicom.fixture"), by_name("dicom.generated")

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about every invalid value it meets


@ci_settings(MUTATED.ci_examples)
@given(MUTATED.strategy)
@example(b"")
@example(b"\x00" * 128 + b"DICM")
@example(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
def test_mutated_small_files_are_read_or_refused(data: bytes) -> None:
    MUTATED.run(data)


@ci_settings(FIXTURE.ci_examples)
@given(FIXTURE.strategy)
def test_mutated_fixture_is_read_or_refused(data: bytes) -> None:
    FIXTURE.run(data)


@ci_settings(GENERATED.ci_examples)
@given(GENERATED.strategy)
def test_generated_data_sets_are_read_or_refused(desc: dict[str, Any]) -> None:
    GENERATED.run(desc)
