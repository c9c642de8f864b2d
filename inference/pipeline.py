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

from ecgbridge.mapping.ecg import AnalysisResult, Ecg, ModelOutput
from ecgbridge.mapping.ehr_context import EhrContext

from ecgbridge.inference.features import FEATURES_VERSION, MEASUREMENTS_MODEL, measure
from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.quality import assess, cap_for_quality

__all__ = ["LVEF_MODEL", "MEASUREMENTS_FAILED", "analyse_ecg", "lvef_output", "measurement_output"]

#: The configured model name that selects the LVEF tier model (:mod:`inference.lvef`).
LVEF_MODEL = "lvef"

#: Quality flag when the measurements could not be made (the models' results still stand).
MEASUREMENTS_FAILED = "measurements_failed"

log = logging.getLogger(__name__)


def measurement_output(ecg: Ecg) -> ModelOutput:
    """The global measurements of ``ecg`` as a ModelOutput (raises what measure raises)."""
    m = measure(ecg)
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
) -> AnalysisResult:
    """Every requested model on ``ecg``; ``ehr`` is the patient context the LVEF model reads.

    The LVEF model (name ``lvef``) runs last: it reads the measurements and the
    diagnosis model's probabilities, so it needs them computed first.
    """
    report = assess(ecg)
    flags = report.flags
    # A poor-quality ECG never gets a "high" tier or a "normal" call from noise alone.
    outputs = [cap_for_quality(registry.get(name).run(ecg), report) for name in model_names if name != LVEF_MODEL]
    features: dict | None = None
    try:
        measured = measurement_output(ecg)
        outputs.append(measured)
        features = measured.extra["features"]
    except Exception as exc:  # noqa: BLE001 - measurements are optional; the models' results stand
        log.warning("measurements failed for message %s: %s: %s", message_id or "-", type(exc).__name__, exc)
        flags = (*flags, MEASUREMENTS_FAILED)
    if LVEF_MODEL in model_names:
        outputs.append(lvef_output(registry, features, outputs, ehr, flags))
    return AnalysisResult(message_id=message_id, outputs=tuple(outputs), quality_flags=flags, ecg_flags=ecg.flags)


def lvef_output(
    registry: ModelRegistry,
    features: dict | None,
    outputs: list[ModelOutput],
    ehr: EhrContext | None,
    quality_flags: tuple[str, ...] = (),
) -> ModelOutput:
    """The LVEF tier from the measurements, the diagnosis probabilities and the EHR context.

    ``ehr`` None means the route names no EHR source: the ECG-only variant runs and the
    result says so. A poor-quality ECG is said to be one in ``missing_context``: its
    features may be wrong, and the reader must know.
    """
    from ecgbridge.inference.lvef import LvefModel

    model = LvefModel.load(registry.configured_path(LVEF_MODEL))
    diagnosis = next((o for o in outputs if o.task == "diagnosis"), None)
    context = ehr if ehr is not None else EhrContext.missing(
        "not_configured", "the route names no EHR source (ehr_context)")
    out = model.predict(features or {}, diagnosis, context)
    notes = list(out.extra.get("missing_context") or [])
    if "poor_quality" in quality_flags:
        notes.insert(0, "poor signal quality: the ECG features may be unreliable")
    extra = {**out.extra, "missing_context": notes, "ehr_context": context.to_dict()}
    return ModelOutput(model=out.model, version=out.version, task=out.task, findings=out.findings, extra=extra)
