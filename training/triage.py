"""Train the severity-triage model, and compare label granularities on the tier task.

    ecgbridge train triage --data /path/to/ptbxl --out /tmp/triage \\
        --labels fine superclass severity3 severity4 --ship severity4 \\
        --model-dir inference/shipped/triage --external /path/to/cinc2021 --threads 1

For each label scheme of ``--labels`` the same architecture (``--arch``, same seed,
optimiser, augmentation and early stopping; ``training.train.fit_member``) is trained
on PTB-XL folds 1-8 and selected on fold 9:

- ``fine``: one sigmoid per SCP-ECG statement (diagnostic, form and rhythm) that has at
  least ``--min-positives`` training-fold records;
- ``superclass``: PTB-XL's five diagnostic superclasses (records without one are left
  out of this model's training, as ``ecgbridge train diagnosis`` does);
- ``severity3``: two cumulative ordinal sigmoids, ``abnormal`` (tier >= abnormal) and
  ``urgent``;
- ``severity4``: three, ``abnormal``, ``major`` (>= major non-urgent) and ``urgent``.

Tier labels come from ``mapping.codes`` (worst statement of a record). Every model is
then scored on the tier task (``training.triage_evaluate``: tier scores from each
granularity, fold-9 thresholds) on fold 10 and on each external challenge source, and
the comparison table is printed. The ``--ship`` scheme (a tiered one) is exported to
``--model-dir`` (ONNX probabilities + CAMs + logits, parity-checked; manifest task
``triage``), re-measured through the serving path, and its ``MODEL_CARD.md`` carries the
comparison table as printed. No calibration: a triage decision is a threshold, and the
thresholds are chosen on fold 9 only (``training.triage_evaluate.choose_thresholds``):
a task with at least ``--min-val-positives`` (``N_MIN_POSITIVES``, 10) fold-9 positives
gets the best-F1 threshold with fold-9 sensitivity >= ``--min-sensitivity`` /
``--urgent-sensitivity``; a task with fewer (fold 9 of the subset holds one urgent ECG)
gets the fold-9 negatives' quantile for specificity >= ``--few-positives-specificity``
(0.90), so the threshold rests on the many negatives rather than on one or two positives.
An exported model can be re-thresholded with that rule without retraining:
``ecgbridge evaluate triage --model DIR --data PTBXL --rethreshold``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ecgbridge.inference.models import Manifest, ModelClass
from ecgbridge.inference.preprocess import DEFAULT_SPEC
from ecgbridge.inference.triage import DECODING_RULE, TRIAGE_OUTPUT_DISPLAY, TRIAGE_OUTPUTS_3, TRIAGE_OUTPUTS_4
from ecgbridge.mapping.codes import SCP_SEVERITY, SEVERITY3, SEVERITY4, SEVERITY_SNOMED
from ecgbridge.training.augment import AugmentConfig, Augmenter
from ecgbridge.training.datasets.ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    check_patient_disjoint,
)
from ecgbridge.training.evaluate import to_jsonable
from ecgbridge.training.export import (
    ServingGraph,
    build_manifest,
    check_parity,
    export_onnx,
    parity_by_output,
    sha256_file,
    write_manifest,
)
from ecgbridge.training.train import ARCHS, FS_HZ, _fmt_s, _logits, _seed_everything, class_pos_weight, fit_member
from ecgbridge.training.triage_evaluate import (
    N_MIN_POSITIVES,
    choose_thresholds,
    evaluate_triage,
    format_tier_table,
    load_tier_challenge,
    load_tier_ptbxl,
    superclass_weights,
    tier_metrics,
    tier_scores,
)

__all__ = ["LABEL_SCHEMES", "scheme_labels", "fine_classes", "train_triage", "main"]

LABEL_SCHEMES = ("superclass", "fine", "severity3", "severity4")
_TIERED = {"severity3": TRIAGE_OUTPUTS_3, "severity4": TRIAGE_OUTPUTS_4}


def fine_classes(scp_codes: Sequence[dict[str, float]], min_positives: int) -> tuple[str, ...]:
    """SCP statements with >= ``min_positives`` records, in ``SCP_SEVERITY`` order."""
    counts = {c: 0 for c in SCP_SEVERITY}
    for codes in scp_codes:
        for c in codes:
            if c in counts:
                counts[c] += 1
    return tuple(c for c in SCP_SEVERITY if counts[c] >= min_positives)


def scheme_labels(data: PtbxlData, level4: np.ndarray, scheme: str, classes: Sequence[str]) -> np.ndarray:
    """(n, len(classes)) float32 targets of one label scheme."""
    if scheme == "superclass":
        return np.stack([data.y[:, SUPERCLASSES.index(c)] for c in classes], axis=1).astype(np.float32)
    if scheme == "fine":
        return np.array(
            [[1.0 if c in codes else 0.0 for c in classes] for codes in data.scp_codes], dtype=np.float32
        ).reshape(len(data), len(classes))
    if scheme in _TIERED:
        lows = {"abnormal": 1, "major": 2, "urgent": 3}
        return np.stack([(level4 >= lows[c]).astype(np.float32) for c in classes], axis=1)
    raise ValueError(f"unknown label scheme {scheme!r}; choose from {LABEL_SCHEMES}")


def _with_labels(data: PtbxlData, y: np.ndarray, classes: Sequence[str], keep: np.ndarray | None = None) -> PtbxlData:
    idx = np.arange(len(data)) if keep is None else np.flatnonzero(keep)
    return replace(
        data,
        x=data.x[idx],
        y=y[idx],
        ecg_ids=data.ecg_ids[idx],
        patient_ids=data.patient_ids[idx],
        folds=data.folds[idx],
        classes=tuple(classes),
        scp_codes=tuple(data.scp_codes[i] for i in idx),
    )


def _probs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return cast(np.ndarray, 1.0 / (1.0 + np.exp(-_logits(model, x, torch.device("cpu")))))


def _level_counts(level4: np.ndarray) -> dict[str, int]:
    return {t: int(np.sum(level4 == k)) for k, t in enumerate(SEVERITY4)}


def _triage_manifest(
    *,
    scheme: str,
    thresholds: dict[str, float],
    sha256: str,
    name: str,
    version: str,
    description: str,
    trained_on: str,
    architecture: dict[str, Any],
) -> Manifest:
    codes = _TIERED[scheme]
    snomed = {"abnormal": SEVERITY_SNOMED["abnormal_nonurgent"][0]}
    return build_manifest(
        classes=tuple(codes),
        thresholds=thresholds,
        sha256=sha256,
        name=name,
        version=version,
        task="triage",
        description=description,
        trained_on=trained_on,
        architecture=architecture,
        outputs={"probabilities": "probabilities", "cams": "cams", "logits": "logits"},
        model_classes=[ModelClass(code=c, display=TRIAGE_OUTPUT_DISPLAY[c], snomed=snomed.get(c)) for c in codes],
    )


def train_triage(
    data_dir: Path,
    out_dir: Path,
    *,
    labels: Sequence[str] = LABEL_SCHEMES,
    ship: str | None = "severity4",
    model_dir: Path | None = None,
    external: Path | None = None,
    arch: str = "resnet_se",
    width: int = 16,
    dropout: float = 0.3,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    patience: int = 10,
    ema_decay: float = 0.98,
    augment_online: bool = True,
    augment_strength: float = 1.0,
    min_positives: int = 2,
    min_sensitivity: float = 0.8,
    urgent_sensitivity: float = 0.9,
    min_val_positives: int = N_MIN_POSITIVES,
    few_positives_specificity: float = 0.9,
    seed: int = 0,
    threads: int = 1,
    name: str = "triage",
    version: str = "0.1.0",
    n_bootstrap: int = 1000,
    limit: int | None = None,
    log: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every scheme of ``labels``, compare them on the tier task, ship ``ship``; see the module docstring."""
    started = time.monotonic()
    labels = list(dict.fromkeys(labels))
    for s in labels:
        if s not in LABEL_SCHEMES:
            raise ValueError(f"unknown label scheme {s!r}; choose from {LABEL_SCHEMES}")
    if ship is not None and (ship not in _TIERED or ship not in labels):
        raise ValueError(f"--ship must be a tiered scheme (severity3/severity4) that is also in --labels, got {ship!r}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / name
    if ship is not None and model_dir.resolve() == out_dir.resolve():
        raise ValueError("model_dir must differ from out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed, threads)
    dev = torch.device("cpu")

    def say(msg: str) -> None:
        if log:
            print(msg, flush=True)

    train, lv_train, out_train = load_tier_ptbxl(data_dir, TRAIN_FOLDS, limit=limit)
    val, lv_val, out_val = load_tier_ptbxl(data_dir, VAL_FOLDS, limit=limit)
    test, lv_test, out_test = load_tier_ptbxl(data_dir, TEST_FOLDS, limit=limit)
    check_patient_disjoint(train, val, test)
    say(
        f"tiers: train {_level_counts(lv_train)}, fold 9 {_level_counts(lv_val)}, fold 10 {_level_counts(lv_test)}; "
        f"without a tier: {out_train}/{out_val}/{out_test}"
    )
    ext = None
    if external is not None:
        ext = load_tier_challenge(Path(external), train_data=data_dir)
        say(
            "external: "
            + ", ".join(f"{s} {len(p['level4'])} ({_level_counts(p['level4'])})" for s, p in ext["sources"].items())
        )

    aug_config = AugmentConfig(fs=FS_HZ).scaled(augment_strength)
    augmenter = Augmenter(aug_config, DEFAULT_SPEC) if augment_online else None
    weights_sc = superclass_weights(train.y, lv_train, SUPERCLASSES)
    fine = fine_classes(train.scp_codes, min_positives)

    rows: list[dict[str, Any]] = []
    schemes: dict[str, dict[str, Any]] = {}
    for scheme in labels:
        if scheme == "superclass":
            classes: tuple[str, ...] = SUPERCLASSES
            keep_tr, keep_va = train.y.sum(axis=1) > 0, val.y.sum(axis=1) > 0
        elif scheme == "fine":
            classes = fine
            keep_tr = keep_va = None
        else:
            classes = _TIERED[scheme]
            keep_tr = keep_va = None
        tr = _with_labels(train, scheme_labels(train, lv_train, scheme, classes), classes, keep_tr)
        va = _with_labels(val, scheme_labels(val, lv_val, scheme, classes), classes, keep_va)
        pos_weight = class_pos_weight(tr.y)
        say(f"[{scheme}] {len(classes)} outputs, {len(tr)} training / {len(va)} fold-9 records")
        member = fit_member(
            tr,
            va,
            arch=arch,
            loss="bce",
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            width=width,
            dropout=dropout,
            patience=patience,
            ema_decay=ema_decay,
            pos_weight=pos_weight,
            augmenter=augmenter,
            device=dev,
            log=say,
            tag=scheme,
        )
        model = member["model"]
        w = weights_sc if scheme == "superclass" else None
        s_val = tier_scores(_probs(model, val.x), classes, scheme, weights=w)
        chosen = choose_thresholds(
            lv_val,
            s_val,
            min_sensitivity=min_sensitivity,
            urgent_sensitivity=urgent_sensitivity,
            min_positives=min_val_positives,
            few_positives_specificity=few_positives_specificity,
        )
        thr = {t: c["threshold"] for t, c in chosen.items()}
        s_test = tier_scores(_probs(model, test.x), classes, scheme, weights=w)
        m_test = tier_metrics(lv_test, s_test, thr, test.patient_ids, n_bootstrap=n_bootstrap, seed=seed)
        label = f"{arch} ({scheme}, {len(classes)} outputs)"
        rows.append({"model": label, "scheme": scheme, "data": "PTB-XL fold 10", "metrics": m_test})
        if ext is not None:
            for source, part in ext["sources"].items():
                s_ext = tier_scores(_probs(model, part["x"]), classes, scheme, weights=w) if len(part["x"]) else {}
                m_ext = tier_metrics(
                    part["level4"],
                    s_ext,
                    thr,
                    np.arange(len(part["level4"])),
                    n_bootstrap=n_bootstrap,
                    seed=seed,
                    unit="record",
                )
                rows.append({"model": label, "scheme": scheme, "data": f"{source} (external)", "metrics": m_ext})
        schemes[scheme] = {
            "classes": list(classes),
            "member": member,
            "thresholds": thr,
            "threshold_detail": chosen,
            "n_train": len(tr),
            "n_val": len(va),
        }
        say(
            f"[{scheme}] best epoch {member['best_epoch']}, fold-9 macro-AUROC {member['val_macro_auroc']:.4f}, "
            f"{_fmt_s(member['wall_s'])}; fold-9 thresholds { ({k: round(v, 4) for k, v in thr.items()}) }"
        )
    table = format_tier_table(rows)
    say(table)

    result: dict[str, Any] = {
        "data_dir": str(data_dir),
        "comparison": [{k: v for k, v in r.items()} for r in rows],
        "comparison_table": table,
        "schemes": {
            s: {k: v for k, v in d.items() if k != "member"}
            | {
                "best_epoch": d["member"]["best_epoch"],
                "epochs_run": d["member"]["epochs_run"],
                "val_macro_auroc": d["member"]["val_macro_auroc"],
                "wall_s": d["member"]["wall_s"],
                "history": d["member"]["history"],
            }
            for s, d in schemes.items()
        },
        "superclass_weights": weights_sc,
        "fine_classes": list(fine),
        "counts": {
            "train": _level_counts(lv_train),
            "fold9": _level_counts(lv_val),
            "fold10": _level_counts(lv_test),
            "no_tier": {"train": out_train, "fold9": out_val, "fold10": out_test},
        },
        "external": None
        if ext is None
        else {
            "sources": {
                s: {
                    "n": len(p["level4"]),
                    "levels": _level_counts(p["level4"]),
                    "n_no_tier": p["n_no_tier"],
                    "n_dropped_in_training": p["n_dropped_in_training"],
                }
                for s, p in ext["sources"].items()
            },
            "no_tier": ext["no_tier"],
            "unknown_codes": ext["unknown_codes"],
            "dropped_in_training": ext["dropped_in_training"],
        },
    }
    torch.save(
        {
            s: {
                "arch": arch,
                "width": width,
                "dropout": dropout,
                "classes": d["classes"],
                "state_dict": d["member"]["model"].state_dict(),
            }
            for s, d in schemes.items()
        },
        out_dir / "models.pt",
    )

    if ship is not None:
        shipped = schemes[ship]
        graph = ServingGraph([shipped["member"]["model"]]).eval()
        model_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = model_dir / "model.onnx"
        method = export_onnx(graph, onnx_path)
        check_parity(graph, onnx_path, real=val.x[:8])
        parity = parity_by_output(graph, onnx_path, real=val.x[:8])
        n_params = int(sum(p.numel() for p in shipped["member"]["model"].parameters()))
        manifest = _triage_manifest(
            scheme=ship,
            thresholds=shipped["thresholds"],
            sha256=sha256_file(onnx_path),
            name=name,
            version=version,
            description=(
                f"1D {'ResNet-SE' if arch == 'resnet_se' else 'CNN'} severity triage ({ship}: cumulative "
                f"ordinal outputs {', '.join(_TIERED[ship])}); tier = {DECODING_RULE}; research use only, "
                "NOT FOR CLINICAL USE."
            ),
            trained_on=(
                f"PTB-XL ({data_dir.name}): strat_fold 1-8 train ({len(train)} records), fold 9 validation "
                f"({len(val)} records); tiers from mapping.codes.SCP_SEVERITY; Wagner et al. 2020, CC BY 4.0"
            ),
            architecture={
                "module": "training.models.ResNetSE1d" if arch == "resnet_se" else "training.models.Cnn1d",
                "arch": arch,
                "width": width,
                "dropout": dropout,
                "members": 1,
                "parameters": n_params,
                "cam_stride_samples": 16,
            },
        )
        write_manifest(manifest, model_dir)
        serving = [evaluate_triage(model_dir, data_dir, fold=TEST_FOLDS[0], n_bootstrap=n_bootstrap, seed=seed)]
        if external is not None:
            serving.append(
                evaluate_triage(model_dir, Path(external), train_data=data_dir, n_bootstrap=n_bootstrap, seed=seed)
            )
        serving_table = format_tier_table([r for e in serving for r in e["rows"]])
        say("serving path (ONNX via the registry):\n" + serving_table)
        wall_s = round(time.monotonic() - started, 1)
        settings = {
            "command": command
            or f"train_triage(labels={labels}, ship={ship!r}, arch={arch!r}, width={width}, "
            f"epochs={epochs}, seed={seed}, threads={threads}"
            + (f", limit={limit}" if limit else "")
            + ")",
            "arch": arch,
            "width": width,
            "dropout": dropout,
            "epochs": epochs,
            "patience": patience,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "ema_decay": ema_decay,
            "loss": "binary cross-entropy, positive term weighted sqrt(neg/pos) per output clipped to [1, 10]",
            "augmentation": aug_config.describe() if augment_online else "none",
            "min_positives (fine)": min_positives,
            "min_sensitivity": min_sensitivity,
            "urgent_sensitivity": urgent_sensitivity,
            "min_val_positives": min_val_positives,
            "few_positives_specificity": few_positives_specificity,
            "seed": seed,
            "threads": threads,
            "torch": torch.__version__,
        }
        result["export"] = {
            "method": method,
            "parity": parity,
            "onnx_bytes": onnx_path.stat().st_size,
            "parameters": n_params,
        }
        result["serving"] = serving
        result["serving_table"] = serving_table
        result["settings"] = settings
        result["wall_s"] = wall_s
        card = model_dir / "MODEL_CARD.md"
        card.write_text(render_card(result, manifest, ship, arch))
        say(f"wrote {card}; total wall time {_fmt_s(wall_s)}")
        result["paths"] = {"model_dir": str(model_dir), "onnx": str(onnx_path), "card": str(card)}
    else:
        result["wall_s"] = round(time.monotonic() - started, 1)
    (out_dir / "result.json").write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return result


def _tier_rows() -> str:
    from collections import defaultdict

    by_level: dict[int, list[str]] = defaultdict(list)
    for code, (level, _rule) in SCP_SEVERITY.items():
        by_level[level].append(code)
    three = {0: "normal", 1: "abnormal_nonurgent", 2: "abnormal_nonurgent", 3: "urgent"}
    return "".join(f"| {SEVERITY4[k]} | {three[k]} | {', '.join(by_level[k])} |\n" for k in range(4))


def render_card(result: dict[str, Any], manifest: Manifest, ship: str, arch: str) -> str:
    """MODEL_CARD.md from what ``train_triage`` measured (tables as printed); ``result`` may be a re-read result.json."""
    s = result["settings"]
    c = result["counts"]
    shipped = result["schemes"][ship]
    ext = result.get("external")
    ext_lines = ""
    if ext:
        ext_lines = "".join(
            f"- {src}: {v['n']} records with a tier {v['levels']}; {v['n_no_tier']} without a tier (a code the "
            f"SNOMED table does not know), {v['n_dropped_in_training']} dropped because they are PTB-XL training data\n"
            for src, v in ext["sources"].items()
        ) + (f"- codes without a tier: {ext['unknown_codes']}\n" if ext["unknown_codes"] else "")
    missed = "".join(
        f"- At its fold-9 threshold the shipped model flagged {u['tp']} of the {u['tp'] + u['fn']} urgent ECGs of "
        f"{r['data']} (urgent AUROC {u['auroc']:.3f}): the urgent threshold is the weak part.\n"
        for e in result["serving"]
        for r in e["rows"]
        if (u := r["metrics"]["tasks"].get("urgent"))
        and "tp" in u
        and u["tp"] + u["fn"] > 0
        and u["tp"] < u["tp"] + u["fn"]
    )
    thr = "".join(
        f"| {k} | {v:.4f} | {shipped['threshold_detail'][k]['rule']} | "
        f"{shipped['threshold_detail'][k]['positives']} |\n"
        for k, v in manifest.thresholds.items()
    )
    return (
        f"""# {manifest.name} {manifest.version} (ECG severity triage) - NOT FOR CLINICAL USE

Research software. Not a medical device, not cleared for any clinical use; every result it
produces is labelled "not for clinical use" with its model name and version.

## What it does
Sorts a 12-lead ECG into a severity tier: 3-tier `{" / ".join(SEVERITY3)}` and, because
this model has three cumulative outputs, the 4-tier `{" / ".join(SEVERITY4)}`.
Outputs (sigmoid, cumulative ordinal): {", ".join(f"`{x.code}` ({x.display})" for x in manifest.classes)}.
Decoding (`inference.triage`, in `ModelOutput.extra["severity"]` / `["severity4"]`): {DECODING_RULE}.
Thresholds (manifest, chosen on PTB-XL fold 9):

| output | threshold | rule | fold-9 positives |
|---|---|---|---|
{thr}
## Tiers
Labels are the worst tier among a record's SCP-ECG statements (`mapping.codes.SCP_SEVERITY`,
every one of PTB-XL's 71 statements; clinical rule per statement in that module), counted at
any stated likelihood (PTB-XL's own aggregation). External SNOMED CT codes:
`mapping.codes.SNOMED_SEVERITY`.

| 4-tier | 3-tier | SCP-ECG statements |
|---|---|---|
{_tier_rows()}
## Data
- PTB-XL `{Path(result["data_dir"]).name}` folds 1-8 train, 9 selection/thresholds, 10 test (patient-level).
- Tier counts: train {c["train"]}; fold 9 {c["fold9"]}; fold 10 {c["fold10"]}; records without any statement: {c["no_tier"]}.
{ext_lines}
## Label granularity comparison (as printed by `ecgbridge train triage`)
Same architecture ({arch}, width {s["width"]}), seed, optimiser, augmentation and early stopping for
every row; only the labels differ. Tier scores from non-tiered models: fine = max probability over
statements of that tier or worse; superclass = max over superclasses of p x (training-fold share of
that superclass's records in the tier or worse). Thresholds chosen on fold 9 and applied unchanged: a task
with >= {s.get("min_val_positives", "N/A")} fold-9 positives takes the best F1 among thresholds with fold-9
sensitivity >= {s["min_sensitivity"]} (urgent: >= {s["urgent_sensitivity"]}); a task with fewer takes the
fold-9 negatives' quantile for specificity >= {s.get("few_positives_specificity", "N/A")}.
AUROC 95% CI: percentile bootstrap, {result["comparison"][0]["metrics"]["bootstrap"]["n"]} replicates,
patients (PTB-XL) or records (external).

{result["comparison_table"]}
## The shipped model through the serving path (ONNX, registry, manifest preprocessing)
{result["serving_table"]}
## Training
- {", ".join(f"{k}: {v}" for k, v in s.items())}
- Fine-grained outputs ({len(result["fine_classes"])}): {", ".join(result["fine_classes"])}
- Per scheme: """
        + "; ".join(
            f"{k} best epoch {v['best_epoch']} of {v['epochs_run']}, fold-9 macro-AUROC {v['val_macro_auroc']:.3f}, "
            f"{v['wall_s']:.0f} s"
            for k, v in result["schemes"].items()
        )
        + f"""
- Export: {result["export"]["method"]}; parity max |torch - ONNX| {", ".join(f"{k} {v:.1e}" for k, v in result["export"]["parity"].items())}; {result["export"]["onnx_bytes"]} bytes, {result["export"]["parameters"]} parameters.
- Total wall time {result["wall_s"]:.0f} s.

## Limitations
{missed}- Tiny data: the PTB-XL subset and the external sets hold few urgent ECGs (counts above); urgent
  AUROCs and sensitivities rest on a handful of records and their intervals are wide or n/a.
- The tier tables are one engineer's reading of the statements (rules in `mapping.codes`), not a
  clinical consensus; statements carry no rates or QTc values, so e.g. every long QT is urgent.
- PTB-XL MI statements are infarct patterns of undetermined age (major), not acute MI.
- Signals are z-scored per lead by preprocessing: amplitude-only criteria are invisible to the model.
"""
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecgbridge train triage", description=__doc__.split("\n")[0])
    parser.add_argument("--data", "--data-dir", dest="data_dir", type=Path, required=True)
    parser.add_argument("--out", "--out-dir", dest="out_dir", type=Path, required=True)
    parser.add_argument(
        "--labels",
        nargs="+",
        choices=LABEL_SCHEMES,
        default=list(LABEL_SCHEMES),
        help="label granularities to train and compare on the tier task",
    )
    parser.add_argument(
        "--ship",
        choices=("severity3", "severity4", "none"),
        default="severity4",
        help="which tiered model to export to --model-dir (none: compare only)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default OUT/triage")
    parser.add_argument("--external", type=Path, default=None, help="PhysioNet-challenge directory")
    parser.add_argument("--arch", choices=ARCHS, default="resnet_se")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--augment-strength", type=float, default=1.0)
    parser.add_argument(
        "--min-positives", type=int, default=2, help="fine labels: statements with >= N training records"
    )
    parser.add_argument(
        "--min-sensitivity", type=float, default=0.8, help="fold-9 sensitivity target (abnormal, major)"
    )
    parser.add_argument("--urgent-sensitivity", type=float, default=0.9, help="fold-9 sensitivity target (urgent)")
    parser.add_argument(
        "--min-val-positives",
        type=int,
        default=N_MIN_POSITIVES,
        help="a task with fewer fold-9 positives gets its threshold from the fold-9 negatives",
    )
    parser.add_argument(
        "--few-positives-specificity", type=float, default=0.9, help="fold-9 specificity target of that rule"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="first N records per split (smoke tests)")
    args = parser.parse_args(argv)
    command = "ecgbridge train triage " + " ".join(sys.argv[3:] if argv is None else list(argv))
    train_triage(
        args.data_dir,
        args.out_dir,
        labels=args.labels,
        ship=None if args.ship == "none" else args.ship,
        model_dir=args.model_dir,
        external=args.external,
        arch=args.arch,
        width=args.width,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        ema_decay=args.ema_decay,
        augment_online=not args.no_augment,
        augment_strength=args.augment_strength,
        min_positives=args.min_positives,
        min_sensitivity=args.min_sensitivity,
        urgent_sensitivity=args.urgent_sensitivity,
        min_val_positives=args.min_val_positives,
        few_positives_specificity=args.few_positives_specificity,
        seed=args.seed,
        threads=args.threads,
        version=args.version,
        n_bootstrap=args.n_bootstrap,
        limit=args.limit,
        command=command,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
