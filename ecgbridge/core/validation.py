"""How the models do on this site's own patients: their stored results against the cardiologists' over-reads.

For every ECG received in the window that has a current label (:func:`ecgbridge.core.labels.labelled_ecgs`)
the probabilities the live models gave it (the message's latest result) and, when the route
runs shadow models, theirs (the ``shadow`` artifact) are paired with the over-read's classes.
Per model version and class: AUROC with a 95 % percentile bootstrap interval, sensitivity,
specificity and PPV at the threshold the model shipped with, expected calibration error and
the reliability bins, and the observed positive rate in each of the model's risk tiers;
beside them the model card's own fold-10 figures. Live and shadow are compared on the ECGs
both scored, with a paired bootstrap of the AUROC difference.

Rules, so the numbers can be reproduced: a class the read marks *uncertain* ("possible ...")
and a read that names no diagnosis are left out for that class; a read with unmatched
statements is used for the classes it does name. The bootstrap resamples ECGs (the store
keeps no patient identifier in its tables), 1000 replicates, seed 0. The metrics are the
functions ``ecgbridge evaluate`` uses (:mod:`ecgbridge.inference.metrics`), so the same
probabilities give the same AUROC.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.core.labels import EcgLabel, labelled_ecgs
from ecgbridge.core.settings import Settings
from ecgbridge.core.store import MessageStore, ResultRow
from ecgbridge.inference.metrics import (
    auroc,
    bootstrap_auroc,
    ece,
    paired_auroc_difference,
    reliability,
    threshold_metrics,
)

__all__ = ["ModelScores", "validation_report", "format_report", "card_figures", "collect_scores"]

#: The classes an over-read labels (the diagnosis models' PTB-XL superclasses).
LABEL_CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
SHADOW_ARTIFACT = "shadow"


@dataclass
class ModelScores:
    """One model version's probabilities for each class, on the labelled ECGs it scored."""

    model: str
    version: str
    role: str  # live | shadow
    #: class -> [(ecg id, label 0/1, probability, threshold, tier)]
    cases: dict[str, list[tuple[str, int, float, float, str | None]]] = field(default_factory=lambda: defaultdict(list))

    @property
    def key(self) -> str:
        return f"{self.model}@{self.version}"


def _outputs(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [o for o in (result or {}).get("outputs") or [] if o.get("findings")]


def collect_scores(
    store: MessageStore, labels: list[EcgLabel], *, route: str | None = None
) -> tuple[dict[tuple[str, str], ModelScores], int]:
    """Scores per (model@version, live|shadow) on the labelled ECGs (of ``route``); and how many ECGs were used."""
    scores: dict[tuple[str, str], ModelScores] = {}
    used = 0
    for label in labels:
        if label.labels is None:
            continue
        row = store.get(label.ecg_message_id)
        if row is None or (route is not None and row.route != route):
            continue
        stored: ResultRow | None = store.get_result(row.id)
        shadow_raw = store.artifact(row.id, SHADOW_ARTIFACT)
        shadow = json.loads(shadow_raw)["result"] if shadow_raw else None
        took = False
        for role, result in (("live", stored.result if stored else None), ("shadow", shadow)):
            for output in _outputs(result):
                entry = scores.setdefault(
                    (f"{output['model']}@{output['version']}", role),
                    ModelScores(str(output["model"]), str(output["version"]), role),
                )
                for f in output["findings"]:
                    code = f.get("code")
                    if code not in label.labels or code in label.uncertain:
                        continue
                    entry.cases[code].append(
                        (row.id, int(label.labels[code]), float(f["probability"]), float(f["threshold"]), f.get("tier"))
                    )
                    took = True
        used += took
    return scores, used


def _class_metrics(cases: list[tuple[str, int, float, float, str | None]], n_bootstrap: int) -> dict[str, Any]:
    ids = np.array([c[0] for c in cases])
    y = np.array([c[1] for c in cases], dtype=np.int64)
    p = np.array([c[2] for c in cases], dtype=np.float64)
    threshold = float(np.median([c[3] for c in cases]))
    value = auroc(y, p)
    ci, valid = None, 0
    if not np.isnan(value):  # the replicates of a class with one label only are all undefined
        boot = bootstrap_auroc(y.reshape(-1, 1), p.reshape(-1, 1), ids, n_bootstrap=n_bootstrap, seed=0)
        ci, valid = boot["class_ci"][0], boot["class_valid"][0]
    tiers: dict[str, dict[str, Any]] = {}
    for tier in sorted({c[4] for c in cases if c[4]}):
        chosen = [c[1] for c in cases if c[4] == tier]
        tiers[tier] = {"n": len(chosen), "positive": int(sum(chosen)), "positive_rate": float(np.mean(chosen))}
    calibration = ece(y.reshape(-1, 1), p.reshape(-1, 1))
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "auroc": None if np.isnan(value) else value,
        "auroc_ci": list(ci) if ci is not None else None,
        "bootstrap_valid": valid,
        "threshold": threshold,
        **threshold_metrics(y, p, threshold),
        "ece": calibration["per_class"][0],
        "reliability": reliability(y, p),
        "tiers": tiers,
    }


_CARD_ROW = re.compile(
    r"^(?P<code>[A-Z]+)\s+(?P<pos>\d+)\s+(?P<neg>\d+)\s+(?P<auroc>[\d.]+|n/a)\s+\S+\s+[\d.]+\s+"
    r"(?P<sens>[\d.]+|n/a)\s+\(\d+/\d+\)\s+(?P<spec>[\d.]+|n/a)\s+\(\d+/\d+\)\s+(?P<ppv>[\d.]+|n/a)"
)


def card_figures(card: str) -> dict[str, dict[str, float | None]]:
    """The model card's first evaluation table (its fold-10 figures): class -> AUROC, sensitivity, specificity, PPV."""
    figures: dict[str, dict[str, float | None]] = {}
    for line in card.splitlines():
        m = _CARD_ROW.match(line.strip())
        if m is None:
            if figures and not line.strip():
                break  # the first table only
            continue
        figures[m["code"]] = {k: (None if m[k] == "n/a" else float(m[k])) for k in ("auroc", "sens", "spec", "ppv")}
    return figures


def _model_dirs(settings: Settings) -> list[Path]:
    """The shipped model directories and those the configuration names (read here, without a model runtime)."""
    import importlib.util

    spec = importlib.util.find_spec("ecgbridge.inference")
    shipped = Path(next(iter(spec.submodule_search_locations or []))) / "shipped" if spec else None
    found = sorted(shipped.iterdir()) if shipped is not None and shipped.is_dir() else []
    return [*found, *(Path(m.path) for m in settings.models if m.path is not None)]


def _card_of(settings: Settings, model: str, version: str) -> dict[str, dict[str, float | None]]:
    """The fold-10 figures from the card of the model directory that holds ``model`` at ``version``."""
    for directory in _model_dirs(settings):
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            if manifest.get("name") == model and manifest.get("version") == version:
                return card_figures((directory / str(manifest.get("card") or "MODEL_CARD.md")).read_text())
        except (OSError, ValueError):
            continue
    return {}


def _coverage(
    store: MessageStore, labels: list[EcgLabel], since: datetime | None, until: datetime | None, route: str | None
) -> dict[str, int]:
    """ECGs analysed in the window, and how many of them have no over-read yet."""
    from sqlalchemy import func, select

    from ecgbridge.core.store import MessageRow
    from ecgbridge.core.store import ResultRow as Result

    with store.session() as s:
        q = select(func.count()).select_from(Result).join(MessageRow, MessageRow.id == Result.message_id)
        if since is not None:
            q = q.where(MessageRow.received_at >= since)
        if until is not None:
            q = q.where(MessageRow.received_at < until)
        if route is not None:
            q = q.where(MessageRow.route == route)
        analysed = int(s.scalar(q) or 0)
    labelled = (
        len(labels)
        if route is None
        else sum(1 for lb in labels if (row := store.get(lb.ecg_message_id)) is not None and row.route == route)
    )
    return {"analysed": analysed, "labelled": labelled, "without_overread": max(0, analysed - labelled)}


def validation_report(
    store: MessageStore,
    settings: Settings,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    route: str | None = None,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Everything ``ecgbridge validate`` prints (as JSON-ready values)."""
    labels = labelled_ecgs(store, since=since, until=until)
    scores, used = collect_scores(store, labels, route=route)
    models = []
    for (_key, role), entry in sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        card = _card_of(settings, entry.model, entry.version)
        models.append(
            {
                "model": entry.model,
                "version": entry.version,
                "role": role,
                "classes": {
                    code: {**_class_metrics(cases, n_bootstrap), "card": card.get(code)}
                    for code, cases in sorted(
                        entry.cases.items(), key=lambda kv: LABEL_CLASSES.index(kv[0]) if kv[0] in LABEL_CLASSES else 99
                    )
                },
            }
        )
    report: dict[str, Any] = _finite(
        {
            "window": {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None},
            "route": route,
            "coverage": {**_coverage(store, labels, since, until, route), "used": used},
            "models": models,
            "comparisons": _comparisons(scores, n_bootstrap),
        }
    )
    return report


def _finite(value: Any) -> Any:
    """NaN (a metric with no denominator: no positives, no calls) as None, so the report is valid JSON."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _comparisons(scores: dict[tuple[str, str], ModelScores], n_bootstrap: int) -> list[dict[str, Any]]:
    """Each shadow model against each live model of the same classes, on the ECGs both scored (paired)."""
    out = []
    for (live_key, live_role), live in scores.items():
        if live_role != "live":
            continue
        for (shadow_key, shadow_role), shadow in scores.items():
            if shadow_role != "shadow":
                continue
            classes = {}
            for code in sorted(set(live.cases) & set(shadow.cases)):
                a = {c[0]: c for c in live.cases[code]}
                b = {c[0]: c for c in shadow.cases[code]}
                both = sorted(set(a) & set(b))
                if len(both) < 2:
                    continue
                y = np.array([a[i][1] for i in both])
                result = paired_auroc_difference(
                    y,
                    np.array([b[i][2] for i in both]),
                    np.array([a[i][2] for i in both]),
                    np.array(both),
                    n_bootstrap=n_bootstrap,
                )
                if np.isnan(result["difference"]):
                    continue  # one label only among these ECGs: no AUROC to compare
                classes[code] = {"n": len(both), "shadow_minus_live": result["difference"], "ci": result["ci"]}
            if classes:
                out.append({"live": live_key, "shadow": shadow_key, "classes": classes})
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one table per model version, live first, then the comparisons."""
    cov = report["coverage"]
    window = report["window"]
    lines = [
        f"window: received {window['since'] or 'any time'} .. {window['until'] or 'now'}"
        + (f", route {report['route']}" if report["route"] else ""),
        f"ECGs analysed: {cov['analysed']}; with an over-read: {cov['labelled']} (used: {cov['used']}); "
        f"still without one: {cov['without_overread']}",
        "bootstrap: 95 % percentile interval over ECGs, seed 0; card: the model card's fold-10 figures",
    ]
    for m in report["models"]:
        lines += ["", f"{m['role']} model {m['model']} {m['version']}"]
        lines.append(
            "class   n   pos  AUROC  95% CI        | card  |  thr   sens  spec   PPV  | card sens spec   PPV |  ECE"
        )
        for code, c in m["classes"].items():
            card = c.get("card") or {}
            ci = c["auroc_ci"]
            lines.append(
                f"{code:<6}{c['n']:>4}{c['positives']:>5}  {_f(c['auroc'])}  "
                f"{(_f(ci[0]) + '-' + _f(ci[1])) if ci else 'n/a':<12}| {_f(card.get('auroc'))} | "
                f"{_f(c['threshold'])} {_f(c['sensitivity'], 2):>5} {_f(c['specificity'], 2):>5} {_f(c['ppv'], 2):>5} | "
                f"     {_f(card.get('sens'), 2):>4} {_f(card.get('spec'), 2):>4} {_f(card.get('ppv'), 2):>5} | {_f(c['ece'])}"
            )
        tier_lines = [
            f"  {code}: "
            + ", ".join(f"{t} {v['positive']}/{v['n']} ({v['positive_rate']:.0%})" for t, v in c["tiers"].items())
            for code, c in m["classes"].items()
            if c["tiers"]
        ]
        if tier_lines:
            lines += ["over-read positives per risk tier:", *tier_lines]
    for comp in report["comparisons"]:
        lines += ["", f"shadow {comp['shadow']} vs live {comp['live']} (same ECGs, paired bootstrap)"]
        for code, c in comp["classes"].items():
            ci = c["ci"]
            lines.append(
                f"  {code:<6} n {c['n']:>4}  AUROC difference (shadow - live) {c['shadow_minus_live']:+.3f}"
                + (f"  95% CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "")
            )
    if not report["models"]:
        lines += ["", "no labelled ECG in the window: over-reads are taken from the sources named under overreads"]
    return "\n".join(lines)
