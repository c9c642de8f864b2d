"""Pure analysis of one canonical ECG: quality gate, then every requested model.

Shared by the Celery task, ``ecgbridge analyse`` and evaluation, so a file
analysed on the command line gets exactly what the EHR would get.
"""

from __future__ import annotations

from mapping.ecg import AnalysisResult, Ecg

from .models import ModelRegistry
from .quality import quality_flags

__all__ = ["analyse_ecg"]


def analyse_ecg(ecg: Ecg, registry: ModelRegistry, model_names: list[str], *, message_id: str = "") -> AnalysisResult:
    flags = quality_flags(ecg)
    outputs = tuple(registry.get(name).run(ecg) for name in model_names)
    return AnalysisResult(message_id=message_id, outputs=outputs, quality_flags=flags, ecg_flags=ecg.flags)
