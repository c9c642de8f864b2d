"""``ecgbridge train diagnosis --from-store``: the pipeline, not the metrics.

A real SQLite store with 41 over-read DICOM ECGs made from the committed PTB-XL fixtures
(tests/support/site_store.py: 20 synthetic patients with 2 ECGs each, interleaved in time, and one
ECG naming no patient), one epoch on a tiny set. Checked: the split is patient-level and
time-ordered, the card carries the site evaluation and the PTB-XL one (a three-record PTB-XL
layout built from the fixtures) or the note that it was not available, a candidate that does not
beat the live model is refused (exit 3, no model directory, card and metrics written), one that
beats it is proposed as a loadable model directory, and nothing written names a patient.
"""

from __future__ import annotations

import csv
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="retraining needs the train extra (torch)")
pytest.importorskip("onnx", reason="retraining needs the train extra (onnx)")

from ecgbridge.cli import main
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import ModelError
from ecgbridge.inference.models import SHIPPED_DIR, ModelRegistry
from ecgbridge.training.from_store import (
    REFUSED,
    decide,
    paired_macro_difference,
    rebuild_start,
    time_split,
)
from tests.support.site_store import SiteEcg, build_site_store, site_config

SHIPPED = SHIPPED_DIR / "diagnosis-baseline"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAST = ["--epochs", "1", "--n-bootstrap", "200", "--min-train", "10"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteEcg]]:
    folder = tmp_path_factory.mktemp("site")
    store = MessageStore(f"sqlite:///{folder / 'ecgbridge.db'}", folder)
    store.create_schema()
    made = build_site_store(store, n_patients=20, ecgs_per_patient=2, spacing_days=3)
    store.engine.dispose()
    return site_config(folder), made


def _split(out: Path) -> dict[str, tuple[datetime, str]]:
    with (out / "split.csv").open() as fh:
        return {r["ecg_message_id"]: (datetime.fromisoformat(r["time"]), r["set"]) for r in csv.DictReader(fh)}


def _no_identifiers(texts: list[str], made: list[SiteEcg]) -> None:
    for text in texts:
        for e in made:
            for value in (e.patient_id, e.patient_name, e.birth_date, e.sop_instance_uid):
                assert not value or value not in text


def _tiny_ptbxl(folder: Path) -> Path:
    """A PTB-XL layout holding the three fixture records, all put in fold 10 (for this test only)."""
    folder.mkdir()
    (folder / "records100" / "00000").mkdir(parents=True)
    rows = [(24, 9012, "{'NORM': 100.0, 'SR': 0.0}"), (622, 6097, "{'ISC_': 100.0, 'ASMI': 100.0}"),
            (730, 565, "{'CLBBB': 100.0, '1AVB': 100.0}")]  # fmt: skip
    lines = ["ecg_id,patient_id,scp_codes,strat_fold,filename_lr,filename_hr"]
    for ecg_id, patient, codes in rows:
        for ext in ("hea", "dat"):
            shutil.copy(FIXTURES / "wfdb" / f"{ecg_id:05d}_lr.{ext}", folder / "records100" / "00000")
        lines.append(f'{ecg_id},{patient}.0,"{codes}",10,records100/00000/{ecg_id:05d}_lr,')
    (folder / "ptbxl_database.csv").write_text("\n".join(lines) + "\n")
    (folder / "scp_statements.csv").write_text(
        ",description,diagnostic,diagnostic_class\nNORM,normal ECG,1.0,NORM\nASMI,anteroseptal MI,1.0,MI\n"
        "ISC_,non-specific ischemic,1.0,STTC\nCLBBB,complete LBBB,1.0,CD\n1AVB,first degree AV block,1.0,CD\n"
        "SR,sinus rhythm,,\n"
    )
    return folder


def _randomised(model_dir: Path, out: Path) -> Path:
    """The model with every float weight redrawn: a live model that the shipped one beats."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((model_dir / "manifest.json").read_text())
    graph = onnx.load(str(model_dir / manifest["file"]))
    rng = np.random.default_rng(3)
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size > 1:
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, float(w.std()), w.shape).astype(w.dtype), init.name))
    out.mkdir(parents=True)
    onnx.save(graph, str(out / manifest["file"]))
    manifest.update(name="diagnosis-randomised", sha256=None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ----- the rules, as functions ------------------------------------------------------------------------
def test_the_split_is_by_time_and_keeps_each_patient_in_one_set() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    when = [t0 + timedelta(days=d) for d in range(10)]
    groups = ["a", "b", "c", "d", "e", "a", "f", "g", "c", "h"]  # a: days 0 and 5, c: days 2 and 8
    split = time_split(when, groups, test_fraction=0.3, val_fraction=0.2)
    assert split.test_from == when[7] and split.val_from == when[5]
    assert split.assign == [
        "excluded: patient in the validation period",  # a's day 0: a is in validation (day 5)
        "train",
        "excluded: patient in the held-out period",  # c's day 2: c is held out (day 8)
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
        "test",
    ]
    explicit = time_split(when, groups, val_fraction=0.0, test_from=t0 + timedelta(days=9))
    assert explicit.assign.count("test") == 1 and explicit.val_from is None


def test_the_rule_refuses_a_tie_and_a_loss_and_can_ask_for_the_interval() -> None:
    def comparison(d: float, lo: float) -> dict[str, object]:
        return {"difference": d, "difference_ci": [lo, d + 0.05]}

    assert decide(comparison(0.01, -0.02), min_improvement=0.0, require_ci=False, sanity_passed=True) == (True, [])
    assert not decide(comparison(0.0, -0.02), min_improvement=0.0, require_ci=False, sanity_passed=True)[0]
    assert not decide(comparison(-0.01, -0.05), min_improvement=0.0, require_ci=False, sanity_passed=True)[0]
    assert not decide(comparison(0.01, -0.02), min_improvement=0.0, require_ci=True, sanity_passed=True)[0]
    assert decide(comparison(0.03, 0.01), min_improvement=0.0, require_ci=True, sanity_passed=True)[0]
    assert not decide(comparison(0.03, 0.01), min_improvement=0.0, require_ci=True, sanity_passed=False)[0]
    assert not decide(comparison(0.01, 0.0), min_improvement=0.02, require_ci=False, sanity_passed=True)[0]


def test_the_paired_difference_leaves_uncertain_labels_out_and_resamples_patients() -> None:
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0], [0, 1], [1, 0]], dtype=np.float64)
    good = y.copy()
    good[np.isnan(good)] = 0.5
    worse = np.array([[0.2, 0.1], [0.9, 0.9], [0.6, 0.2], [0.1, 0.8], [0.3, 0.1], [0.2, 0.3]])
    groups = np.array([0, 0, 1, 2, 3, 4])
    result = paired_macro_difference(y, good, worse, groups, classes=[0, 1], n_bootstrap=200, seed=0)
    assert result["candidate"] == 1.0 and result["difference"] > 0
    assert result["difference_ci"] is not None and 0 < result["valid"] <= 200


def test_only_a_single_cnn_can_be_the_starting_point(tmp_path: Path) -> None:
    other = tmp_path / "resnet"
    shutil.copytree(SHIPPED, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["architecture"]["arch"] = "resnet_se"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="only a single Cnn1d"):
        rebuild_start(other, np.zeros((2, 12, 1000), np.float32))


# ----- the command, end to end -------------------------------------------------------------------------
def test_a_candidate_no_better_than_the_live_model_is_refused_with_the_card_and_the_rule(
    site: tuple[Path, list[SiteEcg]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, made = site
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    monkeypatch.delenv("ECGBRIDGE_SHARED_DATA", raising=False)
    out = tmp_path / "run"
    # the live model (the shipped one, whose own training records these fixtures are) is perfect here: a tie at best
    code = main(["train", "diagnosis", "--from-store", "--config", str(config), "--out", str(out), *FAST])
    printed = capsys.readouterr()
    assert code == REFUSED
    assert "decision: REFUSED" in printed.out and "rule: propose the candidate only if D =" in printed.out
    assert not (out / "proposed").exists() and not (out / "candidate").exists()
    assert not list(out.rglob("*.onnx"))
    card = (out / "MODEL_CARD.md").read_text()
    assert "**Decision: REFUSED.**" in card and "a tie is not better" in card and "NOT FOR CLINICAL USE" in card
    assert "## Evaluation on the site's held-out period" in card and "| live: diagnosis 0.1.1 |" in card
    assert "Not evaluated: no --ptbxl DIR given" in card
    assert "rebuilt in torch from its ONNX file" in card and "953d229b" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decision"] == "refused" and metrics["ptbxl"]["available"] is False
    assert metrics["data"]["usable"] == len(made) and metrics["data"]["without_patient_id"] == 1

    # the split: patient-level, and every held-out ECG after every training and validation one
    split = _split(out)
    assert set(split) == {e.message_id for e in made}
    patient = {e.message_id: e.patient_id or e.message_id for e in made}
    sets: dict[str, set[str]] = {}
    for mid, (_, name) in split.items():
        if not name.startswith("excluded"):
            sets.setdefault(patient[mid], set()).add(name)
    assert all(len(s) == 1 for s in sets.values())
    times = {name: [t for t, n in split.values() if n == name] for name in ("train", "val", "test")}
    assert max(times["train"]) < min(times["val"]) <= max(times["val"]) < min(times["test"])
    excluded = [mid for mid, (_, n) in split.items() if n.startswith("excluded")]
    assert excluded and all(
        any(split[other][1] in ("val", "test") for other in split if patient[other] == patient[mid] and other != mid)
        for mid in excluded
    )
    _no_identifiers([printed.out, printed.err, card, (out / "metrics.json").read_text()], made)


def test_a_candidate_that_beats_the_live_model_is_proposed_with_both_evaluations(
    site: tuple[Path, list[SiteEcg]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, made = site
    live = _randomised(SHIPPED, tmp_path / "randomised")
    ptbxl = _tiny_ptbxl(tmp_path / "ptbxl")
    out = tmp_path / "run"
    argv = ["train", "diagnosis", "--from-store", "--config", str(config), "--out", str(out), *FAST]
    code = main([*argv, "--live", str(live), "--init", str(SHIPPED), "--ptbxl", str(ptbxl), "--version", "0.1.1-t"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-2000:]
    assert "decision: PROPOSED" in printed.out
    proposed = out / "proposed"
    assert {p.name for p in proposed.iterdir()} == {"model.onnx", "manifest.json", "MODEL_CARD.md"}
    model = ModelRegistry(paths={"diagnosis-site": proposed}).signal_model("diagnosis-site")
    assert model.manifest.version == "0.1.1-t" and "cams" in model.manifest.outputs
    assert "fine_tuned_from" in (model.manifest.architecture or {})
    card = (out / "MODEL_CARD.md").read_text()
    assert card == (proposed / "MODEL_CARD.md").read_text() and "**Decision: PROPOSED.**" in card
    assert "## PTB-XL fold 10" in card and "PTB-XL strat_fold 10: 3 records" in card
    assert "| live: diagnosis-randomised 0.1.1 |" in card
    metrics = json.loads((out / "metrics.json").read_text())
    comparison = metrics["site"]["comparison"]
    assert comparison["difference"] > 0 and metrics["sanity"]["passed"]
    _no_identifiers([printed.out, card, (out / "metrics.json").read_text()], made)


def test_real_records_of_another_hospital_and_ptbxl_fold_10(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demonstration of docs/site-learning.md, shortened: CinC 2021 Georgia + Chapman records as the site."""
    from tests.support.site_store import build_from_challenge

    store = MessageStore(f"sqlite:///{tmp_path / 'ecgbridge.db'}", tmp_path)
    store.create_schema()
    made = build_from_challenge(store, shared_data / "challenge" / "cinc2021")
    assert len(made) == 40
    out = tmp_path / "run"
    argv = ["train", "diagnosis", "--from-store", "--config", str(site_config(tmp_path)), "--out", str(out)]
    ptbxl = shared_data / "ptbxl-subset"
    code = main([*argv, "--epochs", "2", "--val-fraction", "0", "--n-bootstrap", "200", "--ptbxl", str(ptbxl)])
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    d = metrics["site"]["comparison"]["difference"]
    assert code == (0 if d > 0 and metrics["sanity"]["passed"] else REFUSED)
    assert metrics["data"]["sets"]["held-out"]["n_ecgs"] == 12 and metrics["ptbxl"]["available"]
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count("PTB-XL strat_fold 10: 102 records") == 2  # the live model and the candidate


def test_train_diagnosis_names_from_store_and_it_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    from ecgbridge.training.train import main as train_main

    for run in (lambda: train_main(["--help"]), lambda: main(["train", "diagnosis", "--from-store", "--help"])):
        with pytest.raises(SystemExit) as info:
            run()
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--from-store" in out and "--min-improvement" in out and "--test-fraction" in out
