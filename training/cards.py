"""MODEL_CARD.md from measured numbers only.

Every figure in the card comes from one of two dicts: ``metrics`` (returned by
``training.evaluate.evaluate_diagnosis`` on the exported ONNX model) and
``training`` (what ``training.train`` counted and chose while training). The
metrics table is ``format_report(metrics)`` verbatim, so the card says exactly
what the evaluator printed. Nothing here is typed in by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluate import format_report

__all__ = ["render_model_card", "write_model_card"]


def _counts(label_counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in label_counts.items())


def _class_warnings(metrics: dict[str, Any], training: dict[str, Any]) -> str:
    """Per-class caveats derived from the measured counts (empty when none apply)."""
    val_counts = training["splits"]["validation"]["label_counts"]
    lines = []
    for code, c in metrics["classes"].items():
        n_val = val_counts.get(code)
        if n_val is not None and n_val < 10:
            lines.append(f"- {code}: its threshold was chosen from {n_val} validation positives.")
        if c["positives"] and c["tp"] == 0:
            lines.append(
                f"- {code}: at its threshold the model flagged none of the {c['positives']} test positives "
                f"(AUROC measures ranking only; the threshold is the weak part)."
            )
    return "".join(line + "\n" for line in lines)


def render_model_card(metrics: dict[str, Any], training: dict[str, Any]) -> str:
    m = metrics["model"]
    splits = training["splits"]
    settings = training["settings"]
    arch = training["architecture"]
    export = training["export"]
    val = training["validation"]
    thr = training["thresholds"]
    split_rows = "\n".join(
        f"| {name} | {s['folds']} | {s['n_records']} | {s['n_patients']} | {s['n_unlabelled_excluded']} | "
        f"{_counts(s['label_counts'])} |"
        for name, s in splits.items()
    )
    threshold_rows = "\n".join(f"| {code} | {value:.4f} |" for code, value in thr["values"].items())
    settings_rows = "\n".join(f"- {key}: {value}" for key, value in settings.items())
    return f"""# {m['name']} {m['version']}: baseline research model, NOT FOR CLINICAL USE

This is a baseline research model. It is **not for clinical use**: its outputs are
not a diagnosis and must not inform patient care. Every result it produces carries
the "not for clinical use" label.

## What it does
Multi-label classification of a 10 s, 12-lead ECG into the five PTB-XL diagnostic
superclasses (NORM, MI, STTC, CD, HYP). Output `probabilities` (N, 5) are sigmoid
probabilities computed inside the ONNX graph; a class is reported present when its
probability is at or above its threshold in `manifest.json`.

## Data
{training['data_description']}

Labels: each record's `scp_codes` that are diagnostic statements (`diagnostic == 1` in
`scp_statements.csv`) map to their `diagnostic_class`; a record can have several
superclasses. Records with no diagnostic superclass are excluded and counted below.

| split | strat_fold | records | patients | excluded (no superclass) | positives per class |
|---|---|---|---|---|---|
{split_rows}

## Split
PTB-XL's own `strat_fold` column: folds 1-8 train, fold 9 validation (checkpoint
selection and thresholds), fold 10 test (the figures below; not used for any choice). PTB-XL's
folds are patient-level; training checks that no patient is in two splits
(patients shared between splits: {training['patient_overlap']}).

## Preprocessing
`inference.preprocess.DEFAULT_SPEC`, the same pipeline serving applies
(`manifest.json` `preprocessing`): {training['preprocessing']}.
Input: leads {', '.join(training['leads'])}, 100 Hz, 1000 samples, per-lead z-score.

## Architecture
{arch['description']}; {arch['parameters']:,} trainable parameters.

## Training
{settings_rows}

Best checkpoint: epoch {val['best_epoch']} of {val['epochs_run']} run, fold-9 macro-AUROC
{val['best_macro_auroc']:.3f} ({val['n_records']} records).

## Thresholds
Chosen per class on fold 9 by {thr['method']}:

| class | threshold |
|---|---|
{threshold_rows}

## Evaluation on fold 10 (test)
Measured by `training.evaluate` on the exported ONNX file through `inference.models`
(the serving path), as it printed:

```
{format_report(metrics)}
```

## Export
{export['method']}; ONNX/torch parity max |diff| of probabilities
{export['parity_max_abs_diff']:.2e} (tolerance 1e-4); file size {export['onnx_bytes']:,} bytes;
sha256 `{m['sha256']}`.

## Limitations
- Small data: {splits['train']['n_records']} training and {splits['validation']['n_records']} validation
  records, {metrics['n']} test records. Confidence intervals are wide, classes with
  few positives (see the counts) are estimated poorly, and thresholds chosen on a
  validation fold this small are unstable.
{_class_warnings(metrics, training)}- The signals were band-passed and z-scored per lead by their publisher, so
  amplitudes in mV are lost: voltage criteria (e.g. for hypertrophy) cannot be learned.
- No external validation yet: only PTB-XL (one source, one country, one era of devices).
  Performance on other carts, populations and sampling rates is unknown.
- Not calibrated; probabilities are model scores, not risks.
- Baseline research model, NOT FOR CLINICAL USE.

## Attribution
PTB-XL, Wagner et al., Scientific Data 2020, CC BY 4.0.
"""


def write_model_card(path: Path, metrics: dict[str, Any], training: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(render_model_card(metrics, training))
    return path
