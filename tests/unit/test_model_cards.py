"""The shipped model cards' figures are recomputed from the shipped models on ../shared/data.

Why: the card is what a site reads before it turns a model on. A model retrained, re-exported or
re-thresholded without its card (or a card edited by hand) must fail CI. Each test runs what the
card names as its source (``training.evaluate`` for diagnosis, as ``training.reexport`` ran it;
``ecgbridge evaluate triage``; ``ecgbridge evaluate lvef``) through the serving path (registry,
sha256 check, ONNX Runtime, manifest preprocessing) and compares the card's text with what it
prints, figure for figure. Without ../shared/data these skip locally and fail in CI
(``tests/support/peers.py``). Measured: 6.4 s of test time, 7.5 s with imports, on a shared
2-core machine (ONNX on 102 + 83 + 50 records, twice for triage; 185 LVEF rows; 1000 bootstrap
replicates per figure set).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ecgbridge.inference.lvef import LVEF_DIR
from ecgbridge.inference.models import SHIPPED_DIR, load_manifest

DIAGNOSIS = SHIPPED_DIR / "diagnosis-baseline"
TRIAGE = SHIPPED_DIR / "triage"


def _card(model_dir: Path) -> str:
    return (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")


def _fenced(card: str) -> list[str]:
    """The card's ``` blocks, as printed by the evaluation commands."""
    return [block.strip("\n") for block in re.findall(r"^```[^\n]*\n(.*?)^```", card, flags=re.S | re.M)]


def _section(card: str, heading: str) -> str:
    """The text under a ``## heading`` up to the next one."""
    start = card.index(f"\n## {heading}")
    end = card.find("\n## ", start + 1)
    return card[start : end if end >= 0 else len(card)]


def _rows(text: str) -> list[list[str]]:
    """Cells of the Markdown table lines in ``text`` (separator lines left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            out.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return out


def _same_data_path(report: str) -> str:
    """Where the external data lay on the machine that printed the report is not a figure."""
    return re.sub(r"^external data \S+:", "external data DATA:", report.strip("\n"))


# --------------------------------------------------------------------------- diagnosis: against its manifest


def test_diagnosis_card_thresholds_tiers_and_calibration_are_the_manifests() -> None:
    card = _card(DIAGNOSIS)
    m = json.loads((DIAGNOSIS / "manifest.json").read_text())
    assert card.startswith(f"# {m['name']} {m['version']}:"), card.splitlines()[0]
    cal = {r[0]: r[1:] for r in _rows(_section(card, "Calibration")) if r[0] in m["thresholds"]}
    assert cal == {
        c: [f"{m['calibration']['temperature'][c]:.3f}", f"{m['calibration']['offset'][c]:.3f}"]
        for c in m["thresholds"]
    }
    tiers = {
        r[0]: r[1:4] for r in _rows(_section(card, "Decision thresholds and risk tiers")) if r[0] in m["thresholds"]
    }
    assert tiers == {
        c: [f"{m['thresholds'][c]:.4f}", f"{m['tiers'][c]['moderate']:.4f}", f"{m['tiers'][c]['high']:.4f}"]
        for c in m["thresholds"]
    }


# --------------------------------------------------------------------------- diagnosis: against the data


def test_diagnosis_card_fold10_evaluation_is_the_shipped_models(shared_data: Path) -> None:
    """Headline first (fold-10 macro-AUROC, to 1e-6 at the card's 3 decimals), then every figure of the block."""
    from ecgbridge.training.evaluate import evaluate_diagnosis, format_report

    (block,) = [b for b in _fenced(_card(DIAGNOSIS)) if "PTB-XL strat_fold 10:" in b]
    metrics = evaluate_diagnosis(DIAGNOSIS, shared_data / "ptbxl-subset", fold=10, n_bootstrap=1000, seed=0)
    (headline,) = [float(x) for x in re.findall(r"^macro-AUROC (\d\.\d{3}) ", block, flags=re.M)]
    assert abs(round(metrics["macro_auroc"], 3) - headline) < 1e-6, (metrics["macro_auroc"], headline)
    assert format_report(metrics).strip("\n") == block


def test_diagnosis_card_fold9_figures_are_the_shipped_models(shared_data: Path) -> None:
    """The card's fold-9 (validation) macro-AUROC and ECE before / after calibration."""
    from ecgbridge.training.evaluate import evaluate_diagnosis

    card = _card(DIAGNOSIS)
    metrics = evaluate_diagnosis(DIAGNOSIS, shared_data / "ptbxl-subset", fold=9, n_bootstrap=1, seed=0)
    assert metrics["n"] == 83
    (macro,) = re.findall(r"fold-9 macro-AUROC\s+(\d\.\d{3}) \(83 records\)", card)
    assert f"{metrics['macro_auroc']:.3f}" == macro
    ece = metrics["calibration"]
    (before, after) = re.findall(r"Fold-9 ECE \(mean over classes\) (\d\.\d{3}) before, (\d\.\d{3}) after", card)[0]
    assert (f"{ece['before']['mean']:.3f}", f"{ece['after']['mean']:.3f}") == (before, after)


def test_diagnosis_card_external_evaluation_is_the_shipped_models(shared_data: Path) -> None:
    """Every figure of the challenge sources (Chapman-Shaoxing/Ningbo, Georgia, PTB-XL copies)."""
    from ecgbridge.training.evaluate import evaluate_external, format_report

    (block,) = [b for b in _fenced(_card(DIAGNOSIS)) if b.startswith("external data ")]
    metrics = evaluate_external(
        DIAGNOSIS, shared_data / "challenge" / "cinc2021", train_data=shared_data / "ptbxl-subset", seed=0
    )
    assert _same_data_path(format_report(metrics)) == _same_data_path(block)


# --------------------------------------------------------------------------- triage


def test_triage_card_thresholds_are_the_manifests() -> None:
    manifest = load_manifest(TRIAGE)
    rows = {r[0]: r[1] for r in _rows(_section(_card(TRIAGE), "What it does")) if r[0] in manifest.thresholds}
    assert rows == {c: f"{t:.4f}" for c, t in manifest.thresholds.items()}


def test_triage_card_serving_path_figures_are_the_shipped_models(shared_data: Path) -> None:
    """The table printed by ``ecgbridge evaluate triage`` on fold 10 and on the challenge records (current thresholds)."""
    from ecgbridge.training.triage_evaluate import evaluate_triage

    section = _section(_card(TRIAGE), "The shipped model through the serving path")
    current = section[: section.index("Earlier figures")]  # the first release's rows follow, for the record
    card_rows = [line for line in current.splitlines() if line.startswith("| triage ")]
    fold10 = evaluate_triage(TRIAGE, shared_data / "ptbxl-subset", fold=10, seed=0)
    external = evaluate_triage(
        TRIAGE, shared_data / "challenge" / "cinc2021", train_data=shared_data / "ptbxl-subset", seed=0
    )
    printed = [line for r in (fold10, external) for line in r["report"].splitlines() if line.startswith("| triage ")]
    assert len(printed) == 4
    assert printed == card_rows


# --------------------------------------------------------------------------- lvef


def test_lvef_card_and_metrics_are_the_shipped_models(shared_data: Path, tmp_path: Path) -> None:
    """``ecgbridge evaluate lvef`` on the synthetic cohort's test split, rebuilt here.

    The test split is PTB-XL folds 9-10 and every simulated patient is drawn from
    ``(seed, patient id)`` alone (``training.lvef_synthetic``), so generating just those 185 rows
    gives the rows of the card's 1859-row cohort: seconds instead of the whole cohort.
    """
    from ecgbridge.training.lvef_evaluate import evaluate_model, format_metrics
    from ecgbridge.training.lvef_synthetic import generate_cohort, ptbxl_sources

    test_rows = [s for s in ptbxl_sources(shared_data / "ptbxl-subset") if s.fold in (9, 10)]
    generate_cohort(test_rows, tmp_path / "lvef_synthetic.csv", seed=0)
    report = evaluate_model(LVEF_DIR, tmp_path / "lvef_synthetic.csv", split="test", n_bootstrap=1000, seed=0)
    assert (report["rows"], report["rows_with_ehr"]) == (185, 148)
    printed = "\n\n".join(format_metrics(name, m) for name, m in report["evaluations"].items())
    assert printed in _section(_card(LVEF_DIR), "Evaluation (test split, 185 rows, 148 with EHR context)")
    stored = json.loads((LVEF_DIR / "metrics.json").read_text())["test"]["evaluations"]
    assert json.loads(json.dumps(report["evaluations"])) == stored
