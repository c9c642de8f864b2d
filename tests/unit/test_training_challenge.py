"""training.datasets.challenge: headers, SNOMED CT -> superclass mapping, sources, PTB-XL overlap."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.training.datasets.challenge import (
    NORM_COMPATIBLE,
    SNOMED_TO_SUPERCLASS,
    is_challenge_dir,
    load_challenge,
    ptbxl_overlap,
    read_header,
    source_of,
    superclasses_from_snomed,
)
from ecgbridge.training.datasets.ptbxl import SUPERCLASSES
from tests.support.peers import need


def _shared() -> Path:
    base = os.environ.get("ECGBRIDGE_SHARED_DATA")
    return (Path(base) if base else Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def test_mapping_table_is_well_formed() -> None:
    assert {v[0] for v in SNOMED_TO_SUPERCLASS.values()} <= set(SUPERCLASSES) - {"NORM"}
    assert not set(SNOMED_TO_SUPERCLASS) & set(NORM_COMPATIBLE)
    assert all(code.isdigit() for code in [*SNOMED_TO_SUPERCLASS, *NORM_COMPATIBLE])


@pytest.mark.parametrize(
    "codes,expected",
    [
        (["426783006"], {"NORM"}),  # sinus rhythm only
        (["426783006", "284470004"], {"NORM"}),  # + PAC: NORM-compatible
        (["164889003"], set()),  # atrial fibrillation only: no superclass
        (["426783006", "39732003"], set()),  # + left axis deviation: not normal, no superclass
        (["59118001", "426177001"], {"CD"}),
        (["164934002", "427084000", "698252002"], {"STTC", "CD"}),
        (["67741000119109", "426177001"], {"HYP"}),
        (["164865005"], {"MI"}),
        (["284470004"], set()),  # ectopy without a sinus-rhythm code is not NORM
    ],
)
def test_superclasses_from_snomed(codes: list[str], expected: set[str]) -> None:
    assert superclasses_from_snomed(codes) == expected


def test_source_by_record_prefix() -> None:
    assert source_of("E07500") == "Georgia"
    assert source_of("HR06005") == "PTB-XL"
    assert source_of("JS20001") == "Chapman-Shaoxing/Ningbo"
    assert source_of("A0001") == "CPSC" and source_of("Q0001") == "CPSC-Extra" and source_of("S0001") == "PTB"
    assert source_of("XYZ") == "unknown"


def test_read_header(tmp_path: Path) -> None:
    hea = tmp_path / "E00001.hea"
    hea.write_text("E00001 12 500 5000\n# Age: NaN\n# Sex: Female\n# Dx: 426783006, 164934002\n# Rx: Unknown\n")
    h = read_header(hea)
    assert h.name == "E00001" and h.dx == ("426783006", "164934002") and h.age is None and h.sex == "female"
    assert is_challenge_dir(tmp_path)


def test_shared_challenge_records_load_by_source_with_the_ptbxl_overlap() -> None:
    root = _shared() / "challenge" / "cinc2021"
    if not root.is_dir():
        need(f"shared challenge data not found at {root}")
    data = load_challenge(root)
    assert data.x.shape[1:] == (12, 1000) and np.isfinite(data.x).all()
    counts = {s: data.sources.count(s) for s in set(data.sources)}
    assert counts == {"Georgia": 20, "PTB-XL": 10, "Chapman-Shaoxing/Ningbo": 20}
    assert data.y.sum(axis=1).min() >= 1
    subset = _shared() / "ptbxl-subset"
    if (subset / "ptbxl_database.csv").is_file():
        overlap = ptbxl_overlap(data.names, subset)
        assert set(overlap) == {n for n in data.names if n.startswith("HR")}
        assert overlap["HR06005"] == 3  # a training record of the subset: never count it as external
