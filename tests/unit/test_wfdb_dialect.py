"""The Georgia challenge header dialect (``E07938.mat 12 500 5000 05-May-2020 09:49:17``).

Why: such records failed ``ecgbridge analyse`` with wfdb's HeaderSyntaxError; the product
reader and the training reader share one rule (mapping.wfdb_record.standard_record_line).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.cli import main
from ecgbridge.mapping.ecg import STANDARD_LEADS
from ecgbridge.mapping.readers import read_ecg_file
from ecgbridge.mapping.wfdb_record import read_wfdb, standard_record_line
from ecgbridge.training.datasets import challenge
from tests.conftest import FIXTURES, shared_data_dir
from tests.support.peers import need

DIALECT = FIXTURES / "wfdb" / "georgia_dialect" / "E07506"  # tests/fixtures/make_georgia_dialect.py
ORIGINAL = FIXTURES / "wfdb" / "E07506"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("E07938.mat 12 500 5000 05-May-2020 09:49:17", "E07938 12 500 5000 09:49:17 05/05/2020"),
        ("E07938.MAT 12 500 5000", "E07938 12 500 5000"),
        ("E07938 12 500 5000 1-dec-2019 23:00:01", "E07938 12 500 5000 23:00:01 01/12/2019"),
        ("E07938 12 500 5000 05-May-2020", "E07938 12 500 5000"),  # WFDB allows no date without a time
        # already standard, or not the dialect: unchanged (wfdb reports what is wrong)
        ("E07506 12 500 5000", "E07506 12 500 5000"),
        ("00024_lr 12 100 1000", "00024_lr 12 100 1000"),
        ("E1 12 500 5000 09:49:17 05/05/2020", "E1 12 500 5000 09:49:17 05/05/2020"),
        ("E1 12 500 5000 05-Foo-2020 09:49:17", "E1 12 500 5000 05-Foo-2020 09:49:17"),
    ],
)
def test_standard_record_line(line: str, expected: str) -> None:
    assert standard_record_line(line) == expected


def test_a_dialect_record_reads_as_its_source() -> None:
    assert DIALECT.with_suffix(".hea").read_text().splitlines()[0] == "E07506.mat 12 500 500 01-Jan-2021 09:30:00"
    ecg = read_wfdb(DIALECT)
    assert ecg.leads == STANDARD_LEADS and ecg.fs == 500.0 and ecg.signals.shape == (12, 500)
    assert ecg.flags == ("record:E07506",) and ecg.patient.sex == "female"
    np.testing.assert_array_equal(ecg.signals, read_wfdb(ORIGINAL).signals[:, :500])
    assert read_ecg_file(DIALECT.with_suffix(".hea")).signals.shape == (12, 500)


def test_ecgbridge_analyse_reads_a_dialect_record(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyse", "--json", str(DIALECT.with_suffix(".hea"))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True, out
    assert out["fs"] == 500.0 and len(out["leads"]) == 12


def test_training_reads_a_dialect_record_by_the_same_rule() -> None:
    signal, fs, units = challenge.read_signal(DIALECT)
    assert signal.shape == (12, 500) and fs == 500.0 and units == "mV"
    data = challenge.load_challenge(DIALECT.parent)
    assert data.names == ("E07506",) and data.sources == ("Georgia",) and data.label_counts()["NORM"] == 1


def test_real_georgia_records_in_the_dialect_read_as_the_originals(tmp_path: Path) -> None:
    shared = shared_data_dir()
    root = shared / "challenge" / "cinc2021" if shared else None
    if root is None or not root.is_dir():
        need("the shared challenge records are absent")
    originals = sorted(root.glob("E*.hea"))[:3]
    assert originals
    for hea in originals:
        name = hea.stem
        lines = hea.read_text().splitlines()
        lines[0] = lines[0].replace(name, f"{name}.mat", 1) + " 05-May-2020 09:49:17"
        (tmp_path / hea.name).write_text("\n".join(lines) + "\n")
        shutil.copyfile(hea.with_suffix(".mat"), tmp_path / f"{name}.mat")
        np.testing.assert_array_equal(read_wfdb(tmp_path / name).signals, read_wfdb(hea.with_suffix("")).signals)
        assert np.array_equal(challenge.read_signal(tmp_path / name)[0], challenge.read_signal(hea.with_suffix(""))[0])
