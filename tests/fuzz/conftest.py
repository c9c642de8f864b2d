"""Fuzz runs: hypothesis storage under build/, an overall time budget per test, a summary of cases run."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from tests.fuzz.harness import COUNTS, set_budget

# The unicode tables hypothesis caches go to build/ (ignored by git), not to .hypothesis/ in the tree.
set_hypothesis_home_dir(Path(__file__).resolve().parents[2] / "build" / "hypothesis")

#: Overall limit for one fuzz test (seconds): every call after it fails as a hang.
TEST_BUDGET_S = 90.0

_SECONDS: dict[str, float] = defaultdict(float)


@pytest.fixture(autouse=True)
def _fuzz_budget(request: pytest.FixtureRequest) -> Iterator[None]:
    set_budget(TEST_BUDGET_S)
    started = time.monotonic()
    try:
        yield
    finally:
        set_budget(None)
        _SECONDS[request.node.module.__name__.rsplit(".", 1)[-1]] += time.monotonic() - started


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    by_target: dict[str, int] = defaultdict(int)
    for name, count in COUNTS.items():
        by_target[name.split(".", 1)[0]] += count
    cases = ", ".join(f"{target} {count}" for target, count in sorted(by_target.items()))
    seconds = ", ".join(f"{module} {s:.1f} s" for module, s in sorted(_SECONDS.items()))
    terminalreporter.write_line(f"fuzz cases run: {cases} (by case: {dict(sorted(COUNTS.items()))})")
    terminalreporter.write_line(f"fuzz time: {seconds}")
