"""MODEL_CARD.md from measured numbers only.

Every figure in the card comes from ``metrics`` (returned by
``training.evaluate.evaluate_diagnosis`` on the exported ONNX model), ``external``
(``training.evaluate.evaluate_external``, optional) and ``training`` (what
``training.train`` counted, chose and measured while training). The evaluation
tables are ``format_report(...)`` verbatim, so the card says exactly what the
evaluator printed. Nothing here is typed in by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ecgbridge.training.evaluate import format_report

__all__ = ["render_model_card", "write_model_card"]


def _counts(label_counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in label_counts.items())


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(ci: Any) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _class_warnings(metrics: dict[str, Any], training: dict[str, Any]) -> str:
    """Per-class caveats derived from the measured counts (empty when none apply)."""
    val_counts = training["splits"]["validation"]["label_counts"]
    lines = []
    for code, c in metrics["classes"].items():
        n_val = val_counts.get(code)
        if n_val is not None and n_val < 10:
            lines.append(f"- {code}: its threshold and tiers were chosen from {n_val} validation positives.")
        if c["positives"] and c["tp"] == 0:
            lines.append(
                f"- {code}: at its threshold the model flagged none of the {c['positives']} test positives "
                f"(AUROC measures ranking only; the threshold is the weak part)."
            )
    return "".join(line + "\n" for line in lines)


def _loss_section(training: dict[str, Any]) -> str:
    rows = training.get("loss_comparison") or []
    if not rows:
        return ""
    classes = list(rows[0]["fold10"]["per_class"])
    head = (
        "| loss | chosen | best epoch | fold-9 macro-AUROC (selection) | fold-10 macro-AUROC (95% CI) | "
        + " | ".join(f"fold-10 {c}" for c in classes)
        + " |\n"
        + "|---" * (5 + len(classes))
        + "|\n"
    )
    body = "".join(
        f"| {r['loss']} | {'yes' if r['chosen'] else 'no'} | {r['best_epoch']} | {_f(r['fold9_macro_auroc'])} | "
        f"{_f(r['fold10']['macro_auroc'])} ({_ci(r['fold10']['macro_auroc_ci'])}) | "
        + " | ".join(_f(r["fold10"]["per_class"][c]) for c in classes)
        + " |\n"
        for r in rows
    )
    return (
        "## Focal loss vs BCE\n"
        f"Same architecture, seed ({rows[0]['seed']}), class weights, augmentation and schedule; single models "
        "before calibration (AUROC does not depend on it). The loss was chosen on fold 9 only; the fold-10 "
        "columns were measured after every choice was made, for this card.\n\n" + head + body + "\n"
    )


def _ensemble_section(training: dict[str, Any]) -> str:
    e = training.get("ensemble")
    if not e:
        return ""
    rows = "".join(
        f"| seed {m['seed']} | {_f(m['fold9_macro_auroc'])} | {_f(m['fold10_macro_auroc'])} |\n" for m in e["members"]
    )
    return (
        "## Ensemble\n"
        "Members' logits and CAMs are averaged inside the one ONNX graph.\n\n"
        "| model | fold-9 macro-AUROC | fold-10 macro-AUROC |\n|---|---|---|\n"
        + rows
        + f"| ensemble | {_f(e['ensemble_fold9_macro_auroc'])} | {_f(e['ensemble_fold10_macro_auroc'])} |\n\n"
    )


def _comparison_section(training: dict[str, Any]) -> str:
    c = training.get("comparison")
    if not c:
        return ""
    sources = sorted({src for r in c["rows"] for src in r.get("external", {})})
    head = (
        "| model | fold-9 macro-AUROC (95% CI) | fold-10 macro-AUROC (95% CI) | fold-10 ECE (mean) |"
        + "".join(f" external {src} |" for src in sources)
        + "\n|---|---|---|---|"
        + "---|" * len(sources)
        + "\n"
    )
    rows = "".join(
        f"| {r['model']} ({r['label']}) | {_f(r['fold9']['macro_auroc'])} ({_ci(r['fold9']['macro_auroc_ci'])}) | "
        f"{_f(r['fold10']['macro_auroc'])} ({_ci(r['fold10']['macro_auroc_ci'])}) | {_f(r['fold10']['ece'])} |"
        + "".join(f" {_f(r.get('external', {}).get(src))} |" for src in sources)
        + "\n"
        for r in c["rows"]
    )
    return (
        "## Against the previous model\n"
        f"Both measured here by the same evaluator (`{c['model_dir']}` for the previous one). Fold 9 decided whether this "
        "model replaces the previous one; fold 10 is reported, not used. Both models chose their checkpoint on fold 9, "
        "so their fold-9 figures are optimistic.\n\n" + head + rows + "\n"
    )


def _calibration_section(metrics: dict[str, Any], training: dict[str, Any], external: dict[str, Any] | None) -> str:
    cal = training.get("calibration")
    if not cal:
        return ""
    cv_rows = "".join(f"| {k} | {_f(v, 4)} |\n" for k, v in cal["cv_nll"].items())
    t_rows = "".join(f"| {c} | {_f(cal['temperature'][c])} | {_f(cal['offset'][c])} |\n" for c in cal["temperature"])

    def ece_row(label: str, m: dict[str, Any]) -> str:
        e = m.get("calibration") or {}
        before = e.get("before")
        after = e.get("after")
        return (
            f"| {label} | {m.get('n', '')} | {_f(before['mean']) if before else 'n/a'} | {_f(after['mean']) if after else 'n/a'} | "
            f"{_f(before['pooled']) if before else 'n/a'} | {_f(after['pooled']) if after else 'n/a'} |\n"
        )

    fold9 = {"n": training["splits"]["validation"]["n_records"], "calibration": cal["fold9_ece"]}
    rows = ece_row("PTB-XL fold 9 (fitted here)", fold9) + ece_row("PTB-XL fold 10 (test)", metrics)
    for source, sm in (external or {}).get("sources", {}).items():
        rows += ece_row(f"external: {source}", sm)
    return (
        "## Calibration\n"
        f"{cal['method']}, fitted on {cal['fitted_on']}; inside the ONNX graph (`probabilities`), the uncalibrated "
        f"logits are exported as `{cal['uncalibrated_output']}`. The variant was chosen by {cal['cv']}:\n\n"
        "| variant | CV NLL |\n|---|---|\n"
        + cv_rows
        + f"\nChosen: **{cal['variant']}**, refitted on all of fold 9 (fold-9 NLL {_f(cal['nll_before'], 4)} -> "
        f"{_f(cal['nll_after'], 4)}):\n\n| class | T | offset |\n|---|---|---|\n"
        + t_rows
        + "\nExpected calibration error (10 equal-width bins per class; mean over the five classes and pooled over "
        "all record-class pairs), before = sigmoid(logits), after = `probabilities`:\n\n"
        "| data | records | ECE mean before | ECE mean after | ECE pooled before | ECE pooled after |\n"
        "|---|---|---|---|---|---|\n" + rows + "\n"
    )


def _thresholds_section(training: dict[str, Any]) -> str:
    thr = training["thresholds"]
    detail = thr.get("detail", {})
    rows = "".join(
        f"| {code} | {value:.4f} | {detail.get(code, {}).get('positives', '')} |\n"
        for code, value in thr["values"].items()
    )
    return (
        "## Decision thresholds\n"
        f"Chosen per class {thr['method']}:\n\n| class | threshold | fold-9 positives |\n|---|---|---|\n" + rows + "\n"
    )


def _tiers_section(training: dict[str, Any]) -> str:
    tiers = training.get("tiers")
    if not tiers:
        return ""
    rows = "".join(
        f"| {c} | {d['moderate']:.4f} | {d['high']:.4f} | {d['positives']} | {d['caught_moderate_or_high']}/{d['positives']} | "
        f"{d['positives_high']}/{d['positives']} | {d['negatives_high']}/{d['negatives']} |\n"
        for c, d in tiers["detail"].items()
    )
    return (
        "## Risk tiers\n"
        "Each finding carries a tier: low (p < moderate), moderate (moderate <= p < high), high (p >= high), on "
        f"calibrated probabilities. Rule: {tiers['rule']}. Cut-offs (in `manifest.json` `tiers`) and what they do on "
        "fold 9:\n\n"
        "| class | moderate | high | fold-9 positives | fold-9 positives in Moderate+High | fold-9 positives in High | "
        "fold-9 negatives in High |\n|---|---|---|---|---|---|---|\n"
        + rows
        + "\nWith fewer than 20 fold-9 positives, '>= 95 %' means every fold-9 positive; the fold-10 tier counts are in "
        "the evaluation below.\n\n"
    )


def _external_section(external: dict[str, Any] | None) -> str:
    if not external:
        return "## External evaluation\nNot run for this model (no `--external` directory given).\n\n"
    d = external["data"]
    overlap = d.get("ptbxl_overlap") or {}
    dropped = d.get("dropped_in_training_data") or []
    overlap_text = ""
    if overlap:
        overlap_text = (
            f" The challenge's PTB-XL records ({', '.join(sorted(overlap))}) are PTB-XL recordings (HRnnnnn = ecg_id "
            f"nnnnn): {len(dropped)} of them ({', '.join(f'{n}, fold {overlap[n]}' for n in dropped) or 'none'}) "
            f"are in the training data checked ({d.get('ptbxl_records_checked_in')}) and were dropped; the others are not in "
            "that subset but are the same hospital, devices and era as the training data and may share patients with "
            "it (the challenge files carry no patient id), so the PTB-XL source is not an independent external test."
        )
    return (
        "## External evaluation\n"
        "PhysioNet/CinC Challenge 2021 records (Reyna et al., CC BY 4.0), 500 Hz, read by lead name and passed through "
        "the same serving preprocessing. Sources by record-name prefix: E = Georgia (G12EC), HR = PTB-XL, JS = "
        "Chapman-Shaoxing/Ningbo (the challenge numbers both Chinese databases JS; reported as one source). Labels: "
        "the header's `#Dx` SNOMED CT codes mapped to the PTB-XL superclasses by "
        "`training.datasets.challenge.SNOMED_TO_SUPERCLASS` (NORM = a sinus rhythm and only NORM-compatible codes). "
        "These are tiny samples (tens of records per source, several classes without any positive): read the "
        "counts and the intervals before the point estimates; the bootstrap resamples records (no patient ids). "
        "No challenge record was used for training or any choice." + overlap_text + "\n\n"
        "```\n" + format_report(external) + "\n```\n\n"
    )


def render_model_card(metrics: dict[str, Any], training: dict[str, Any], external: dict[str, Any] | None = None) -> str:
    m = metrics["model"]
    splits = training["splits"]
    settings = training["settings"]
    arch = training["architecture"]
    export = training["export"]
    val = training["validation"]
    split_rows = "\n".join(
        f"| {name} | {s['folds']} | {s['n_records']} | {s['n_patients']} | {s['n_unlabelled_excluded']} | "
        f"{_counts(s['label_counts'])} |"
        for name, s in splits.items()
    )
    settings_rows = "\n".join(f"- {key}: {value}" for key, value in settings.items())
    parity = export.get("parity") or {"probabilities": export["parity_max_abs_diff"]}
    parity_text = ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
    members = arch.get("members", 1)
    params = f"{arch['parameters']:,} trainable parameters" + (
        f" per member, {arch['parameters_total']:,} in the {members}-member ensemble" if members > 1 else ""
    )
    return f"""# {m["name"]} {m["version"]}: research model, NOT FOR CLINICAL USE

This is a research model. It is **not for clinical use**: its outputs are not a
diagnosis and must not inform patient care. Every result it produces carries the
"not for clinical use" label.

## What it does
Multi-label classification of a 10 s, 12-lead ECG into the five PTB-XL diagnostic
superclasses (NORM, MI, STTC, CD, HYP). One ONNX call returns `probabilities` (N, 5,
calibrated sigmoid probabilities), `cams` (N, 5, T') class activation maps and
`logits` (N, 5, uncalibrated). A class is reported present when its probability is
at or above its threshold in `manifest.json`; each finding also gets a risk tier
(low / moderate / high) from the manifest's `tiers`.

## Data
{training["data_description"]}

Labels: each record's `scp_codes` that are diagnostic statements (`diagnostic == 1` in
`scp_statements.csv`) map to their `diagnostic_class`; a record can have several
superclasses. Records with no diagnostic superclass are excluded and counted below.

| split | strat_fold | records | patients | excluded (no superclass) | positives per class |
|---|---|---|---|---|---|
{split_rows}

## Split
PTB-XL's own `strat_fold` column: folds 1-8 train, fold 9 validation (checkpoint,
loss, calibration, thresholds and tiers), fold 10 test (the figures below; not used
for any choice). PTB-XL's folds are patient-level; training checks that no patient
is in two splits (patients shared between splits: {training["patient_overlap"]}).

## Preprocessing
`inference.preprocess.DEFAULT_SPEC`, the same pipeline serving applies
(`manifest.json` `preprocessing`): {training["preprocessing"]}.
Input: leads {", ".join(training["leads"])}, 100 Hz, 1000 samples, per-lead z-score.

## Architecture
{arch["description"]}; {params}.

## Training
{settings_rows}

Fold-9 macro-AUROC of the shipped model (before calibration): {val["best_macro_auroc"]:.3f}
({val["n_records"]} records); first member's best epoch {val["best_epoch"]} of {val["epochs_run"]} run.
Wall time of the whole run (training, export, evaluation): {training["wall_s"]:.0f} s.

{_comparison_section(training)}{_loss_section(training)}{_ensemble_section(training)}{_calibration_section(metrics, training, external)}{_thresholds_section(training)}{_tiers_section(training)}## Evaluation on fold 10 (test)
Measured by `training.evaluate` on the exported ONNX file through `inference.models`
(the serving path), as it printed:

```
{format_report(metrics)}
```

{_external_section(external)}## Export
{export["method"]}; ONNX/torch parity max |diff| {parity_text} (tolerance 1e-4); file size
{export["onnx_bytes"]:,} bytes; sha256 `{m["sha256"]}`.

## Limitations
- Small data: {splits["train"]["n_records"]} training and {splits["validation"]["n_records"]} validation
  records, {metrics["n"]} test records. Confidence intervals are wide, classes with
  few positives (see the counts) are estimated poorly, and the loss, calibration,
  thresholds and tiers chosen on a validation fold this small are unstable.
{_class_warnings(metrics, training)}- The training configuration (architecture, width, augmentation strength, learning rate,
  pretraining, ensemble size) was itself chosen by fold-9 comparisons among several
  runs, so the fold-9 figures here are optimistic twice over (epoch and configuration);
  fold 10 was used for none of these choices.
- The signals were band-passed and z-scored per lead by their publisher, so
  amplitudes in mV are lost: voltage criteria (e.g. for hypertrophy) cannot be learned.
- External evaluation covers tens of records per source, with no MI positives at all;
  it can reveal a gross failure, not measure performance. Performance on other carts,
  populations and sampling rates remains largely unknown.
- Calibration was fitted on one PTB-XL fold; probabilities are calibrated to PTB-XL's
  case mix, not to another hospital's prevalence.
- The CAMs show where in time the evidence for a class accumulated (160 ms steps,
  all leads mixed); they are not a validated explanation.
- Research model, NOT FOR CLINICAL USE.

## Attribution
PTB-XL, Wagner et al., Scientific Data 2020, CC BY 4.0. PhysioNet/CinC Challenge 2021,
Reyna et al., CC BY 4.0 (external evaluation only).
"""


def write_model_card(
    path: Path, metrics: dict[str, Any], training: dict[str, Any], external: dict[str, Any] | None = None
) -> Path:
    path = Path(path)
    path.write_text(render_model_card(metrics, training, external))
    return path
