"""Shared fixtures: where the real data lives, and the real ECG every test can use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def shared_data_dir() -> Path | None:
    env = os.environ.get("ECGBRIDGE_SHARED_DATA")
    candidate = Path(env) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("the large data set ../shared/data is absent (set ECGBRIDGE_SHARED_DATA to use another path)")
    return path


@pytest.fixture(scope="session")
def waveform_ecg_path() -> Path:
    """The real Mortara 12-lead ECG shipped with pydicom's test data."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("waveform_ecg.dcm"))
