"""Train the LVEF four-tier model (LightGBM), export both variants to ONNX, evaluate, write the card.

    ecgbridge train lvef --manifest cohort.csv --out DIR [--version 0.1.0] [--threads 2]
    ecgbridge train lvef --synthetic-from /work/shared/data --out DIR      # generate the cohort first

Steps:

1. Read the manifest (:mod:`training.datasets.lvef`), measure / classify each ECG once
   (cached beside the CSV) and build the feature rows with
   :func:`inference.lvef_features.lvef_feature_row`, as serving does. Values are rounded to
   float32 before training: serving feeds float32, and the trees' thresholds are then moved
   to the largest float32 not above them (``_float32_thresholds``), which changes no decision
   for float32 inputs and makes the ONNX graph (float32 thresholds) agree with LightGBM.
2. Two LightGBM multiclass models (4 tiers, softmax; native missing-value handling):
   ``ecg+ehr`` on every feature, ``ecg-only`` on the ECG features; early stopping on the
   validation split's multi-logloss. Small trees (``--num-leaves``, ``--max-rounds``) keep the
   files to a few hundred KB.
3. The ordinal alternative, for comparison: LightGBM regression on LVEF %, cut at the tier
   boundaries (tier probabilities from a normal residual with the validation residual SD).
   Both are scored on the validation split (macro-AUROC, quadratic kappa) and reported;
   the multiclass model is the one exported (serving needs per-tier trees for per-tier
   tree-SHAP attributions), and the card says how the regression compared.
4. Export: booster text files (``ecg_ehr.lgb.txt``, ``ecg_only.lgb.txt``) and ONNX graphs
   (onnxmltools' LightGBM converter, ``zipmap=False``: output ``probabilities`` (N, 4)),
   parity-checked (ONNX Runtime vs ``Booster.predict``, rows with and without NaN, max abs
   difference < 1e-5, else the export fails); ``manifest.json`` with sha256 of every file.
5. Evaluation of the exported directory on the test split by :mod:`training.lvef_evaluate`
   (the serving code path), written to ``metrics.json`` and into ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from ecgbridge.inference.lvef import LvefModel
from ecgbridge.inference.lvef_features import (
    ECG_FEATURE_NAMES,
    FEATURE_NAMES,
    FEATURE_SPECS,
    FEATURES_SCHEMA_VERSION,
    LVEF_TIERS,
)
from ecgbridge.inference.models import sha256_file
from ecgbridge.training.datasets.lvef import LvefTable, build_table, cache_path_for, load_features, read_manifest
from ecgbridge.training.evaluate import auroc
from ecgbridge.training.lvef_evaluate import evaluate_model, format_metrics, quadratic_weighted_kappa

__all__ = ["PARITY_TOLERANCE", "ONNX_OPSET", "train_lvef", "export_variant", "render_card", "main"]

PARITY_TOLERANCE = 1e-5
#: Highest default-domain opset onnxmltools 1.16's LightGBM converter supports; ONNX Runtime 1.32 runs it.
ONNX_OPSET = 15
SYNTHETIC_NOTICE = (
    "Trained on synthetic LVEF labels; it means nothing clinically until a site retrains it on its own "
    "ECG + echo data. NOT FOR CLINICAL USE."
)
REAL_NOTICE = "Research model; NOT FOR CLINICAL USE: it must be reviewed by a qualified clinician."
VARIANT_FILES = {"ecg+ehr": "ecg_ehr", "ecg-only": "ecg_only"}
_K = len(LVEF_TIERS)
_BOUNDS = [(50.0, math.inf), (40.0, 50.0), (30.0, 40.0), (-math.inf, 30.0)]


def _params(args: argparse.Namespace, objective: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "objective": objective,
        "learning_rate": args.learning_rate,
        "num_leaves": args.num_leaves,
        "min_data_in_leaf": args.min_data_in_leaf,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": args.seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": args.threads,
        "verbose": -1,
    }
    if objective == "multiclass":
        p["num_class"] = _K
    return p


def _fit(
    params: dict[str, Any],
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    names: Sequence[str],
    max_rounds: int,
    patience: int,
) -> Any:
    import lightgbm as lgb

    dtr = lgb.Dataset(x_tr, y_tr, feature_name=list(names), free_raw_data=False)
    callbacks: list[Callable[..., Any]] = []
    valid = []
    if len(y_va):
        valid = [lgb.Dataset(x_va, y_va, reference=dtr)]
        callbacks.append(lgb.early_stopping(patience, verbose=False))
    return lgb.train(params, dtr, num_boost_round=max_rounds, valid_sets=valid, callbacks=callbacks)


def _float32_floor(t: float) -> float:
    t32 = np.float32(t)
    if float(t32) > t:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _float32_thresholds(model_text: str) -> str:
    """Each split threshold -> the largest float32 <= it (no decision changes for float32 inputs)."""

    def fix(m: re.Match[str]) -> str:
        return "threshold=" + " ".join(repr(_float32_floor(float(v))) for v in m.group(1).split())

    text = re.sub(r"^threshold=(.*)$", fix, model_text, flags=re.M)
    return re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M)  # sizes changed; rewritten on save


def _parity_rows(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = x[rng.choice(len(x), size=min(len(x), 300), replace=False)] if len(x) else np.zeros((0, x.shape[1]))
    holes = base.copy()
    holes[rng.random(holes.shape) < 0.3] = np.nan
    return np.concatenate([base, holes, np.full((2, x.shape[1]), np.nan)]).astype(np.float32)


def export_variant(
    booster: Any, names: Sequence[str], out_dir: Path, stem: str, check_rows: np.ndarray
) -> dict[str, Any]:
    """Booster -> ``<stem>.lgb.txt`` + ``<stem>.onnx``; returns the manifest entry and the parity figure."""
    import lightgbm as lgb
    import onnxruntime as ort
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    text = _float32_thresholds(booster.model_to_string(num_iteration=booster.best_iteration or None))
    fixed = lgb.Booster(model_str=text)
    txt_path = out_dir / f"{stem}.lgb.txt"
    fixed.save_model(str(txt_path))
    saved = lgb.Booster(model_file=str(txt_path))
    onx = convert_lightgbm(
        saved,
        name=f"lvef_{stem}",
        initial_types=[("features", FloatTensorType([None, len(names)]))],
        zipmap=False,
        target_opset=ONNX_OPSET,
    )
    onnx_path = out_dir / f"{stem}.onnx"
    onnx_path.write_bytes(onx.SerializeToString())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    if "probabilities" not in outputs:
        raise RuntimeError(f"{onnx_path.name}: converter produced outputs {outputs}, no 'probabilities'")
    p_onnx = session.run(["probabilities"], {"features": check_rows})[0]
    p_lgb = saved.predict(check_rows.astype(np.float64), num_threads=1)
    diff = float(np.max(np.abs(p_onnx - p_lgb))) if len(check_rows) else 0.0
    if not diff < PARITY_TOLERANCE:
        raise RuntimeError(f"{onnx_path.name}: ONNX vs LightGBM max abs difference {diff:.3g} >= {PARITY_TOLERANCE}")
    return {
        "entry": {
            "onnx": onnx_path.name,
            "booster": txt_path.name,
            "features": list(names),
            "input_name": "features",
            "output_name": "probabilities",
            "num_iterations": int(saved.current_iteration()),
            "sha256": {onnx_path.name: sha256_file(onnx_path), txt_path.name: sha256_file(txt_path)},
        },
        "parity_max_abs_diff": diff,
        "parity_rows": int(len(check_rows)),
        "parity_rows_with_nan": int(np.isnan(check_rows).any(axis=1).sum()),
    }


def _regression_tier_probs(pred_ef: np.ndarray, sd: float) -> np.ndarray:
    from scipy.stats import norm

    sd = max(sd, 1e-3)
    probs = np.stack([norm.cdf((hi - pred_ef) / sd) - norm.cdf((lo - pred_ef) / sd) for lo, hi in _BOUNDS], axis=1)
    return cast(np.ndarray, probs / probs.sum(axis=1, keepdims=True))


def _val_scores(y: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    per = [auroc(y == k, probs[:, k]) for k in range(_K)]
    defined = [v for v in per if not np.isnan(v)]
    return {
        "macro_auroc": round(float(np.mean(defined)), 4) if defined else None,
        "kappa_quadratic": round(quadratic_weighted_kappa(y, pred), 4) if len(y) else None,
        "accuracy": round(float(np.mean(pred == y)), 4) if len(y) else None,
    }


def _split_summary(table: LvefTable) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        m = table.split == split
        out[split] = {
            "rows": int(m.sum()),
            "patients": int(len(set(table.patient_ids[m]))),
            "with_ehr": int(table.has_ehr[m].sum()),
            "tiers": {t.code: int((table.tier[m] == t.index).sum()) for t in LVEF_TIERS},
        }
    shared = (set(table.patient_ids[table.split == "train"]) & set(table.patient_ids[table.split == "test"])) | (
        set(table.patient_ids[table.split == "val"]) & set(table.patient_ids[table.split == "test"])
    )
    out["patients_shared_with_test"] = len(shared)
    return out


def train_lvef(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic = bool(args.synthetic)
    cohort_summary = None
    manifest_csv = args.manifest
    if args.synthetic_from:
        from ecgbridge.training.lvef_synthetic import data_dir_sources, folder_sources, generate_cohort

        src = Path(args.synthetic_from)
        sources = data_dir_sources(src) if not list(src.glob("*.hea")) else folder_sources(src)
        manifest_csv = Path(args.manifest) if args.manifest else out / "cohort" / "lvef_synthetic.csv"
        log(f"generating the synthetic cohort from {src} -> {manifest_csv}")
        cohort_summary = generate_cohort(
            sources, manifest_csv, seed=args.seed, replicas=args.replicas, progress=lambda m: log(m)
        )
        synthetic = True
    if manifest_csv is None:
        raise SystemExit("ecgbridge train lvef: --manifest CSV or --synthetic-from DATA_DIR is required")
    manifest_csv = Path(manifest_csv)
    records = read_manifest(manifest_csv)
    feats = load_features(records, cache_path_for(manifest_csv), progress=lambda m: log(m))
    table = build_table(records, feats)
    x = table.x.astype(np.float32).astype(np.float64)  # what serving feeds (float32)
    tr, va = table.split == "train", table.split == "val"
    if tr.sum() < 20:
        raise SystemExit(f"ecgbridge train lvef: only {int(tr.sum())} training rows in {manifest_csv}")
    splits = _split_summary(table)
    log(f"rows: train {splits['train']['rows']}, val {splits['val']['rows']}, test {splits['test']['rows']}")

    variants: dict[str, Any] = {}
    comparison: dict[str, Any] = {}
    for vname, names in (("ecg+ehr", FEATURE_NAMES), ("ecg-only", ECG_FEATURE_NAMES)):
        cols = [FEATURE_NAMES.index(n) for n in names]
        xv = x[:, cols]
        t0 = time.time()
        clf = _fit(
            _params(args, "multiclass"),
            xv[tr],
            table.tier[tr],
            xv[va],
            table.tier[va],
            names,
            args.max_rounds,
            args.patience,
        )
        reg = _fit(
            _params(args, "regression"),
            xv[tr],
            table.ef[tr],
            xv[va],
            table.ef[va],
            names,
            args.max_rounds,
            args.patience,
        )
        p_clf = clf.predict(xv[va], num_iteration=clf.best_iteration or None)
        ef_va = reg.predict(xv[va], num_iteration=reg.best_iteration or None)
        ef_tr = reg.predict(xv[tr], num_iteration=reg.best_iteration or None)
        sd = float(np.std(table.ef[va] - ef_va)) if va.any() else float(np.std(table.ef[tr] - ef_tr))
        p_reg = _regression_tier_probs(ef_va, sd)
        from ecgbridge.inference.lvef_features import tier_index

        cut = np.array([tier_index(float(e)) for e in ef_va], dtype=int)
        comparison[vname] = {
            "multiclass": {
                **(_val_scores(table.tier[va], p_clf, np.argmax(p_clf, axis=1)) if va.any() else {}),
                "rounds": int(clf.best_iteration or clf.current_iteration()),
            },
            "regression_then_cut": {
                **(_val_scores(table.tier[va], p_reg, cut) if va.any() else {}),
                "rounds": int(reg.best_iteration or reg.current_iteration()),
                "residual_sd": round(sd, 2),
                "mae_val": round(float(np.mean(np.abs(table.ef[va] - ef_va))), 2) if va.any() else None,
            },
        }
        variants[vname] = {"booster": clf, "names": names, "cols": cols}
        log(
            f"{vname}: multiclass {clf.best_iteration or clf.current_iteration()} rounds, "
            f"val {comparison[vname]['multiclass']}; regression {comparison[vname]['regression_then_cut']} "
            f"({time.time() - t0:.1f} s)"
        )

    exported: dict[str, Any] = {}
    for vname, v in variants.items():
        rows = _parity_rows(x[:, v["cols"]][~tr] if (~tr).any() else x[:, v["cols"]], args.seed)
        exported[vname] = export_variant(v["booster"], v["names"], out, VARIANT_FILES[vname], rows)
        log(
            f"{vname}: exported, parity max abs diff {exported[vname]['parity_max_abs_diff']:.2e} "
            f"over {exported[vname]['parity_rows']} rows ({exported[vname]['parity_rows_with_nan']} with NaN)"
        )

    import lightgbm
    import onnxmltools
    import onnxruntime

    from ecgbridge.inference.models import ModelRegistry

    diag = ModelRegistry().get("diagnosis").manifest
    name = args.name or ("lvef-synthetic" if synthetic else "lvef")
    manifest = {
        "name": name,
        "version": args.version,
        "task": "lvef",
        "synthetic": synthetic,
        "notice": SYNTHETIC_NOTICE if synthetic else REAL_NOTICE,
        "features_schema": FEATURES_SCHEMA_VERSION,
        "tiers": [{"code": t.code, "display": t.display} for t in LVEF_TIERS],
        "variants": {k: e["entry"] for k, e in exported.items()},
        "decision_rule": "argmax: the most probable tier is present; every tier's threshold is 0.0",
        "diagnosis_model": f"{diag.name} {diag.version}",
        "versions": {
            "lightgbm": lightgbm.__version__,
            "onnxmltools": onnxmltools.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx_opset": str(ONNX_OPSET),
        },
        "card": "MODEL_CARD.md",
        "description": "Four-tier LVEF classification (LightGBM multiclass) from ECG measurements, diagnosis-model "
        "probabilities and EHR variables; ECG-only variant when the EHR gives nothing.",
        "trained_on": f"{manifest_csv.name} ({'synthetic labels' if synthetic else 'site labels'})",
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "features": [{"name": s.name, "kind": s.kind, "unit": s.unit, "display": s.display} for s in FEATURE_SPECS],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    LvefModel.forget(out)
    report = evaluate_model(out, manifest_csv, split="test", n_bootstrap=args.bootstrap, seed=args.seed, table=table)
    training = {
        "manifest_csv": manifest_csv.name,
        "splits": splits,
        "cohort": cohort_summary,
        "comparison": comparison,
        "kept": "multiclass",
        "params": {k: v for k, v in _params(args, "multiclass").items() if k not in ("verbose",)},
        "max_rounds": args.max_rounds,
        "patience": args.patience,
        "export": {k: {kk: vv for kk, vv in e.items() if kk != "entry"} for k, e in exported.items()},
        "seconds": round(time.time() - started, 1),
    }
    report = {
        **report,
        "manifest": manifest_csv.name,
        "model": {k: v for k, v in report["model"].items() if k != "directory"},
    }
    if cohort_summary:
        cohort_summary["csv"] = Path(cohort_summary["csv"]).name
    (out / "metrics.json").write_text(json.dumps({"test": report, "training": training}, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(render_card(manifest, report, training))
    log(f"wrote {out} in {time.time() - started:.0f} s")
    return {"manifest": manifest, "report": report, "training": training}


def _tiers_row(t: dict[str, int]) -> str:
    return " | ".join(str(t[c.code]) for c in LVEF_TIERS)


def render_card(manifest: dict[str, Any], report: dict[str, Any], training: dict[str, Any]) -> str:
    """MODEL_CARD.md from the measured numbers (nothing here is typed in by hand)."""
    synthetic = manifest["synthetic"]
    first = (
        f"# {manifest['name']} {manifest['version']}: TRAINED ON SYNTHETIC LABELS: it means nothing clinically "
        "until a site retrains it on its own ECG + echo data"
        if synthetic
        else f"# {manifest['name']} {manifest['version']}: research model, NOT FOR CLINICAL USE"
    )
    s = training["splits"]
    lines = [first, "", manifest["notice"], ""]
    lines += [
        "## What it does",
        "Classifies LVEF into four tiers from a 12-lead ECG's measurements (`inference.features`), the "
        "diagnosis model's probabilities and, when the EHR gives any, EHR variables "
        "(`inference.lvef_features`): " + "; ".join(t["display"] for t in manifest["tiers"]) + ". "
        "LightGBM multiclass trees served as ONNX; the predicted tier is the most probable one. Two variants: "
        "`ecg+ehr` and `ecg-only` (used when the EHR context is missing or empty). Each result carries "
        "tree-SHAP attributions (from the booster text file) for the predicted tier, split into ECG features "
        "and EHR variables, and the EHR variables that were missing.",
        "",
    ]
    lines += ["## Data"]
    if synthetic:
        lines += [
            "A synthetic cohort (`training.lvef_synthetic`): real ECGs (PTB-XL subset, unlabelled PTB-XL, "
            "non-PTB-XL challenge records) with real measurements, real diagnosis-model probabilities and "
            "PTB-XL's real age / sex / weight / height where given, but a **simulated LVEF** and **simulated "
            "EHR variables**, drawn from the associations tabled in that module's docstring. The model can "
            "only have learnt those associations back. The PTB-XL signals are z-scored (no mV), so every "
            "amplitude feature (voltages, Q waves, ST, T inversion, low voltage, axis) is missing for them: "
            "the trees have essentially not learnt from amplitudes."
        ]
        c = training.get("cohort")
        if c:
            lines += [
                "",
                f"Cohort: {c['rows']} rows (seed {c['seed']}), sources {c['sources']}, "
                f"{c['with_ehr']} with any EHR context; simulated causes: {c['latent']}.",
            ]
    lines += [
        "",
        f"Manifest: `{Path(training['manifest_csv']).name}`.",
        "",
        "| split | rows | patients | with EHR | " + " | ".join(t.code for t in LVEF_TIERS) + " |",
        "|---" * (4 + _K) + "|",
    ]
    for split in ("train", "val", "test"):
        lines.append(
            f"| {split} | {s[split]['rows']} | {s[split]['patients']} | {s[split]['with_ehr']} | "
            f"{_tiers_row(s[split]['tiers'])} |"
        )
    lines += [
        "",
        "Split: the manifest's `split` column (the synthetic cohort: PTB-XL folds 9-10 are test, the "
        "diagnosis model's unfitted folds; others train / val by patient hash), else a patient-level "
        f"hash split. Patients shared between test and train/val: {s['patients_shared_with_test']}.",
        "",
    ]
    p = training["params"]
    lines += [
        "## Training",
        f"LightGBM {manifest['versions']['lightgbm']} multiclass, learning rate {p['learning_rate']}, "
        f"{p['num_leaves']} leaves, min {p['min_data_in_leaf']} rows per leaf, feature / bagging fraction 0.8, "
        f"L2 1.0, at most {training['max_rounds']} rounds with early stopping ({training['patience']}) on the "
        f"validation multi-logloss, seed {p['seed']}, {p['num_threads']} threads; {training['seconds']} s.",
        "",
        "Ordinal alternative compared on the validation split (LightGBM regression on LVEF %, cut at the tier "
        "boundaries):",
        "",
        "| variant | model | rounds | val macro-AUROC | val quadratic kappa | val accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for vname, comp in training["comparison"].items():
        for kind, m in comp.items():
            lines.append(
                f"| {vname} | {kind} | {m.get('rounds')} | {m.get('macro_auroc')} | "
                f"{m.get('kappa_quadratic')} | {m.get('accuracy')} |"
            )
    lines += [
        "",
        f"Kept: **{training['kept']}** for both variants (serving needs per-tier probabilities from the trees "
        "and per-tier tree-SHAP attributions; the regression is reported for comparison only).",
        "",
    ]
    lines += [
        "## Export",
        f"ONNX opset {manifest['versions']['onnx_opset']} (onnxmltools "
        f"{manifest['versions']['onnxmltools']}, zipmap off), checked against LightGBM on ONNX Runtime "
        f"{manifest['versions']['onnxruntime']}:",
        "",
    ]
    for vname, e in training["export"].items():
        lines.append(
            f"- {vname}: max abs difference {e['parity_max_abs_diff']:.2e} over {e['parity_rows']} rows "
            f"({e['parity_rows_with_nan']} with NaN); tolerance {PARITY_TOLERANCE:g}"
        )
    lines += [
        "",
        f"## Evaluation (test split, {report['rows']} rows, {report['rows_with_ehr']} with EHR context)",
        "Measured by `ecgbridge evaluate lvef` on the exported ONNX files (the serving path).",
        "",
    ]
    for name, m in report["evaluations"].items():
        lines += [format_metrics(name, m), ""]
    lines += [
        "## Limitations",
        "- The labels are simulated: these figures say how well the trees recover the simulation, nothing about "
        "patients."
        if synthetic
        else "- Validated on one site's data only.",
        "- PTB-XL z-scored signals carry no amplitudes; a site retraining on mV ECGs (DICOM, MIMIC-IV-ECG) "
        "will give amplitude features weight.",
        "- A condition or medication the EHR does not mention is 'unknown' (NaN), not 'absent'.",
        "- The diagnosis model's probabilities are inputs: replacing that model changes this model's inputs "
        f"(trained with {manifest['diagnosis_model']}).",
        "",
        "## Retraining at a site",
        "Export a CSV in the `training.datasets.lvef` format (e.g. MIMIC-IV-ECG + echo LVEF + labs), then "
        "`ecgbridge train lvef --manifest site.csv --out DIR` and `ecgbridge evaluate lvef --model DIR "
        "--manifest site.csv`.",
        "",
        "## Files",
        "",
    ]
    for vname, v in manifest["variants"].items():
        for fname, sha in v["sha256"].items():
            lines.append(f"- `{fname}` ({vname}): sha256 `{sha}`")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ecgbridge train lvef", description="Train the LVEF four-tier model (LightGBM -> ONNX)."
    )
    ap.add_argument("--manifest", type=Path, help="LVEF CSV manifest (training.datasets.lvef format)")
    ap.add_argument(
        "--synthetic-from",
        type=Path,
        metavar="DATA_DIR",
        help="generate a synthetic cohort from this data dir (or a folder of WFDB records) first",
    )
    ap.add_argument("--replicas", type=int, default=1, help="with --synthetic-from: simulated patients per ECG")
    ap.add_argument(
        "--synthetic", action="store_true", help="the manifest's labels are synthetic (implied by --synthetic-from)"
    )
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--name", default=None, help="model name (default lvef-synthetic / lvef)")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=0.08)
    ap.add_argument("--num-leaves", type=int, default=6)
    ap.add_argument("--min-data-in-leaf", type=int, default=20)
    ap.add_argument("--max-rounds", type=int, default=120)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap replicates for the card's CIs")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_lvef(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
