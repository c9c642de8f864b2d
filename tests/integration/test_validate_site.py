"""A simulated site: PTB-XL ECGs in by DICOM, their cardiologists' reads back by HL7, then ``ecgbridge validate``.

Real parts: ``ecgbridge gateway`` and ``ecgbridge worker`` processes, a redis-server, pynetdicom
as the cart, python-hl7's ``mllp_send`` as the ECG management system sending confirmed reads.
``ecgbridge validate`` must give the AUROC that ``ecgbridge evaluate diagnosis`` computes on the
same records: the probabilities the worker stored for the DICOM copies must be those the
evaluation's serving path gives for the WFDB records (to 1e-6), and so the AUROCs.

The small version uses the three PTB-XL records under ``tests/fixtures/wfdb``; the large one
the fold-10 records of ``../shared/data/ptbxl-subset`` (skipped without them) against
``training.evaluate.evaluate_diagnosis`` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.mapping.codes import SOP_AMBULATORY_ECG
from ecgbridge.mapping.ecg import Ecg, Study
from tests.conftest import FIXTURES
from tests.support.dicom_writer import ecg_to_dataset
from tests.support.overreads import overread_oru
from tests.support.peers import need
from tests.support.processes import REPO, RedisServer, wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

MLLP_SEND = Path(sys.executable).with_name("mllp_send")
PTBXL = REPO.parent / "shared" / "data" / "ptbxl-subset"
#: The fixture records and a management system's wording of their PTB-XL statements.
RECORDS = {
    "00024_lr": ["SINUS RHYTHM", "NORMAL ECG"],
    "00622_lr": [
        "SINUS TACHYCARDIA",
        "ANTEROSEPTAL INFARCT, AGE UNDETERMINED",
        "NONSPECIFIC ST AND T WAVE ABNORMALITY",
    ],
    "00730_lr": ["SINUS RHYTHM", "LEFT BUNDLE BRANCH BLOCK", "FIRST DEGREE AV BLOCK"],
}


def _send_reads(tmp: Path, port: int, messages: list[str]) -> list[str]:
    if not MLLP_SEND.exists():
        need("python-hl7's mllp_send is not installed (pip install hl7)")
    path = tmp / f"reads-{uuid.uuid4().hex[:8]}.hl7"
    path.write_bytes(b"".join(b"\x0b" + m.encode("utf-8") + b"\x1c\r" for m in messages))
    out = subprocess.run(
        [str(MLLP_SEND), "--file", str(path), "-p", str(port), "127.0.0.1"], capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return [a for a in out.stdout.decode().split("\x1c\r") if "MSA|" in a]


def _serving_probabilities(ecg: Ecg) -> np.ndarray:
    """What ``ecgbridge evaluate diagnosis`` computes for a record: the shipped model through ``prepare_input``."""
    from ecgbridge.inference.models import ModelRegistry, prepare_input

    model = ModelRegistry().signal_model("diagnosis")
    return np.asarray(model.predict(prepare_input(ecg, model.manifest)[None])["probabilities"][0], dtype=np.float64)


def _site(
    make_stack, ecgs: dict[str, Ecg], statements: dict[str, list[str]], tmp: Path, extra: dict | None = None
) -> tuple[object, dict[str, str]]:
    """Every ECG in by C-STORE, analysed; then each one's read back by MLLP; SOP UID per record."""
    stack = make_stack(extra={"overreads": {"hl7_sending_applications": ["MUSE"]}, **(extra or {})})
    stack.start_worker()
    stack.start_gateway()
    uids, datasets = {}, []
    start = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    for i, (name, ecg) in enumerate(ecgs.items()):
        uids[name] = f"2.25.{uuid.uuid4().int}"
        study = Study(sop_instance_uid=uids[name], acquired_at=start + timedelta(minutes=i))
        # PTB-XL's 100 Hz records: the Ambulatory ECG IOD is the one that allows 100 Hz
        datasets.append(ecg_to_dataset(ecg, study=study, sop_class_uid=SOP_AMBULATORY_ECG))
    for i in range(0, len(datasets), 50):
        assert set(send_dicom(stack.port, datasets[i : i + 50])) == {0x0000}
    stack.wait_state("analysed", count=len(ecgs), timeout_s=60 + 2 * len(ecgs))
    reads = [
        overread_oru(f"R{i:05d}", statements[name], sop_instance_uid=uids[name], read_at=start + timedelta(days=1))
        for i, name in enumerate(ecgs)
    ]
    acks = _send_reads(tmp, stack.mllp_port, reads)
    assert len(acks) == len(reads) and all("MSA|AA|" in a for a in acks), acks[:3]
    return stack, uids


def _validate(stack) -> dict:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "validate", "--json", "--config", str(stack.config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_validate_on_a_small_site_reproduces_the_serving_path_of_evaluate(
    make_stack, redis_server: RedisServer, tmp_path: Path
) -> None:
    from ecgbridge.inference.metrics import auroc
    from ecgbridge.mapping.wfdb_record import read_wfdb

    ecgs = {name: read_wfdb(FIXTURES / "wfdb" / name) for name in RECORDS}
    from tests.unit.test_shadow_models import _candidate

    shadow = {  # a candidate beside the live model: the shipped network under another version
        "models": [{"name": "diagnosis"}, {"name": "diagnosis-candidate", "path": str(_candidate(tmp_path))}],
        "routes": [{"name": "all-ecg", "models": ["diagnosis"], "shadow_models": ["diagnosis-candidate"]}],
    }
    stack, uids = _site(make_stack, ecgs, RECORDS, tmp_path, shadow)
    store = stack.store()
    from ecgbridge.core.labels import labelled_ecgs

    wait_for(lambda: len(labelled_ecgs(store)) == len(RECORDS) or None, 60, 0.3, "every read linked as a label")

    report = _validate(stack)
    (live,) = [m for m in report["models"] if m["role"] == "live" and m["model"] == "diagnosis"]
    assert report["coverage"] == {"analysed": 3, "labelled": 3, "without_overread": 0, "used": 3}
    codes = ["NORM", "MI", "STTC", "CD", "HYP"]
    truth = {"00024_lr": [1, 0, 0, 0, 0], "00622_lr": [0, 1, 1, 0, 0], "00730_lr": [0, 0, 0, 1, 0]}
    expected = {name: _serving_probabilities(ecg) for name, ecg in ecgs.items()}
    for name, uid in uids.items():  # the stored result of the DICOM copy = the evaluation's probabilities
        (row,) = [r for r in store.list(limit=0) if r.sop_instance_uid == uid]
        (out,) = [o for o in store.get_result(row.id).result["outputs"] if o["model"] == "diagnosis"]
        stored = {f["code"]: f["probability"] for f in out["findings"]}
        np.testing.assert_allclose([stored[c] for c in codes], expected[name], atol=1e-6)
    for k, code in enumerate(codes):
        y = np.array([truth[n][k] for n in RECORDS])
        p = np.array([expected[n][k] for n in RECORDS])
        want = auroc(y, p)
        got = live["classes"][code]["auroc"]
        if np.isnan(want):
            assert got is None, code  # one class only among the three: no AUROC
        else:
            assert got == pytest.approx(want, abs=1e-6), code
        assert live["classes"][code]["positives"] == int(y.sum())
    assert live["classes"]["NORM"]["card"]["auroc"] == pytest.approx(0.954)  # beside the card's fold-10 figure
    (shadow,) = [m for m in report["models"] if m["role"] == "shadow"]
    assert shadow["version"] == "0.1.1-candidate" and shadow["classes"]["MI"]["n"] == 3
    (comparison,) = report["comparisons"]
    assert (comparison["live"], comparison["shadow"]) == ("diagnosis@0.1.1", "diagnosis@0.1.1-candidate")
    assert comparison["classes"]["NORM"]["shadow_minus_live"] == 0.0  # the same network: no difference
    assert "HYP" not in comparison["classes"]  # no positive among the three: nothing to compare

    shown = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "validate", "--config", str(stack.config)], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "live model diagnosis 0.1.1" in text and "ECGs analysed: 3; with an over-read: 3" in text
    assert "shadow model diagnosis 0.1.1-candidate" in text and "shadow diagnosis@0.1.1-candidate vs live" in text


@pytest.mark.skipif(not (PTBXL / "ptbxl_database.csv").exists(), reason="needs ../shared/data/ptbxl-subset")
def test_validate_on_ptbxl_fold_10_equals_evaluate_diagnosis(
    make_stack, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The acceptance: PTB-XL fold 10 in by DICOM, its statements back by HL7, per-class AUROCs as evaluate's."""
    import ast
    import csv

    from ecgbridge.core.labels import labelled_ecgs
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from ecgbridge.training.evaluate import evaluate_diagnosis

    rows = [r for r in csv.DictReader((PTBXL / "ptbxl_database.csv").open()) if r["strat_fold"] == "10"]
    ecgs, statements = {}, {}
    for r in rows:
        ecgs[r["ecg_id"]] = read_wfdb(PTBXL / r["filename_lr"])
        # coded SCP-ECG statements, as a management system sends its confirmed statement codes
        statements[r["ecg_id"]] = [(code, code, "SCPECG") for code in ast.literal_eval(r["scp_codes"])]
    stack, _ = _site(make_stack, ecgs, statements, tmp_path)
    store = stack.store()
    wait_for(lambda: len(labelled_ecgs(store)) >= len(rows) or None, 120, 0.5, "every read linked as a label")
    report = _validate(stack)
    (live,) = [m for m in report["models"] if m["role"] == "live" and m["model"] == "diagnosis"]
    shipped = REPO / "inference" / "shipped" / "diagnosis-baseline"
    evaluated = evaluate_diagnosis(shipped, PTBXL, fold=10, n_bootstrap=10)
    for code, c in evaluated["classes"].items():
        assert live["classes"][code]["auroc"] == pytest.approx(c["auroc"], abs=1e-6), code
        assert live["classes"][code]["positives"] == c["positives"], code
