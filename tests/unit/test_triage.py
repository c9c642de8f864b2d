"""Severity triage: the SCP-ECG / SNOMED CT tier tables, the worst-statement and decoding rules,
the shipped triage model, export parity, and a tiny ``ecgbridge train triage`` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.inference.models import SHIPPED_DIR, ModelRegistry
from ecgbridge.inference.triage import TRIAGE_OUTPUTS_3, TRIAGE_OUTPUTS_4, decode_levels, severity_extra
from ecgbridge.mapping.codes import (
    SCP_SEVERITY,
    SEVERITY3,
    SEVERITY4,
    SEVERITY4_DISPLAY,
    SEVERITY4_TO_3,
    SEVERITY_DISPLAY,
    SEVERITY_INTERPRETATION,
    SEVERITY_SNOMED,
    SNOMED_SEVERITY,
    SNOMED_TO_SUPERCLASS,
    severity4_of_scp,
    severity4_of_snomed,
    to_severity3,
)
from ecgbridge.mapping.ecg import Finding
from tests.support.peers import need

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHIPPED = SHIPPED_DIR / "triage"
RULE_PREFIX = {0: "N", 1: "m-", 2: "M-", 3: "U-"}


def _shared() -> Path:
    base = os.environ.get("ECGBRIDGE_SHARED_DATA")
    return (Path(base) if base else Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        need(f"{what} not found at {path} (set ECGBRIDGE_SHARED_DATA); skipping data test")
    return path


# (1) the tables ---------------------------------------------------------------------------


def test_scp_table_is_well_formed_and_has_the_71_ptbxl_statements() -> None:
    assert len(SCP_SEVERITY) == 71
    for code, (level, rule) in SCP_SEVERITY.items():
        assert level in (0, 1, 2, 3), code
        assert rule.startswith(RULE_PREFIX[level]), (code, rule)  # the rule named agrees with the level


def test_scp_table_covers_every_statement_of_the_real_scp_statements_csv() -> None:
    import pandas as pd

    path = _require(_shared() / "ptbxl-subset" / "scp_statements.csv", "PTB-XL scp_statements.csv")
    statements = pd.read_csv(path, index_col=0)
    assert set(statements.index) == set(SCP_SEVERITY)
    kinds = {k: int(statements[k].fillna(0).sum()) for k in ("diagnostic", "form", "rhythm")}
    assert kinds == {"diagnostic": 44, "form": 19, "rhythm": 12}


def test_clinical_anchors_of_the_scp_table() -> None:
    urgent = {"INJAS", "INJAL", "INJIN", "INJLA", "INJIL", "STE_", "3AVB", "LNGQT", "SVTAC", "PSVT"}
    major = {"CLBBB", "IMI", "ASMI", "LVH", "AFIB", "WPW"}
    minor = {"SBRAD", "STACH", "1AVB", "NST_", "NDT", "PAC", "PVC", "IRBBB"}
    normal = {"NORM", "SR", "SARRH"}
    for codes, level in ((urgent, 3), (major, 2), (minor, 1), (normal, 0)):
        assert {c: SCP_SEVERITY[c][0] for c in codes} == {c: level for c in codes}


def test_snomed_table_covers_the_superclass_table_and_the_challenge_codes() -> None:
    from ecgbridge.training.datasets import challenge

    assert challenge.SNOMED_TO_SUPERCLASS is SNOMED_TO_SUPERCLASS  # moved, re-exported
    for code in [*SNOMED_TO_SUPERCLASS, *challenge.NORM_COMPATIBLE, *challenge.SINUS_RHYTHMS]:
        assert code in SNOMED_SEVERITY, code
    for code, (level, rule, description) in SNOMED_SEVERITY.items():
        assert code.isdigit() and level in (0, 1, 2, 3) and rule.startswith(RULE_PREFIX[level]) and description
    assert challenge.read_header(FIXTURES / "wfdb" / "E07506.hea").dx == ("426783006",)
    assert severity4_of_snomed(("426783006",)) == 0
    # Same clinical facts in both vocabularies.
    assert SNOMED_SEVERITY["27885002"][0] == SCP_SEVERITY["3AVB"][0] == 3
    assert SNOMED_SEVERITY["111975006"][0] == SCP_SEVERITY["LNGQT"][0] == 3
    assert SNOMED_SEVERITY["164909002"][0] == SCP_SEVERITY["CLBBB"][0] == 2
    assert SNOMED_SEVERITY["270492004"][0] == SCP_SEVERITY["1AVB"][0] == 1


def test_every_code_of_the_shared_challenge_headers_has_a_tier() -> None:
    from ecgbridge.training.datasets.challenge import read_header

    root = _require(_shared() / "challenge" / "cinc2021", "shared challenge data")
    codes = {c for hea in root.rglob("*.hea") for c in read_header(hea).dx}
    assert codes and not sorted(c for c in codes if c not in SNOMED_SEVERITY)


def test_display_strings_and_interpretation_flags_cover_every_tier() -> None:
    assert set(SEVERITY_DISPLAY) == set(SEVERITY_SNOMED) == set(SEVERITY_INTERPRETATION) == set(SEVERITY3)
    assert set(SEVERITY4_DISPLAY) == set(SEVERITY4)
    assert [SEVERITY_INTERPRETATION[t][0] for t in SEVERITY3] == ["N", "A", "AA"]
    assert [SEVERITY3[to_severity3(k)] for k in range(4)] == [
        "normal",
        "abnormal_nonurgent",
        "abnormal_nonurgent",
        "urgent",
    ]


# (2) worst-statement rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, level",
    [
        ({"NORM": 100.0, "SR": 0.0}, 0),  # fixture 00024
        ({"ISC_": 100.0, "ASMI": 100.0, "STD_": 0.0, "STACH": 0.0}, 2),  # fixture 00622
        ({"CLBBB": 100.0, "1AVB": 100.0, "SR": 0.0}, 2),  # fixture 00730
        ({"NORM": 80.0, "SBRAD": 0.0}, 1),
        ({"IMI": 100.0, "INJIN": 50.0, "SR": 0.0}, 3),
        (["SR", "LNGQT"], 3),
        ({}, None),
        ({"NORM": 100.0, "XYZ": 0.0}, None),  # an unknown statement could be the worst one
    ],
)
def test_a_record_takes_the_worst_tier_of_its_statements(codes, level) -> None:
    assert severity4_of_scp(codes) == level


def test_likelihood_rule() -> None:
    codes = {"INJAS": 15.0, "SR": 0.0}
    assert severity4_of_scp(codes) == 3  # default: every stated likelihood counts (PTB-XL's aggregation)
    assert severity4_of_scp(codes, min_likelihood=50) == 0  # a "cannot be excluded" injury dropped on request
    assert severity4_of_scp({"SR": 0.0, "AFIB": 0.0}, min_likelihood=50) == 2  # 0 = not stated: always counted


def test_snomed_worst_code_and_unknown_codes() -> None:
    assert severity4_of_snomed(["426783006", "427084000"]) == 1
    assert severity4_of_snomed(["426783006", "164909002", "111975006"]) == 3
    assert severity4_of_snomed(["426783006", "999999999"]) is None
    assert severity4_of_snomed([]) is None


# (3) ordinal decoding ---------------------------------------------------------------------


def test_decoding_takes_the_most_severe_flagged_output() -> None:
    p = np.array([[0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.7], [0.2, 0.1, 0.95]])
    assert decode_levels(p, [0.5, 0.5, 0.5]).tolist() == [0, 1, 2, 3, 3]  # an urgent flag is never hidden
    assert decode_levels(p, [0.95, 0.85, 0.99]).tolist() == [0, 0, 0, 0, 0]
    assert int(decode_levels(np.array([0.6, 0.3]), [0.5, 0.2])) == 2
    with pytest.raises(ValueError):
        decode_levels(p, [0.5, 0.5])


def _findings(codes, probs, thr=0.5):
    return [Finding(code=c, display=c, probability=p, threshold=thr, present=p >= thr) for c, p in zip(codes, probs)]


def test_severity_extra_for_3_and_4_tier_models() -> None:
    e4 = severity_extra(_findings(TRIAGE_OUTPUTS_4, [0.9, 0.7, 0.1]))
    assert e4["severity4"] == "major_nonurgent" and e4["severity"] == "abnormal_nonurgent"
    assert e4["severity_display"] == SEVERITY_DISPLAY["abnormal_nonurgent"]
    e4u = severity_extra(_findings(TRIAGE_OUTPUTS_4, [0.3, 0.2, 0.6]))
    assert e4u["severity4"] == "urgent" and e4u["severity"] == "urgent"
    e3 = severity_extra(_findings(TRIAGE_OUTPUTS_3, [0.2, 0.1]))
    assert e3["severity"] == "normal" and "severity4" not in e3
    with pytest.raises(ValueError):
        severity_extra(_findings(("NORM", "MI"), [0.2, 0.1]))


def test_tier_scores_from_other_granularities() -> None:
    from ecgbridge.training.triage_evaluate import superclass_weights, tier_scores

    probs = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.8]])
    fine = tier_scores(probs, ["NORM", "IMI", "INJAS"], "fine")
    assert np.allclose(fine["abnormal"], [0.2, 0.8]) and np.allclose(fine["urgent"], [0.1, 0.8])
    assert tier_scores(probs, ["NORM", "IMI", "SR"], "fine")["urgent"] is None  # no urgent statement: n/a
    y = np.array([[1, 0], [0, 1], [0, 1]], dtype=float)
    w = superclass_weights(y, np.array([0, 2, 3]), ["NORM", "MI"])
    assert w["urgent"] == {"NORM": 0.0, "MI": 0.5} and w["abnormal"] == {"NORM": 0.0, "MI": 1.0}
    sc = tier_scores(np.array([[0.9, 0.4]]), ["NORM", "MI"], "superclass", weights=w)
    assert np.allclose(sc["urgent"], [0.2]) and np.allclose(sc["abnormal"], [0.4])


def test_specificity_threshold_comes_from_the_negatives_alone() -> None:
    from ecgbridge.training.triage_evaluate import specificity_threshold

    neg = np.linspace(0.0, 0.99, 100)
    y = np.r_[np.zeros(100), 1.0]
    a = specificity_threshold(y, np.r_[neg, 0.05], 0.9)
    b = specificity_threshold(y, np.r_[neg, 0.999], 0.9)
    assert a["threshold"] == b["threshold"]  # the one positive's score plays no part
    assert np.isclose(a["threshold"], (neg[89] + neg[90]) / 2)  # 10 of 100 negatives at or above
    assert int(np.sum(neg >= a["threshold"])) == 10 and a["val_specificity"] == 0.9
    assert a["val_tp"] == 0 and b["val_tp"] == 1 and a["positives"] == 1 and a["negatives"] == 100
    # ties: never more false positives than the target allows
    tied = np.r_[np.zeros(15), np.full(5, 0.5)]
    t = specificity_threshold(np.zeros(20), tied, 0.9)
    assert int(np.sum(tied >= t["threshold"])) <= 2 and t["threshold"] > 0.5
    assert specificity_threshold(np.zeros(10), np.arange(10) / 10, 1.0)["threshold"] > 0.9  # no negative flagged
    assert specificity_threshold(np.ones(3), np.array([0.2, 0.4, 0.6]), 0.9)["threshold"] == 0.5  # no negatives


def test_choose_thresholds_switches_rule_below_n_min_positives() -> None:
    from ecgbridge.training.calibration import min_sensitivity_threshold
    from ecgbridge.training.triage_evaluate import (
        N_MIN_POSITIVES,
        choose_thresholds,
        specificity_threshold,
        task_labels,
    )

    assert N_MIN_POSITIVES == 10
    rng = np.random.default_rng(0)
    level4 = np.r_[np.zeros(60, int), np.ones(20, int), np.full(19, 2), 3]  # 40 abnormal+, 20 major+, 1 urgent
    labels = task_labels(level4)
    scores = {t: np.clip(0.3 * labels[t] + rng.uniform(0, 0.7, level4.size), 0, 1) for t in labels}
    chosen = choose_thresholds(level4, scores, min_sensitivity=0.8, urgent_sensitivity=0.9)
    for task in ("abnormal", "major"):  # enough positives: the sensitivity rule, unchanged
        assert chosen[task] == min_sensitivity_threshold(labels[task], scores[task], 0.8)
    urgent = chosen["urgent"]
    assert urgent == specificity_threshold(labels["urgent"], scores["urgent"], 0.9)
    assert urgent["rule"].startswith("fewer than 10 fold-9 positives") and urgent["positives"] == 1
    # a stricter specificity target raises the threshold; a lower N_MIN switches urgent back
    strict = choose_thresholds(
        level4,
        scores,
        min_sensitivity=0.8,
        urgent_sensitivity=0.9,
        few_positives_specificity={"abnormal": 0.9, "major": 0.9, "urgent": 0.98},
    )
    assert strict["urgent"]["threshold"] > urgent["threshold"]
    low = choose_thresholds(level4, scores, min_sensitivity=0.8, urgent_sensitivity=0.9, min_positives=1)
    assert low["urgent"]["rule"] == "max F1 with sensitivity >= 0.9"
    high = choose_thresholds(
        level4, scores, min_sensitivity=0.8, urgent_sensitivity=0.9, min_positives=50, few_positives_specificity=0.8
    )
    assert all(high[t]["rule"].startswith("fewer than 50") and "0.8" in high[t]["rule"] for t in labels)


# (4) the shipped triage model -------------------------------------------------------------


def test_shipped_triage_directory() -> None:
    assert SHIPPED.is_dir(), f"{SHIPPED} is missing: run `ecgbridge train triage --model-dir {SHIPPED}`"
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.onnx"]
    assert (SHIPPED / "model.onnx").stat().st_size < 2 * 1024 * 1024
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert card.splitlines()[0].endswith("NOT FOR CLINICAL USE")
    assert "Label granularity comparison" in card and "fine" in card and "superclass" in card
    names = [json.loads(p.read_text())["name"] for p in SHIPPED_DIR.glob("*/manifest.json")]
    assert names.count("triage") == 1


def test_shipped_triage_model_gives_a_tier_for_fixture_ecgs() -> None:
    from ecgbridge.mapping.readers import read_ecg_file
    from ecgbridge.training.export import sha256_file

    loaded = ModelRegistry().get("triage")
    manifest = loaded.manifest
    assert loaded.directory == SHIPPED and manifest.task == "triage"
    assert manifest.sha256 == sha256_file(SHIPPED / manifest.file)
    codes = tuple(c.code for c in manifest.classes)
    assert codes in (TRIAGE_OUTPUTS_3, TRIAGE_OUTPUTS_4)
    for name in ("wfdb/00024_lr.hea", "wfdb/00730_lr.hea", "wfdb/E07506.hea", "dicom/ptbxl_00622_mi_12lead.dcm"):
        out = loaded.run(read_ecg_file(FIXTURES / name))
        assert out.task == "triage" and out.model == "triage"
        assert out.extra["severity"] in SEVERITY3
        assert out.extra["severity_display"] == SEVERITY_DISPLAY[out.extra["severity"]]
        probs = np.array([f.probability for f in out.findings])
        level = int(decode_levels(probs, [manifest.threshold(c) for c in codes]))
        if codes == TRIAGE_OUTPUTS_4:
            assert out.extra["severity4"] == SEVERITY4[level]
            assert out.extra["severity"] == SEVERITY3[SEVERITY4_TO_3[level]]
        else:
            assert out.extra["severity"] == SEVERITY3[level]


def test_shipped_triage_thresholds_are_the_fold9_rule() -> None:
    """The manifest's thresholds are what ``choose_thresholds`` gives on fold 9 through the serving path."""
    from ecgbridge.training.triage_evaluate import rethreshold

    root = _require(_shared() / "ptbxl-subset" / "ptbxl_database.csv", "shared PTB-XL subset").parent
    before = (SHIPPED / "manifest.json").read_bytes()
    out = rethreshold(SHIPPED, root, write=False)
    assert (SHIPPED / "manifest.json").read_bytes() == before and out["folds"] == [9]
    assert out["new"] == out["old"]
    assert out["positives"]["urgent"] < 10 and out["detail"]["urgent"]["rule"].startswith("fewer than 10")
    assert out["detail"]["urgent"]["val_specificity"] >= 0.9


def test_diagnosis_results_carry_no_severity() -> None:
    from ecgbridge.mapping.readers import read_ecg_file

    out = ModelRegistry().get("diagnosis").run(read_ecg_file(FIXTURES / "wfdb" / "00024_lr.hea"))
    assert "severity" not in out.extra


# (5) export parity and a tiny end-to-end run -----------------------------------------------


def test_triage_graph_onnx_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: export parity needs it")
    from ecgbridge.training.export import ServingGraph, check_parity, export_onnx
    from ecgbridge.training.train import build_model

    torch.manual_seed(0)
    model = build_model("resnet_se", width=8, dropout=0.3, n_classes=len(TRIAGE_OUTPUTS_4))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 12, 1000) * 1.3 + 0.1)
    graph = ServingGraph([model.eval()]).eval()
    export_onnx(graph, tmp_path / "model.onnx")
    assert check_parity(graph, tmp_path / "model.onnx") < 1e-4


def test_ptbxl_loader_can_keep_records_without_a_superclass() -> None:
    from ecgbridge.training.datasets.ptbxl import load_ptbxl

    root = _require(_shared() / "ptbxl-subset" / "ptbxl_database.csv", "shared PTB-XL subset").parent
    strict = load_ptbxl(root, (10,))
    loose = load_ptbxl(root, (10,), require_superclass=False)
    assert len(loose) == len(strict) + strict.n_unlabelled and loose.n_unlabelled == 0
    assert len(loose.scp_codes) == len(loose) and len(strict.scp_codes) == len(strict)


def test_tiny_train_triage_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed: training needs it")
    from ecgbridge.cli import main as cli_main

    root = _require(_shared() / "ptbxl-subset" / "ptbxl_database.csv", "shared PTB-XL subset").parent
    out, model_dir = tmp_path / "out", tmp_path / "model"
    argv = [
        "train",
        "triage",
        "--data",
        str(root),
        "--out",
        str(out),
        "--model-dir",
        str(model_dir),
        "--epochs",
        "1",
        "--limit",
        "24",
        "--width",
        "8",
        "--n-bootstrap",
        "20",
        "--threads",
        "1",
    ]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.onnx"]
    result = json.loads((out / "result.json").read_text())
    assert {r["scheme"] for r in result["comparison"]} == {"fine", "superclass", "severity3", "severity4"}
    assert max(result["export"]["parity"].values()) < 1e-4
    loaded = ModelRegistry(paths={"triage": model_dir}).get("triage")
    assert loaded.manifest.task == "triage" and [c.code for c in loaded.manifest.classes] == list(TRIAGE_OUTPUTS_4)
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert card.splitlines()[0].endswith("NOT FOR CLINICAL USE") and result["comparison_table"] in card
    assert cli_main(["evaluate", "triage", "--model", str(model_dir), "--data", str(root), "--n-bootstrap", "20"]) == 0
