"""Unit tests of inference.preprocess: the one path shared by training and serving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.inference.preprocess import DEFAULT_SPEC, Bandpass, FixLength, Pipeline, Resample, ZScore
from tests.support.peers import need


def _shared_ptbxl() -> Path:
    base = os.environ.get("ECGBRIDGE_SHARED_DATA")
    root = Path(base) if base else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return root.resolve() / "ptbxl-subset"


def _dominant_hz(x: np.ndarray, fs: float) -> float:
    spectrum = np.abs(np.fft.rfft(x - x.mean()))
    return float(np.fft.rfftfreq(x.size, 1.0 / fs)[np.argmax(spectrum)])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize("fs,n", [(100.0, 1000), (250.0, 2500), (500.0, 5000), (1000.0, 10000), (500.0, 5500)])
def test_default_pipeline_maps_any_rate_to_12_by_1000_at_100hz(rng: np.random.Generator, fs: float, n: int) -> None:
    x = rng.normal(size=(12, n))
    y, fs_out = Pipeline.from_spec(DEFAULT_SPEC).apply(x, fs)
    assert y.shape == (12, 1000)
    assert y.dtype == np.float32
    assert fs_out == 100.0


def test_short_signal_is_zero_padded_at_the_end(rng: np.random.Generator) -> None:
    y, fs = FixLength(1000).apply(rng.normal(size=(12, 600)).astype(np.float32), 100.0)
    assert y.shape == (12, 1000) and fs == 100.0
    assert np.all(y[:, 600:] == 0.0)


def test_fs_travels_with_the_signal(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2, 5000))
    assert Bandpass().apply(x, 500.0)[1] == 500.0
    assert ZScore().apply(x, 500.0)[1] == 500.0
    assert FixLength(1000).apply(x, 500.0)[1] == 500.0
    y, fs = Resample(100.0).apply(x, 500.0)
    assert fs == 100.0 and y.shape == (2, 1000)
    same, fs_same = Resample(100.0).apply(x[:, :1000], 100.0)
    assert fs_same == 100.0 and np.allclose(same, x[:, :1000])


def test_zscore_is_idempotent_and_standardises_each_lead(rng: np.random.Generator) -> None:
    x = rng.normal(loc=3.0, scale=[[0.1], [2.0], [50.0]], size=(3, 1000))
    once, _ = ZScore().apply(x, 100.0)
    twice, _ = ZScore().apply(once, 100.0)
    assert np.allclose(once.mean(axis=1), 0.0, atol=1e-5)
    assert np.allclose(once.std(axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(twice - once)) < 1e-5


def test_flat_lead_stays_zero_without_nan(rng: np.random.Generator) -> None:
    x = rng.normal(size=(12, 1000))
    x[4] = 0.7  # a disconnected lead: constant
    y, _ = Pipeline.from_spec(DEFAULT_SPEC).apply(x, 100.0)
    assert np.all(np.isfinite(y))
    assert np.allclose(y[4], 0.0, atol=1e-6)
    assert np.allclose(y[0].std(), 1.0, atol=1e-4)


def test_nan_samples_do_not_propagate(rng: np.random.Generator) -> None:
    x = rng.normal(size=(12, 1000))
    x[2, 100:110] = np.nan
    y, _ = Pipeline.from_spec(DEFAULT_SPEC).apply(x, 100.0)
    assert np.all(np.isfinite(y))


def test_resampling_a_1000hz_sine_to_100hz_keeps_its_frequency() -> None:
    fs = 1000.0
    t = np.arange(int(10 * fs)) / fs
    sine = np.sin(2 * np.pi * 7.0 * t)[None]
    y, fs_out = Resample(100.0).apply(sine, fs)
    assert fs_out == 100.0 and y.shape == (1, 1000)
    assert _dominant_hz(y[0], fs_out) == pytest.approx(7.0, abs=0.1)
    # Amplitude survives too (no aliasing or attenuation in the pass band).
    assert np.max(np.abs(y[0, 100:-100])) == pytest.approx(1.0, abs=0.05)


def test_resampling_removes_content_above_the_new_nyquist() -> None:
    fs = 1000.0
    t = np.arange(int(10 * fs)) / fs
    tone = np.sin(2 * np.pi * 5.0 * t) + np.sin(2 * np.pi * 120.0 * t)  # 120 Hz would alias to 20 Hz
    y, _ = Resample(100.0).apply(tone[None], fs)
    spectrum = np.abs(np.fft.rfft(y[0]))
    freqs = np.fft.rfftfreq(y.shape[1], 1.0 / 100.0)
    assert spectrum[np.argmin(np.abs(freqs - 20.0))] < 0.05 * spectrum[np.argmin(np.abs(freqs - 5.0))]


def test_bandpass_removes_baseline_wander_and_keeps_qrs_band() -> None:
    fs = 500.0
    t = np.arange(int(10 * fs)) / fs
    wander = 2.0 * np.sin(2 * np.pi * 0.1 * t)
    signal = np.sin(2 * np.pi * 10.0 * t)
    y, _ = Bandpass().apply((wander + signal)[None], fs)
    core = slice(1000, -1000)  # filtfilt with a short pad leaves a transient of about 1 s at each edge
    assert np.max(np.abs(y[0, core] - signal[core])) < 0.05


def test_spec_round_trips_and_unknown_steps_are_rejected() -> None:
    assert Pipeline.from_spec(DEFAULT_SPEC).spec() == DEFAULT_SPEC
    with pytest.raises(ValueError, match="unknown preprocessing step"):
        Pipeline.from_spec([{"step": "notch", "hz": 50}])


def test_pipeline_is_near_idempotent_on_already_processed_ptbxl_subset() -> None:
    root = _shared_ptbxl()
    if not (root / "ptbxl_database.csv").is_file():
        need(f"shared PTB-XL subset not found at {root} (set ECGBRIDGE_SHARED_DATA)")
    wfdb = pytest.importorskip("wfdb")
    record = wfdb.rdrecord(str(root / "records100" / "00000" / "00009_lr"))
    x = record.p_signal.T.astype(np.float32)
    pipeline = Pipeline.from_spec(DEFAULT_SPEC)
    y, fs = pipeline.apply(x, float(record.fs))
    assert fs == 100.0 and y.shape == (12, 1000)
    # Its publisher already band-passed and z-scored it: the shape of the signal barely changes.
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99
