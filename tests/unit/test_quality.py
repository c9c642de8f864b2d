"""inference.quality: the gate on real fixtures, on synthetic corruptions of them, and what poor quality may change.

Why: a poor tracing must be flagged on every result and must never make a confident
claim; and the seed's failure ("Signal Noise = Disease": a noisy normal ECG scored
above a true MI) is tested with the shipped model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps

from ecgbridge.inference.models import LoadedModel, ModelRegistry
from ecgbridge.inference.pipeline import analyse_ecg
from ecgbridge.inference.quality import QualityReport, assess, cap_for_quality, quality_flags
from ecgbridge.mapping.ecg import AnalysisResult, Ecg, Finding, ModelOutput
from ecgbridge.mapping.readers import read_ecg_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REAL = sorted((FIXTURES / "dicom").glob("*_12lead.dcm")) + sorted((FIXTURES / "wfdb").glob("*.hea"))
NORMAL_ECGS = ("dicom/ptbxl_00024_norm_12lead.dcm", "dicom/cinc2021_E07506_12lead.dcm", "wfdb/00024_lr.hea")
MI_ECG = "dicom/ptbxl_00622_mi_12lead.dcm"


def load(name: str) -> Ecg:
    return read_ecg_file(FIXTURES / name)


def with_signals(ecg: Ecg, x: np.ndarray) -> Ecg:
    return replace(ecg, signals=np.asarray(x, dtype=np.float32))


def lead_ranges(ecg: Ecg) -> np.ndarray:
    x = ecg.signals.astype(np.float64)
    return np.percentile(x, 99.5, axis=1, keepdims=True) - np.percentile(x, 0.5, axis=1, keepdims=True)


# --------------------------------------------------------------------------- corruptions


def add_gaussian(ecg: Ecg, level: float, seed: int = 0) -> Ecg:
    """White noise with SD ``level`` x the median lead range."""
    rng = np.random.default_rng(seed)
    scale = float(np.median(lead_ranges(ecg)))
    return with_signals(ecg, ecg.signals + rng.normal(size=ecg.signals.shape) * level * scale)


def add_emg(ecg: Ecg, level: float, seed: int = 0) -> Ecg:
    """Muscle-like noise (20 Hz .. 150 Hz band) with SD ``level`` x the median lead range."""
    rng = np.random.default_rng(seed)
    fs = ecg.fs
    sos = sps.butter(4, [20.0, min(150.0, 0.45 * fs)], btype="band", fs=fs, output="sos")
    n = sps.sosfiltfilt(sos, rng.normal(size=ecg.signals.shape), axis=-1)
    scale = float(np.median(lead_ranges(ecg)))
    return with_signals(ecg, ecg.signals + n / n.std() * level * scale)


def add_wander(ecg: Ecg, level: float, seed: int = 0) -> Ecg:
    """Respiration-like 0.3 Hz sine, amplitude ``level`` x each lead's range."""
    rng = np.random.default_rng(seed)
    t = np.arange(ecg.signals.shape[1]) / ecg.fs
    phase = rng.uniform(0, 2 * np.pi, (ecg.signals.shape[0], 1))
    return with_signals(ecg, ecg.signals + level * lead_ranges(ecg) * np.sin(2 * np.pi * 0.3 * t + phase))


def add_motion(ecg: Ecg, level: float, seed: int = 0) -> Ecg:
    """Loose-electrode bursts: a 0.3-1 s random walk in every lead (the seed's artefact)."""
    rng = np.random.default_rng(seed)
    x = ecg.signals.astype(np.float64).copy()
    scale = float(np.median(lead_ranges(ecg)))
    fs = ecg.fs
    for k in range(x.shape[0]):
        start = int(rng.integers(0, x.shape[1] - int(fs)))
        length = int(fs * rng.uniform(0.3, 1.0))
        x[k, start : start + length] += level * scale * 3 * np.cumsum(rng.normal(size=length)) / np.sqrt(length)
    return with_signals(ecg, x)


def la_ra_reversal(ecg: Ecg) -> Ecg:
    """Left and right arm electrodes swapped: I inverted, II <-> III, aVR <-> aVL."""
    x = ecg.signals.copy()
    i = ecg.leads.index
    y = x.copy()
    y[i("I")] = -x[i("I")]
    y[i("II")], y[i("III")] = x[i("III")], x[i("II")]
    y[i("aVR")], y[i("aVL")] = x[i("aVL")], x[i("aVR")]
    return with_signals(ecg, y)


# --------------------------------------------------------------------------- real fixtures


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_fixtures_are_acceptable(path: Path) -> None:
    report = assess(read_ecg_file(path))
    assert report.overall == "acceptable", report.flags
    assert "poor_quality" not in report.flags
    assert not any(
        f.startswith(
            ("flat_leads", "clipped_leads", "hf_noise", "motion_artefact", "suspected_limb_lead_reversal", "too_short")
        )
        for f in report.flags
    )
    assert set(report.leads) >= {"I", "II", "V1", "V6"}


def test_the_only_flag_on_the_georgia_record_is_its_real_wander() -> None:
    # E07506 V4 drifts about 2 mV over the 10 s (visible on the printout): flagged, not poor.
    report = assess(load("dicom/cinc2021_E07506_12lead.dcm"))
    assert report.flags == ("baseline_wander:V4",)
    assert report.leads["V4"].status == "wander" and report.leads["II"].status == "ok"


def test_quality_flags_is_assess_flags() -> None:
    ecg = add_gaussian(load("dicom/ptbxl_00024_norm_12lead.dcm"), 0.3)
    assert quality_flags(ecg) == assess(ecg).flags
    assert "poor_quality" in quality_flags(ecg)


# --------------------------------------------------------------------------- synthetic corruptions


@pytest.mark.parametrize("name", NORMAL_ECGS)
def test_high_frequency_noise_is_poor(name: str) -> None:
    ecg = load(name)
    for noisy in (add_gaussian(ecg, 0.2), add_emg(ecg, 0.3)):
        report = assess(noisy)
        assert report.overall == "poor" and "hf_noise" in report.reasons, report.flags
        assert sum(q.status == "noisy" for q in report.leads.values()) >= 3


def test_a_little_noise_stays_acceptable() -> None:
    assert assess(add_gaussian(load("dicom/ptbxl_00024_norm_12lead.dcm"), 0.02)).acceptable


@pytest.mark.parametrize("name", NORMAL_ECGS)
def test_flat_lead_is_poor(name: str) -> None:
    ecg = load(name)
    x = ecg.signals.copy()
    x[ecg.leads.index("V2")] = 0.0
    report = assess(with_signals(ecg, x))
    assert report.overall == "poor" and "flat_leads:V2" in report.flags
    assert report.leads["V2"].status == "flat"
    x[ecg.leads.index("V2")] = 0.002 * np.random.default_rng(0).normal(size=x.shape[1])  # off: a 2 uV noise floor
    assert "flat_leads:V2" in assess(with_signals(ecg, x)).flags


def test_missing_and_nonfinite_leads_are_poor() -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    keep = [i for i, lead in enumerate(ecg.leads) if lead != "V3"]
    report = assess(replace(ecg, signals=ecg.signals[keep], leads=tuple(ecg.leads[i] for i in keep)))
    assert report.overall == "poor" and "missing_leads:V3" in report.flags
    assert report.leads["V3"].status == "missing"
    x = ecg.signals.copy()
    x[ecg.leads.index("aVF"), 100:140] = np.nan
    report = assess(with_signals(ecg, x))
    assert report.overall == "poor" and "nonfinite_samples:aVF" in report.flags


@pytest.mark.parametrize("name", NORMAL_ECGS)
def test_clipping(name: str) -> None:
    ecg = load(name)
    x = ecg.signals.astype(np.float64)
    hi = np.percentile(x, 96, axis=1, keepdims=True)
    report = assess(with_signals(ecg, np.minimum(x, hi)))  # every R peak cut off at the rail
    assert report.overall == "poor" and "clipped_leads" in report.reasons
    assert report.leads["II"].status == "clipped"
    one = x.copy()
    one[1] = np.minimum(x[1], hi[1])
    report = assess(with_signals(ecg, one))
    assert "clipped_leads:II" in report.flags  # one saturated lead: flagged ...
    assert "clipped_leads" not in report.reasons  # ... but it alone does not make the ECG poor


@pytest.mark.parametrize("name", NORMAL_ECGS)
def test_baseline_wander(name: str) -> None:
    ecg = load(name)
    report = assess(add_wander(ecg, 1.0))
    assert report.overall == "poor" and "baseline_wander" in report.reasons, report.flags
    assert not any(f.startswith("baseline_wander") and f.count(",") >= 2 for f in assess(add_wander(ecg, 0.2)).flags)


@pytest.mark.parametrize("name", NORMAL_ECGS)
def test_electrode_motion_bursts(name: str) -> None:
    report = assess(add_motion(load(name), 1.0))
    assert report.overall == "poor" and "motion_artefact" in report.reasons, report.flags


def test_implausible_amplitude_only_for_millivolt_sources() -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    x = ecg.signals.copy()
    x[ecg.leads.index("V3")] *= 20.0  # a 40 mV lead: a units or gain error
    report = assess(with_signals(ecg, x))
    assert report.overall == "poor" and "implausible_amplitude:V3" in report.flags
    z = load("wfdb/00024_lr.hea")  # z-scored source: amplitudes carry no mV meaning
    assert "units:zscore" in z.flags
    x = z.signals.copy()
    x[z.leads.index("V3")] *= 20.0
    assert not any(f.startswith("implausible_amplitude") for f in assess(with_signals(z, x)).flags)


@pytest.mark.parametrize("name", [*NORMAL_ECGS, MI_ECG, "dicom/ptbxl_00730_cd_12lead.dcm"])
def test_limb_lead_reversal_is_suspected_and_only_then(name: str) -> None:
    ecg = load(name)
    assert not any(f.startswith("suspected_limb_lead_reversal") for f in assess(ecg).flags)
    report = assess(la_ra_reversal(ecg))
    assert "suspected_limb_lead_reversal:LA/RA" in report.flags and report.overall == "poor"
    # conservative: lead I inverted on its own (aVR still negative) is not the reversal pattern
    x = ecg.signals.copy()
    x[ecg.leads.index("I")] *= -1
    assert not any(f.startswith("suspected_limb_lead_reversal") for f in assess(with_signals(ecg, x)).flags)


def test_too_short_and_short() -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    short = replace(ecg, signals=ecg.signals[:, : int(2.0 * ecg.fs)])
    report = assess(short)
    assert report.overall == "poor" and report.too_short and "too_short:2.0s" in report.flags
    five = assess(replace(ecg, signals=ecg.signals[:, : int(5.0 * ecg.fs)]))
    assert "short_recording:5.0s" in five.flags and five.acceptable


def test_report_serialises() -> None:
    d = assess(add_gaussian(load("wfdb/00024_lr.hea"), 0.3)).to_dict()
    assert d["overall"] == "poor" and "hf_noise" in d["reasons"]
    assert d["leads"]["II"]["status"] == "noisy" and "hf_ratio" in d["leads"]["II"]["metrics"]


# --------------------------------------------------------------------------- what poor quality changes


def _output() -> ModelOutput:
    findings = (
        Finding("NORM", "Normal ECG", 0.80, 0.2, True, snomed="164854000", tier="high"),
        Finding("MI", "Myocardial infarction", 0.60, 0.14, True, snomed="164865005", tier="high"),
        Finding("STTC", "ST/T change", 0.30, 0.8, False, tier="moderate"),
        Finding("CD", "Conduction disturbance", 0.02, 0.16, False, tier="low"),
        Finding("HYP", "Hypertrophy", 0.05, 0.7, False),
    )
    return ModelOutput("diagnosis", "9.9.9", "diagnosis", findings, extra={"calibrated": True})


def _report(*reasons: str) -> QualityReport:
    return QualityReport(overall="poor" if reasons else "acceptable", flags=(), leads={}, reasons=reasons)


def test_acceptable_quality_changes_nothing() -> None:
    out = _output()
    assert cap_for_quality(out, _report()) is out


def test_poor_quality_caps_high_tiers_and_withholds_normal() -> None:
    out = _output()
    capped = cap_for_quality(out, _report("hf_noise"))
    by = {f.code: f for f in capped.findings}
    assert [f.probability for f in capped.findings] == [f.probability for f in out.findings]  # never changed
    assert by["MI"].tier == "moderate" and by["MI"].present  # a possible MI is still reported, not lowered to low
    assert by["NORM"].present is False  # no reassurance from a poor tracing
    assert by["STTC"].tier == "moderate" and by["CD"].tier == "low" and by["HYP"].tier is None
    order = {"low": 0, "moderate": 1, "high": 2}
    for before, after in zip(out.findings, capped.findings):  # nothing goes up
        if before.tier in order:
            assert order[after.tier] <= order[before.tier]
    gate = capped.extra["quality_gate"]
    assert gate["rule"] == "poor_quality" and gate["reasons"] == ["hf_noise"]
    assert gate["withheld"] == {"NORM": {"present": True, "tier": "high"}, "MI": {"present": True, "tier": "high"}}
    assert capped.extra["calibrated"] is True
    again = cap_for_quality(capped, _report("hf_noise"))
    assert again.findings == capped.findings and again.extra["quality_gate"]["withheld"] == gate["withheld"]


def test_too_short_asserts_nothing() -> None:
    capped = cap_for_quality(_output(), _report("too_short"))
    assert all(not f.present and f.tier is None for f in capped.findings)
    assert [f.probability for f in capped.findings] == [f.probability for f in _output().findings]
    assert capped.extra["quality_gate"]["rule"] == "too_short"
    assert set(capped.extra["quality_gate"]["withheld"]) == {"NORM", "MI", "STTC", "CD"}


# --------------------------------------------------------------------------- the seed's failure, with the shipped model

NOISES = {"gaussian": add_gaussian, "emg": add_emg, "wander": add_wander, "motion": add_motion}
LEVELS = (0.1, 0.2, 0.35, 0.5, 1.0)
VARIANTS = [(name, kind, level) for name in NORMAL_ECGS for kind in NOISES for level in LEVELS]


def _variant_id(variant: tuple[str, str, float]) -> str:
    return "{}:{}:{}".format(*variant)


def _noisy(name: str, kind: str, level: float) -> Ecg:
    return NOISES[kind](load(name), level, seed=int(level * 100))


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    """The shipped models; diagnosis from ECGBRIDGE_TEST_DIAGNOSIS_MODEL when set (a candidate)."""
    import os

    candidate = os.environ.get("ECGBRIDGE_TEST_DIAGNOSIS_MODEL")
    return ModelRegistry(paths={"diagnosis": Path(candidate)}) if candidate else ModelRegistry()


@pytest.fixture(scope="module")
def shipped(registry: ModelRegistry) -> LoadedModel:
    """The diagnosis model the registry serves."""
    model = registry.get("diagnosis")
    assert isinstance(model, LoadedModel)
    return model


def _noisy_normals() -> list[tuple[str, Ecg]]:
    return [(_variant_id(v), _noisy(*v)) for v in VARIANTS]


#: Measured failures of one exact model (by ONNX sha256): strict xfails that lapse when the model changes.
KNOWN_FAILURES = {
    (
        "test_noise_on_normal_ecgs_does_not_score_above_a_true_mi",
        "3f329e64cd84cea795665e1be9f575bbfbdc526247c72d80e49fe0792c07a1a1",
    ): (
        "diagnosis 0.2.0 (measured 2026-12-01): the MI fixture ptbxl_00622 scores MI p=0.132 (tier low) while 19 of "
        "60 noisy NORM variants score higher, worst wfdb/00024_lr + Gaussian noise SD 1.0 x lead range p=0.472 "
        "(tier high), lowest noise level that beats it: Gaussian / EMG 0.2 on 00024_lr (0.179 / 0.162); clean NORM "
        "fixtures score 0.002-0.008. All 19 are flagged poor_quality by the gate and capped to moderate/low "
        "(test_noise_that_outscores_a_true_mi_is_flagged_and_capped). diagnosis 0.1.0 passed (0.245 < 0.338)."
    ),
}


def known_failure(request, model) -> None:
    reason = KNOWN_FAILURES.get((request.node.originalname, model.manifest.sha256))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _mi(model, ecg: Ecg) -> Finding:
    return {f.code: f for f in model.run(ecg).findings}["MI"]


def _diagnosis(result: AnalysisResult) -> ModelOutput:
    (output,) = [o for o in result.outputs if o.task == "diagnosis"]
    return output


def test_noise_on_normal_ecgs_does_not_score_above_a_true_mi(shipped, request) -> None:
    """Noisy NORM fixtures (4 noise kinds x 5 levels x 3 records) vs the MI fixture, MI probability."""
    known_failure(request, shipped)
    mi = _mi(shipped, load(MI_ECG)).probability
    worst_name, worst = max(
        ((name, _mi(shipped, ecg).probability) for name, ecg in _noisy_normals()), key=lambda item: item[1]
    )
    assert worst < mi, f"noisy normal {worst_name} scored MI {worst:.3f} >= true MI ECG {mi:.3f}"


def test_noise_that_outscores_a_true_mi_is_flagged_and_capped(registry: ModelRegistry, shipped: LoadedModel) -> None:
    """What the gate guarantees whatever the model, checked on the noisy normals the model scores most like an MI.

    Those are the five highest MI scores and every one called MI or at the MI fixture's score, so the test
    checks something even when no noise beats the fixture (as with diagnosis 0.1.1); the result comes
    from ``analyse_ecg``, the path the worker takes.
    """
    mi = _mi(shipped, load(MI_ECG)).probability
    scored = sorted(((_mi(shipped, ecg), name, ecg) for name, ecg in _noisy_normals()), key=lambda c: -c[0].probability)
    cases = [c for i, c in enumerate(scored) if i < 5 or c[0].present or c[0].probability >= mi]
    for raw, name, ecg in cases:
        result = analyse_ecg(ecg, registry, ["diagnosis"])
        assert "poor_quality" in result.quality_flags, (
            f"{name} scored MI {raw.probability:.3f}; the gate said acceptable"
        )
        by = {f.code: f for f in _diagnosis(result).findings}
        assert by["MI"].probability == raw.probability, name  # the model's statement is never changed
        assert by["MI"].present is raw.present, name  # a possible MI is still reported ...
        assert all(f.tier != "high" for f in by.values()), f"{name}: {by}"  # ... never with confidence
        assert not by["NORM"].present, name


def test_analyse_ecg_caps_every_poor_ecg_and_leaves_clean_ones_alone(
    registry: ModelRegistry, shipped: LoadedModel
) -> None:
    """The README's promise through the pipeline: a poor ECG never gets a "high" tier or a "normal" call."""
    capped_high = capped_normal = 0
    for variant in VARIANTS:
        ecg = _noisy(*variant)
        if assess(ecg).acceptable:
            continue
        raw = {f.code: f for f in shipped.run(ecg).findings}
        output = _diagnosis(analyse_ecg(ecg, registry, ["diagnosis"]))
        by = {f.code: f for f in output.findings}
        name = _variant_id(variant)
        assert {c: f.probability for c, f in by.items()} == {c: f.probability for c, f in raw.items()}, name
        assert all(f.tier != "high" for f in by.values()), f"{name}: {by}"
        assert not by["NORM"].present, f"{name}: a normal call on a poor ECG"
        assert output.extra["quality_gate"]["rule"] == "poor_quality", name
        capped_high += any(f.tier == "high" for f in raw.values())
        capped_normal += raw["NORM"].present
    # the noise must have given the model something to cap, or the checks above prove nothing
    assert capped_high >= 5 and capped_normal >= 5, (capped_high, capped_normal)
    for name in NORMAL_ECGS:
        clean = load(name)
        assert _diagnosis(analyse_ecg(clean, registry, ["diagnosis"])).findings == shipped.run(clean).findings


TRIAGE_GAP = (
    "product gap: cap_for_quality caps findings only; the triage model's "
    "extra['severity'] 'normal' passes unchanged, so e.g. the Georgia normal with 0.1 EMG noise "
    "(poor_quality: hf_noise) goes out as severity normal"
)


@pytest.mark.xfail(strict=True, reason=TRIAGE_GAP)
def test_a_poor_ecg_gets_no_normal_severity_from_triage(registry: ModelRegistry) -> None:
    """The same promise for the triage model's severity: the README says every result keeps it."""
    called_normal = []
    for variant in VARIANTS:
        ecg = _noisy(*variant)
        if assess(ecg).acceptable:
            continue
        result = analyse_ecg(ecg, registry, ["triage"])
        (triage,) = [o for o in result.outputs if o.task != "measurements"]
        if triage.extra.get("severity") == "normal" or triage.extra.get("severity4") == "normal":
            called_normal.append(_variant_id(variant))
    assert not called_normal, f"poor ECGs triaged normal: {called_normal}"


MOTION_GAP = (
    "measured 2026-12-01 with diagnosis 0.1.0 and 0.1.1 (the same network; and the 0.2.0 training candidates): "
    "wfdb/00024_lr.hea with a 0.35-level "
    "motion burst makes the model call CD (0.1.0: p=0.27 > 0.16) while only 2 leads exceed the burst ratio 2.2 "
    "(V2 2.18 at 1.8 would catch it, but 1.8 also marked 28 of 114 PTB-XL records with PVCs / AF as poor); "
    "a short electrode-motion burst and an ectopic beat look alike to this gate"
)

#: Measured misses of the gate, by (variant, diagnosis ONNX sha256): strict xfails that lapse when the model changes.
KNOWN_GATE_MISSES = {
    ("wfdb/00024_lr.hea:motion:0.35", "953d229b07bd5c1baa6c30f38ddfc1429d4c7443c007946ffc29d48cd7dc153a"): MOTION_GAP,
}


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_gate_flags_every_noisy_normal_the_model_calls_abnormal(
    shipped: LoadedModel, request: pytest.FixtureRequest, variant: tuple[str, str, float]
) -> None:
    """Where noise does fool the model (NORM lost or a disease class above threshold), the result says poor."""
    name = _variant_id(variant)
    reason = KNOWN_GATE_MISSES.get((name, shipped.manifest.sha256))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    ecg = _noisy(*variant)
    findings = {f.code: f for f in shipped.run(ecg).findings}
    fooled = not findings["NORM"].present or any(f.present for c, f in findings.items() if c != "NORM")
    assert not (fooled and assess(ecg).acceptable), (
        f"noise changed the model's call but the gate said acceptable: {name}"
    )
