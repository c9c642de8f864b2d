"""Pure analysis of one canonical ECG: quality gate, every requested model, measurements.

Shared by the Celery task, ``ecgbridge analyse`` and evaluation, so a file
analysed on the command line gets exactly what the EHR would get.

The global measurements (:func:`inference.features.measure`, on the raw signal at its
own sampling rate) are one more :class:`~mapping.ecg.ModelOutput`, named
``ecgbridge-measurements`` with the features module's version, task ``measurements``,
no findings, and ``extra``:

* ``"measurements"``: what :mod:`mapping.hl7_oru` sends as NM OBX segments (heart rate,
  PR, QRS, QT, QTc = Bazett, P / QRS / T axes; only those measured),
* ``"features"``: everything :class:`~inference.features.Measurements` holds (JSON-safe),
  e.g. ``qtc_fridericia``, amplitudes, Sokolow-Lyon, Q waves, for the LVEF model and
  :mod:`mapping.fhir_measurements`.

A failure inside the measurements never fails the analysis: the output is left out and
the quality flags say ``measurements_failed``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ecgbridge.inference.features import FEATURES_VERSION, MEASUREMENTS_MODEL, SignalViews, measure
from ecgbridge.inference.models import LoadedModel, ModelRegistry
from ecgbridge.inference.quality import assess, cap_for_quality
from ecgbridge.mapping.ecg import AnalysisResult, Ecg, ModelOutput
from ecgbridge.mapping.ehr_context import EhrContext

__all__ = ["MEASUREMENTS_FAILED", "analyse_ecg", "measurement_output", "needs_ehr_context"]

#: Quality flag when the measurements could not be made (the models' results still stand).
MEASUREMENTS_FAILED = "measurements_failed"

log = logging.getLogger(__name__)


def measurement_output(ecg: Ecg, views: SignalViews | None = None) -> ModelOutput:
    """The global measurements of ``ecg`` as a ModelOutput (raises what measure raises)."""
    m = measure(ecg, views)
    return ModelOutput(
        model=MEASUREMENTS_MODEL,
        version=FEATURES_VERSION,
        task="measurements",
        findings=(),
        extra={"measurements": m.as_dict(), "features": m.features()},
    )


def analyse_ecg(
    ecg: Ecg,
    registry: ModelRegistry,
    model_names: list[str],
    *,
    message_id: str = "",
    ehr: EhrContext | None = None,
    timings: dict[str, float] | None = None,
) -> AnalysisResult:
    """Every requested model on ``ecg``; ``ehr`` is the patient context derived models read.

    Signal models run first, then the measurements, then the derived models (stage
    ``derived``, e.g. LVEF), which read the measurements and the signal models' outputs.
    ``timings``, when given, receives the seconds each model's run took (by the name asked
    for; the measurements as ``ecgbridge-measurements``); loading a model is not counted.
    """
    spent: dict[str, float] = timings if timings is not None else {}

    def timed(name: str, started: float) -> None:
        spent[name] = spent.get(name, 0.0) + (time.perf_counter() - started)

    views = SignalViews(ecg)  # the gate and the measurements share the zeroed samples and one QRS detection
    report = assess(ecg, views)
    flags = report.flags
    models = [(name, registry.get(name)) for name in model_names]
    # A poor-quality ECG never gets a "high" tier or a "normal" call from noise alone.
    outputs: list[ModelOutput] = []
    for name, m in models:
        if isinstance(m, LoadedModel):
            started = time.perf_counter()
            outputs.append(cap_for_quality(m.run(ecg), report))
            timed(name, started)
    features: dict[str, Any] | None = None
    started = time.perf_counter()
    try:
        measured = measurement_output(ecg, views)
        outputs.append(measured)
        features = measured.extra["features"]
    except Exception as exc:
        log.warning("measurements failed for message %s: %s: %s", message_id or "-", type(exc).__name__, exc)
        flags = (*flags, MEASUREMENTS_FAILED)
    timed(MEASUREMENTS_MODEL, started)
    for name, model in models:
        if not isinstance(model, LoadedModel):
            started = time.perf_counter()
            outputs.append(model.run_derived(features, outputs, ehr, flags))
            timed(name, started)
    return AnalysisResult(message_id=message_id, outputs=tuple(outputs), quality_flags=flags, ecg_flags=ecg.flags)


def needs_ehr_context(registry: ModelRegistry, model_names: list[str]) -> bool:
    """Whether any of these models reads the patient's EHR context (so the worker fetches it)."""
    return any(registry.get(name).needs_ehr_context for name in model_names)
