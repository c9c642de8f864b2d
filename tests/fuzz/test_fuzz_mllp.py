"""Fuzz: the MLLP framer fed random bytes and valid frames in random chunks."""

from __future__ import annotations

from hypothesis import example, given

from tests.fuzz.harness import ci_settings
from tests.fuzz.targets import by_name

RANDOM, FRAMES = by_name("mllp.random"), by_name("mllp.frames")


@ci_settings(RANDOM.ci_examples)
@given(RANDOM.strategy)
@example((b"\x0b\x1c\x1c\r\x0b\x0b\x1c", [1, 2, 3, 4, 5, 6], 1))
@example((b"\x0b" + b"x" * 100 + b"\x1c\r", [50], 10))
def test_framer_never_raises_and_ignores_chunking(value: tuple[bytes, list[int], int]) -> None:
    RANDOM.run(value)


@ci_settings(FRAMES.ci_examples)
@given(FRAMES.strategy)
@example(([b"", b"MSH|x"], b"\x0b\x1c\r\x0bMSH|x\x1c", [1, 2], 3))
def test_valid_frames_round_trip_in_any_chunks(value: tuple[list[bytes], bytes, list[int], int]) -> None:
    FRAMES.run(value)
