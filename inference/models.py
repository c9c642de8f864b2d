"""The model registry: ONNX files described by manifests, loaded once per process.

A model is a directory holding ``manifest.json``, the ONNX file it names and its
``MODEL_CARD.md``. The registry finds models by name in the shipped directory
(``inference/shipped``) and any directories the configuration adds; replacing a
model is a file change (drop a new directory in, or point the config at it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ecgbridge.errors import ModelError
from ecgbridge.inference.preprocess import Pipeline
from ecgbridge.inference.triage import severity_extra
from ecgbridge.mapping.abnormality_result import ABNORMALITIES_OUTPUT, PREDICTED_KEY
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Finding, ModelOutput

if TYPE_CHECKING:
    from ecgbridge.inference.lvef import LvefModel

__all__ = [
    "Model",
    "SHIPPED_DIR",
    "sha256_file",
    "Manifest",
    "ModelClass",
    "Explanation",
    "HEAD_WORDING",
    "explanations_from_heads",
    "LoadedModel",
    "ModelRegistry",
    "prepare_input",
    "load_manifest",
]

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


class ModelInput(BaseModel):
    name: str = "ecg"
    leads: list[str] = Field(default_factory=lambda: list(STANDARD_LEADS))
    fs_hz: float = 100.0
    n_samples: int = 1000
    layout: str = "NCW"  # batch, leads (channels), samples
    dtype: str = "float32"


class ModelClass(BaseModel):
    code: str
    display: str
    snomed: str | None = None


#: How the stage-3 heads of ``training.clinical.ABNORMALITIES`` read, by head code: (the
#: abnormality as it completes "ECG pattern associated with ...", the clinical variable, the
#: cut-off in words). Used for manifests that name their heads only under
#: ``architecture.abnormality_heads`` (:func:`explanations_from_heads`) and by the KT export.
HEAD_WORDING: dict[str, tuple[str, str, str]] = {
    "age_over_65": ("age over 65 years", "Age", "above 65 years"),
    "bmi_over_30": ("body mass index over 30 kg/m2", "Body mass index", "above 30 kg/m2"),
    "male_sex": ("male sex", "Sex", "male (a sanity check of the heads, not an abnormality)"),
    "nt_probnp_high": ("elevated NT-proBNP", "NT-proBNP", "above 300 pg/mL"),
    "troponin_t_high": ("elevated troponin T", "Troponin T", "above 0.014 ng/mL"),
    "potassium_abnormal": ("abnormal potassium", "Potassium", "outside 3.5-5.0 mmol/L"),
    "creatinine_high": ("elevated creatinine", "Creatinine", "above 1.3 mg/dL"),
    "hemoglobin_low": ("low hemoglobin", "Hemoglobin", "below 12 g/dL"),
}


class Explanation(BaseModel):
    """One column of the ``abnormalities`` output: a clinical abnormality predicted from the ECG.

    The knowledge-transfer model (``training.kt``) explains its findings by the clinical
    abnormalities its ECG embedding predicts ("ECG pattern associated with elevated
    NT-proBNP"). ``loinc`` names the clinical variable the head was trained against and
    ``criterion`` its cut-off, so a reader knows what the probability is a probability of;
    neither is ever a value of the patient. ``display`` completes the sentence "ECG pattern
    associated with ..."; ``index`` is the column in ``outputs["abnormalities"]``; the pattern
    is called present at ``probability >= threshold``.
    """

    model_config = ConfigDict(extra="forbid")

    code: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    display: str = Field(min_length=1, max_length=120)
    loinc: str = Field(pattern=r"^[0-9]{1,8}-[0-9]$")
    variable: str = Field(min_length=1, max_length=80)
    criterion: str = Field(min_length=1, max_length=120)
    index: int = Field(ge=0)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


def explanations_from_heads(heads: Any) -> list[Explanation] | None:
    """``architecture.abnormality_heads`` (``[{code, display, loinc, above, below}]``, column order)
    as :class:`Explanation` entries; None when they are not that shape.

    Known head codes get :data:`HEAD_WORDING`; another head keeps its own display as both the
    abnormality and the criterion.
    """
    if not isinstance(heads, list) or not heads:
        return None
    out: list[Explanation] = []
    try:
        for index, head in enumerate(heads):
            code = str(head["code"])
            display, variable, criterion = HEAD_WORDING.get(code) or (
                str(head.get("display") or code),
                str(head.get("display") or code),
                _criterion(head),
            )
            out.append(
                Explanation(
                    code=code,
                    display=display,
                    loinc=str(head["loinc"]),
                    variable=variable,
                    criterion=criterion,
                    index=index,
                )
            )
    except (KeyError, TypeError, ValueError):
        return None
    return out


def _criterion(head: dict[str, Any]) -> str:
    above, below = head.get("above"), head.get("below")
    parts = [
        f"above {above:g}" if isinstance(above, (int, float)) else "",
        f"below {below:g}" if isinstance(below, (int, float)) else "",
    ]
    text = " or ".join(p for p in parts if p)
    return text or str(head.get("display") or head["code"])


class Manifest(BaseModel):
    """What a serving process must know about a model, written by ``training.export``.

    ``outputs`` maps roles to ONNX output names: ``probabilities`` (N, classes) is
    required; ``cams`` (N, classes, T') class activation maps and ``logits``
    (N, classes, uncalibrated) are optional. ``tiers`` gives per class the
    ``moderate`` and ``high`` probability cut-offs of the risk tiers (low below
    moderate); ``calibration`` describes how ``probabilities`` were calibrated
    (informational: the calibration is inside the graph); ``architecture`` names
    the torch module it was exported from (for benchmarks and audits). All three
    are optional, so manifests written before them keep loading.

    ``explanations`` (optional) names the columns of an ``abnormalities`` output (N, heads):
    clinical abnormalities predicted from the ECG (:class:`Explanation`); it requires
    ``outputs["abnormalities"]``. A manifest written before the field (the first KT exports)
    names its heads only under ``architecture.abnormality_heads``: when its ``outputs`` has
    ``abnormalities`` they are read as ``explanations`` (:func:`explanations_from_heads`), so
    those models serve the explanations too; heads that are not that shape are ignored and the
    model serves its findings alone, as before.
    """

    name: str
    version: str
    task: str = "diagnosis"
    file: str = "model.onnx"
    sha256: str | None = None
    input: ModelInput = Field(default_factory=ModelInput)
    preprocessing: list[dict[str, Any]]
    outputs: dict[str, str] = Field(default_factory=lambda: {"probabilities": "probabilities"})
    classes: list[ModelClass]
    thresholds: dict[str, float]
    tiers: dict[str, dict[str, float]] | None = None
    calibration: dict[str, Any] | None = None
    architecture: dict[str, Any] | None = None
    explanations: list[Explanation] | None = Field(default=None, min_length=1)
    card: str = "MODEL_CARD.md"
    description: str = ""
    trained_on: str = ""
    created: str = ""

    def threshold(self, code: str) -> float:
        return float(self.thresholds.get(code, 0.5))

    @model_validator(mode="before")
    @classmethod
    def _legacy_heads(cls, data: Any) -> Any:
        """Read ``architecture.abnormality_heads`` as ``explanations`` when the field is absent."""
        if not isinstance(data, dict) or data.get("explanations") is not None:
            return data
        outputs, architecture = data.get("outputs"), data.get("architecture")
        if not isinstance(outputs, dict) or ABNORMALITIES_OUTPUT not in outputs or not isinstance(architecture, dict):
            return data
        derived = explanations_from_heads(architecture.get("abnormality_heads"))
        return data if derived is None else {**data, "explanations": derived}

    @model_validator(mode="after")
    def _check_tiers(self) -> Manifest:
        if "probabilities" not in self.outputs:
            raise ValueError("outputs must name a `probabilities` output")
        if self.explanations is not None:
            if ABNORMALITIES_OUTPUT not in self.outputs:
                raise ValueError(f"explanations need an `{ABNORMALITIES_OUTPUT}` output in outputs")
            for what in ("code", "index"):
                values = [getattr(e, what) for e in self.explanations]
                if len(set(values)) != len(values):
                    raise ValueError(f"explanations repeat a {what}: {values}")
        codes = {c.code for c in self.classes}
        for code, cut in (self.tiers or {}).items():
            if code not in codes:
                raise ValueError(f"tiers name class {code!r}, which the model does not have")
            if set(cut) != {"moderate", "high"} or not 0.0 <= cut["moderate"] <= cut["high"] <= 1.0:
                raise ValueError(f"tiers[{code!r}] must be {{'moderate': a, 'high': b}} with 0 <= a <= b <= 1")
        return self

    def tier(self, code: str, probability: float) -> str | None:
        """``low`` / ``moderate`` / ``high`` for a class with tiers, else None."""
        cut = (self.tiers or {}).get(code)
        if cut is None:
            return None
        if probability >= cut["high"]:
            return "high"
        if probability >= cut["moderate"]:
            return "moderate"
        return "low"

    def cam_step_s(self, n_steps: int) -> float:
        """Seconds of input covered by one CAM step when the map has ``n_steps`` steps.

        The architecture's ``cam_stride_samples`` (input samples per CAM step) when the
        manifest gives it, else the input length divided evenly over the steps.
        """
        stride = (self.architecture or {}).get("cam_stride_samples")
        if stride:
            return float(stride) / self.input.fs_hz
        return self.input.n_samples / max(n_steps, 1) / self.input.fs_hz


def prepare_input(ecg: Ecg, manifest: Manifest) -> np.ndarray:
    """ECG -> model input (leads, samples) via the manifest's preprocessing pipeline."""
    leads = tuple(manifest.input.leads)
    try:
        x = ecg.in_lead_order(leads)
    except KeyError as exc:
        raise ModelError(f"model {manifest.name} needs leads the ECG lacks: {exc.args[0]}") from exc
    y, fs = Pipeline.from_spec(manifest.preprocessing).apply(x, ecg.fs)
    if abs(fs - manifest.input.fs_hz) > 1e-6 or y.shape != (len(leads), manifest.input.n_samples):
        raise ModelError(
            f"preprocessing for {manifest.name} produced shape {y.shape} at {fs} Hz, "
            f"expected ({len(leads)}, {manifest.input.n_samples}) at {manifest.input.fs_hz} Hz"
        )
    return y


@dataclass
class LoadedModel:
    """A signal model: an ONNX classifier that reads the preprocessed ECG (stage ``signal``)."""

    manifest: Manifest
    directory: Path
    session: Any  # onnxruntime.InferenceSession

    #: Signal models run first, on the ECG; ``derived`` models run after them on their outputs.
    stage: ClassVar[str] = "signal"
    #: Whether the worker must fetch the patient's EHR context for this model.
    needs_ehr_context: ClassVar[bool] = False

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch (N, leads, samples); returns every declared output by its role."""
        names = list(self.manifest.outputs.values())
        values = self.session.run(names, {self.manifest.input.name: batch.astype(np.float32)})
        return dict(zip(self.manifest.outputs.keys(), values))

    def run(self, ecg: Ecg) -> ModelOutput:
        """Findings with thresholds and (when the manifest has them) risk tiers.

        When the model has a ``cams`` output, ``extra["cam_peak_s"]`` gives per
        class the time (seconds from the start of the model input) at the centre
        of the CAM's highest step; the maps themselves come from ``explain``. For a
        triage model (task ``triage``) ``extra["severity"]`` gives the tier
        (``inference.triage.severity_extra``). A model with ``explanations`` gives
        ``extra["predicted_abnormalities"]``: per head its probability and whether the
        pattern is called present (:meth:`_predicted`; predicted, never measured).
        """
        x = prepare_input(ecg, self.manifest)
        out = self.predict(x[None])
        probs = out["probabilities"][0]
        findings = []
        for cls, p in zip(self.manifest.classes, probs):
            thr = self.manifest.threshold(cls.code)
            findings.append(
                Finding(
                    code=cls.code,
                    display=cls.display,
                    probability=round(float(p), 6),
                    threshold=thr,
                    present=bool(p >= thr),
                    snomed=cls.snomed,
                    tier=self.manifest.tier(cls.code, float(p)),
                )
            )
        extra: dict[str, Any] = {}
        if "cams" in out:
            cams = out["cams"][0]
            step = self.manifest.cam_step_s(cams.shape[-1])
            extra["cam_peak_s"] = {
                cls.code: round((int(np.argmax(cams[k])) + 0.5) * step, 3)
                for k, cls in enumerate(self.manifest.classes)
            }
        if self.manifest.calibration:
            extra["calibrated"] = True
        if self.manifest.task == "triage":  # cumulative outputs -> one severity tier (inference.triage)
            extra.update(severity_extra(findings))
        if self.manifest.explanations and ABNORMALITIES_OUTPUT in out:
            extra[PREDICTED_KEY] = self._predicted(out[ABNORMALITIES_OUTPUT])
        return ModelOutput(
            model=self.manifest.name,
            version=self.manifest.version,
            task=self.manifest.task,
            findings=tuple(findings),
            extra=extra,
        )

    def _predicted(self, values: np.ndarray) -> list[dict[str, Any]]:
        """The ``abnormalities`` row of one ECG as ``extra["predicted_abnormalities"]`` entries.

        Each entry says it is predicted (``"measured": False``): a probability that the ECG
        shows the pattern of the abnormality, never a value of the clinical variable.
        """
        row = np.asarray(values, dtype=np.float64)[0].reshape(-1)
        entries: list[dict[str, Any]] = []
        for e in self.manifest.explanations or ():
            if e.index >= row.shape[0]:
                raise ModelError(
                    f"model {self.manifest.name} {self.manifest.version}: explanation {e.code} reads column "
                    f"{e.index} of `{ABNORMALITIES_OUTPUT}`, which has {row.shape[0]}"
                )
            p = float(row[e.index])
            entries.append(
                {
                    "code": e.code,
                    "display": e.display,
                    "loinc": e.loinc,
                    "variable": e.variable,
                    "criterion": e.criterion,
                    "probability": round(p, 6),
                    "threshold": e.threshold,
                    "present": bool(p >= e.threshold),
                    "measured": False,
                }
            )
        return entries

    def explain(self, ecg: Ecg) -> np.ndarray:
        """Class activation maps (classes, T') for one ECG, in logit units, from the graph's ``cams`` output.

        Step j covers input seconds ``[j, j + 1) * manifest.cam_step_s(T')``; the time
        mean of map k plus the head bias is class k's (uncalibrated) logit.
        """
        if "cams" not in self.manifest.outputs:
            raise ModelError(f"model {self.manifest.name} {self.manifest.version} has no `cams` output to explain with")
        x = prepare_input(ecg, self.manifest)
        name = self.manifest.outputs["cams"]
        cams = self.session.run([name], {self.manifest.input.name: x[None].astype(np.float32)})[0]
        return np.asarray(cams[0], dtype=np.float32)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (manifests pin their model files by it)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(directory: Path) -> Manifest:
    path = directory / "manifest.json"
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ModelError(f"no manifest.json in model directory {directory}") from exc
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"invalid model manifest {path}: {exc}") from exc


def _load_lvef(directory: Path) -> LvefModel:
    from ecgbridge.inference.lvef import LvefModel

    return LvefModel.load(directory)


#: A model the registry hands out: a signal classifier or a derived model.
Model = Union[LoadedModel, "LvefModel"]

#: Manifest ``task`` -> loader, for models that are not ONNX signal classifiers. Every other
#: task is a signal model (:class:`LoadedModel`). The registry dispatches on this, never on
#: a model's name.
DERIVED_LOADERS: dict[str, Callable[[Path], Any]] = {"lvef": _load_lvef}


def _manifest_head(directory: Path) -> tuple[str, str] | None:
    """(name, task) from a model directory's manifest, or None when it is not a usable model."""
    try:
        data = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    task = str(data.get("task", "diagnosis"))
    if task not in DERIVED_LOADERS:
        try:
            load_manifest(directory)
        except ModelError:
            return None
    return data["name"], task


class ModelRegistry:
    """Finds models by name; each model is loaded once per process and reused.

    A model is found by its manifest's ``name`` or by its directory's name (the shipped
    LVEF model lives in ``shipped/lvef``), or at the path the configuration gives for a
    name. How it is loaded follows the manifest's ``task`` (:data:`DERIVED_LOADERS`).
    """

    def __init__(self, directories: list[Path] | None = None, paths: dict[str, Path] | None = None) -> None:
        self._dirs = [SHIPPED_DIR, *(directories or [])]
        self._paths = dict(paths or {})
        self._loaded: dict[str, Model] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        aliases: dict[str, Path] = {}
        for base in self._dirs:
            if not base.is_dir():
                continue
            for manifest in sorted(base.glob("*/manifest.json")):
                head = _manifest_head(manifest.parent)
                if head is not None:
                    found[head[0]] = manifest.parent
                    aliases[manifest.parent.name] = manifest.parent
        for alias, directory in aliases.items():
            found.setdefault(alias, directory)
        found.update(self._paths)
        return found

    def configured_path(self, name: str) -> Path | None:
        """The directory the configuration gives for ``name`` (``models[].path``), if any."""
        return self._paths.get(name)

    def get(self, name: str) -> Model:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            directory = self.available().get(name)
            if directory is None:
                raise ModelError(f"no model named {name!r}; available: {sorted(self.available())}")
            model = self._load(directory)
            self._loaded[name] = model
            return model

    def signal_model(self, name: str) -> LoadedModel:
        """``get(name)``, which must be a signal model (one with a graph over the ECG, e.g. for CAMs)."""
        model = self.get(name)
        if not isinstance(model, LoadedModel):
            raise ModelError(f"model {name!r} is a {model.stage} model, not one that reads the ECG signal")
        return model

    @staticmethod
    def _load(directory: Path) -> Model:
        head = _manifest_head(directory)
        loader = DERIVED_LOADERS.get(head[1]) if head is not None else None
        if loader is not None:
            model: Model = loader(directory)
            return model
        return _load_signal_model(directory)


def _load_signal_model(directory: Path) -> LoadedModel:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # no usage data leaves a hospital network
    import onnxruntime as ort  # imported here so the gateway never loads it

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()

    manifest = load_manifest(directory)
    onnx_path = directory / manifest.file
    if not onnx_path.is_file():
        raise ModelError(f"model {manifest.name}: ONNX file {onnx_path} is missing")
    if manifest.sha256 and sha256_file(onnx_path) != manifest.sha256:
        raise ModelError(f"model {manifest.name}: {onnx_path.name} does not match the manifest's sha256")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return LoadedModel(manifest=manifest, directory=directory, session=session)
