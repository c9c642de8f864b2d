"""Serving the LVEF four-tier model: ECG measurements + diagnosis probabilities + EHR -> tier probabilities.

A model directory (the shipped one is ``inference/shipped/lvef/``) holds ``manifest.json``,
two variants, each an ONNX graph (LightGBM multiclass trees converted with onnxmltools,
output a plain ``(N, 4)`` probability tensor) and the LightGBM booster text file it was
converted from, and ``MODEL_CARD.md``:

* ``ecg+ehr``: ECG features and EHR variables; used when the EHR context has data;
* ``ecg-only``: ECG features only; used when ``ehr is None`` or ``not ehr.has_data``.

Inputs are built by :func:`inference.lvef_features.lvef_feature_row` (the function training
uses). Probabilities come from ONNX Runtime; per-prediction attributions are LightGBM's
tree SHAP values (``Booster.predict(..., pred_contrib=True)`` on the booster text file) for
the predicted tier, in raw-score (log-odds) units: a positive contribution pushes toward
that tier. Decision rule: the predicted tier is the most probable one (argmax); every
finding's ``threshold`` is 0.0 and only the predicted tier is ``present``.

The shipped model is trained on SYNTHETIC labels (``training.lvef_synthetic``): every result
says so (``extra["synthetic"]``, ``extra["notice"]``) and it means nothing clinically.

    model = LvefModel.load()                       # cached per process
    out = model.predict(measurements.features(), diagnosis_output, ehr_context)
    out.extra["tier"], out.extra["attributions"][:3]
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from ecgbridge.errors import ModelError
from ecgbridge.inference.lvef_features import (
    ECG_FEATURE_NAMES,
    FEATURE_SPECS,
    FEATURES_SCHEMA_VERSION,
    LVEF_TIERS,
    FeatureSpec,
    diagnosis_probabilities,
    lvef_feature_row,
    missing_context_notes,
)
from ecgbridge.inference.models import SHIPPED_DIR, sha256_file
from ecgbridge.mapping.ecg import Finding, ModelOutput
from ecgbridge.mapping.ehr_context import EhrContext

__all__ = [
    "LVEF_DIR",
    "VARIANTS",
    "LvefVariantSpec",
    "LvefManifest",
    "LvefModel",
    "choose_variant",
    "load_lvef_manifest",
]

LVEF_DIR = SHIPPED_DIR / "lvef"
VARIANTS: tuple[str, ...] = ("ecg+ehr", "ecg-only")
Variant = Literal["ecg+ehr", "ecg-only"]
_TOP_K = 8
_SPEC_BY_NAME: dict[str, FeatureSpec] = {s.name: s for s in FEATURE_SPECS}


class LvefVariantSpec(BaseModel):
    onnx: str
    booster: str
    features: list[str]
    input_name: str = "features"
    output_name: str = "probabilities"
    num_iterations: int = 0
    sha256: dict[str, str] = Field(default_factory=dict)  # file name -> sha256


class LvefTierSpec(BaseModel):
    code: str
    display: str


class LvefManifest(BaseModel):
    """What serving needs to know about an LVEF model directory (written by ``training.lvef_model``)."""

    name: str
    version: str
    task: Literal["lvef"] = "lvef"
    synthetic: bool
    notice: str
    features_schema: str
    tiers: list[LvefTierSpec]
    variants: dict[str, LvefVariantSpec]
    decision_rule: str = "argmax"
    diagnosis_model: str | None = None  # "<name> <version>" whose probabilities were features
    versions: dict[str, str] = Field(default_factory=dict)
    card: str = "MODEL_CARD.md"
    description: str = ""
    trained_on: str = ""
    created: str = ""
    features: list[dict[str, str]] = Field(default_factory=list)  # informational: name, kind, unit, display


def load_lvef_manifest(directory: Path) -> LvefManifest:
    path = directory / "manifest.json"
    try:
        manifest = LvefManifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ModelError(f"LVEF model: no manifest.json in {directory}") from exc
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"LVEF model: invalid manifest {path}: {exc}") from exc
    if set(manifest.variants) != set(VARIANTS):
        raise ModelError(
            f"LVEF model {path}: variants must be {list(VARIANTS)}, the manifest has {sorted(manifest.variants)}"
        )
    codes = [t.code for t in manifest.tiers]
    if codes != [t.code for t in LVEF_TIERS]:
        raise ModelError(f"LVEF model {path}: tiers {codes} do not match this code's {[t.code for t in LVEF_TIERS]}")
    if manifest.features_schema != FEATURES_SCHEMA_VERSION:
        raise ModelError(
            f"LVEF model {path}: built for feature schema {manifest.features_schema}, "
            f"inference.lvef_features is schema {FEATURES_SCHEMA_VERSION}: retrain the model"
        )
    for vname, v in manifest.variants.items():
        unknown = [n for n in v.features if n not in _SPEC_BY_NAME]
        if unknown:
            raise ModelError(f"LVEF model {path}: variant {vname} names features this code does not build: {unknown}")
        if vname == "ecg-only" and any(n not in ECG_FEATURE_NAMES for n in v.features):
            raise ModelError(f"LVEF model {path}: the ecg-only variant uses EHR features")
    return manifest


def choose_variant(ehr: EhrContext | None) -> Variant:
    """``ecg-only`` when there is no EHR context or it holds nothing, else ``ecg+ehr``."""
    return "ecg-only" if ehr is None or not ehr.has_data else "ecg+ehr"


@dataclass
class _Loaded:
    spec: LvefVariantSpec
    session: Any  # onnxruntime.InferenceSession
    booster: Any  # lightgbm.Booster


def _json_value(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


class LvefModel:
    """A loaded LVEF model directory (both variants); thread-safe to share within a process.

    A ``derived`` model: it runs after the signal models, on the measurements, the
    diagnosis probabilities and the patient's EHR context (:meth:`run_derived`).
    """

    _cache: dict[Path, LvefModel] = {}
    _lock = threading.Lock()
    stage: ClassVar[str] = "derived"
    needs_ehr_context: ClassVar[bool] = True

    def __init__(self, directory: Path, manifest: LvefManifest, variants: dict[str, _Loaded]) -> None:
        self.directory = directory
        self.manifest = manifest
        self._variants = variants
        self._booster_lock = threading.Lock()  # LightGBM does not promise thread-safe predict on one Booster

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Path | None = None) -> LvefModel:
        """The model in ``path`` (default: the shipped ``inference/shipped/lvef``), loaded once per process."""
        directory = Path(path or LVEF_DIR).resolve()
        with cls._lock:
            model = cls._cache.get(directory)
            if model is None:
                model = cls._load(directory)
                cls._cache[directory] = model
            return model

    @classmethod
    def forget(cls, path: Path | None = None) -> None:
        """Drop the cached model of ``path`` (all when None), e.g. after retraining into the same directory."""
        with cls._lock:
            if path is None:
                cls._cache.clear()
            else:
                cls._cache.pop(Path(path).resolve(), None)

    @classmethod
    def _load(cls, directory: Path) -> LvefModel:
        if not directory.is_dir():
            raise ModelError(f"LVEF model directory {directory} does not exist")
        manifest = load_lvef_manifest(directory)
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        try:
            import lightgbm as lgb
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - both are runtime dependencies
            raise ModelError(f"LVEF model needs {exc.name} (a runtime dependency of the worker)") from exc
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()
        loaded: dict[str, _Loaded] = {}
        for vname, spec in manifest.variants.items():
            for fname in (spec.onnx, spec.booster):
                fpath = directory / fname
                if not fpath.is_file():
                    raise ModelError(f"LVEF model {manifest.name} {manifest.version}: {vname} file {fpath} is missing")
                want = spec.sha256.get(fname)
                if want and sha256_file(fpath) != want:
                    raise ModelError(f"LVEF model {manifest.name}: {fname} does not match the manifest's sha256")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            try:
                session = ort.InferenceSession(str(directory / spec.onnx), options, providers=["CPUExecutionProvider"])
                booster = lgb.Booster(model_file=str(directory / spec.booster))
            except Exception as exc:
                raise ModelError(
                    f"LVEF model {manifest.name}: {vname} could not be loaded: {type(exc).__name__}: {exc}"
                ) from exc
            inputs = session.get_inputs()
            if (
                len(inputs) != 1
                or inputs[0].name != spec.input_name
                or inputs[0].shape[-1] not in (len(spec.features), None)
            ):
                raise ModelError(
                    f"LVEF model {manifest.name}: {spec.onnx} takes {[(i.name, i.shape) for i in inputs]}, "
                    f"the manifest says {spec.input_name!r} with {len(spec.features)} features"
                )
            if spec.output_name not in [o.name for o in session.get_outputs()]:
                raise ModelError(f"LVEF model {manifest.name}: {spec.onnx} has no output {spec.output_name!r}")
            if list(booster.feature_name()) != list(spec.features):
                raise ModelError(
                    f"LVEF model {manifest.name}: {spec.booster} feature names do not match the manifest's "
                    f"{vname} features (first difference: "
                    f"{next((a, b) for a, b in zip(list(booster.feature_name()) + [None] * 99, spec.features + [None] * 99) if a != b)})"
                )
            if booster.num_model_per_iteration() != len(LVEF_TIERS):
                raise ModelError(f"LVEF model {manifest.name}: {spec.booster} is not a {len(LVEF_TIERS)}-class model")
            loaded[vname] = _Loaded(spec=spec, session=session, booster=booster)
        return cls(directory, manifest, loaded)

    # ------------------------------------------------------------------ inference
    def features(self, variant: str) -> list[str]:
        return list(self._variant(variant).spec.features)

    def _variant(self, variant: str) -> _Loaded:
        try:
            return self._variants[variant]
        except KeyError:
            raise ModelError(f"LVEF model has no variant {variant!r}; it has {sorted(self._variants)}") from None

    def matrix(self, rows: list[dict[str, float]], variant: str) -> np.ndarray:
        """Feature rows (lvef_feature_row dicts) -> the variant's float32 input matrix."""
        names = self._variant(variant).spec.features
        return np.asarray([[row.get(n, math.nan) for n in names] for row in rows], dtype=np.float32).reshape(
            len(rows), len(names)
        )

    def predict_proba(self, x: np.ndarray, variant: str) -> np.ndarray:
        """(N, 4) tier probabilities from the variant's ONNX graph for an (N, features) matrix."""
        v = self._variant(variant)
        out = v.session.run([v.spec.output_name], {v.spec.input_name: np.asarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float64)

    def contributions(self, x: np.ndarray, variant: str) -> np.ndarray:
        """(N, 4, features + 1) tree SHAP values (last column: the expected value) from the booster."""
        v = self._variant(variant)
        with self._booster_lock:
            raw = v.booster.predict(
                np.asarray(x, dtype=np.float32).astype(np.float64), pred_contrib=True, num_threads=1
            )
        n, f = x.shape[0], len(v.spec.features)
        return np.asarray(raw, dtype=np.float64).reshape(n, len(LVEF_TIERS), f + 1)

    def predict(
        self,
        measurement_features: dict[str, Any] | None,
        diagnosis: ModelOutput | dict[str, float] | None,
        ehr: EhrContext | None,
    ) -> ModelOutput:
        """Tier probabilities, the predicted tier, attributions and what context was missing."""
        variant = choose_variant(ehr)
        row = lvef_feature_row(measurement_features or {}, diagnosis_probabilities(diagnosis), ehr)
        x = self.matrix([row], variant)
        probs = self.predict_proba(x, variant)[0]
        if probs.shape != (len(LVEF_TIERS),) or not np.all(np.isfinite(probs)):
            raise ModelError(
                f"LVEF model {self.manifest.name}: {variant} returned {probs!r}, not {len(LVEF_TIERS)} probabilities"
            )
        k = int(np.argmax(probs))
        contrib = self.contributions(x, variant)[0, k]
        names = self._variant(variant).spec.features
        order = sorted(range(len(names)), key=lambda i: -abs(contrib[i]))
        attributions = []
        for i in order[:_TOP_K]:
            if contrib[i] == 0.0:
                break
            spec = _SPEC_BY_NAME[names[i]]
            attributions.append(
                {
                    "feature": spec.name,
                    "display": spec.display,
                    "kind": spec.kind,
                    "value": _json_value(float(x[0, i])),
                    "unit": spec.unit,
                    "contribution": round(float(contrib[i]), 4),
                }
            )
        kinds = np.array([_SPEC_BY_NAME[n].kind for n in names])
        tiers = self.manifest.tiers
        missing = missing_context_notes(ehr)
        if diagnosis is None:
            missing.append("no diagnosis model output: its probabilities were missing inputs")
        elif (
            isinstance(diagnosis, ModelOutput)
            and self.manifest.diagnosis_model
            and f"{diagnosis.model} {diagnosis.version}" != self.manifest.diagnosis_model
        ):
            missing.append(
                f"diagnosis probabilities from {diagnosis.model} {diagnosis.version}; this model was "
                f"trained with {self.manifest.diagnosis_model}"
            )
        if not measurement_features:
            missing.append("no ECG measurements: every ECG feature was missing")
        findings = tuple(
            Finding(code=t.code, display=t.display, probability=round(float(p), 6), threshold=0.0, present=(j == k))
            for j, (t, p) in enumerate(zip(tiers, probs))
        )
        extra: dict[str, Any] = {
            "tier": tiers[k].code,
            "tier_display": tiers[k].display,
            "probabilities": {t.code: round(float(p), 6) for t, p in zip(tiers, probs)},
            "variant": variant,
            "ehr_status": ehr.status if ehr is not None else "not_configured",
            "missing_context": missing,
            "attributions": attributions,
            "attribution_summary": {
                "units": "log-odds (raw score) toward the predicted tier",
                "base": round(float(contrib[-1]), 4),
                "ecg": round(float(contrib[:-1][kinds == "ecg"].sum()), 4),
                "ehr": round(float(contrib[:-1][kinds == "ehr"].sum()), 4),
            },
            "decision_rule": self.manifest.decision_rule,
            "synthetic": bool(self.manifest.synthetic),
            "notice": self.manifest.notice,
        }
        return ModelOutput(
            model=self.manifest.name, version=self.manifest.version, task="lvef", findings=findings, extra=extra
        )

    def run_derived(
        self,
        features: dict[str, Any] | None,
        outputs: list[ModelOutput],
        ehr: EhrContext | None,
        quality_flags: tuple[str, ...] = (),
    ) -> ModelOutput:
        """The LVEF tier from the measurements, the diagnosis probabilities and the EHR context.

        ``ehr`` None means the route names no EHR source: the ECG-only variant runs and the
        result says so. A poor-quality ECG is said to be one in ``missing_context``: its
        features may be wrong, and the reader must know.
        """
        diagnosis = next((o for o in outputs if o.task == "diagnosis"), None)
        context = (
            ehr
            if ehr is not None
            else EhrContext.missing("not_configured", "the route names no EHR source (ehr_context)")
        )
        out = self.predict(features or {}, diagnosis, context)
        notes = list(out.extra.get("missing_context") or [])
        if "poor_quality" in quality_flags:
            notes.insert(0, "poor signal quality: the ECG features may be unreliable")
        extra = {**out.extra, "missing_context": notes, "ehr_context": context.to_dict()}
        return ModelOutput(model=out.model, version=out.version, task=out.task, findings=out.findings, extra=extra)
