"""training.calibration (temperature, ECE, thresholds, tiers), the focal loss and the artefact augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from ecgbridge.training.calibration import (
    apply_calibration,
    choose_tiers,
    ece,
    fit_calibration,
    fit_temperature,
    min_sensitivity_threshold,
    sigmoid,
    tier_of,
)


def test_fit_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, size=20000)
    y = (rng.random(true_logit.size) < sigmoid(true_logit)).astype(float)
    t = fit_temperature(y, 3.0 * true_logit)  # logits three times too confident
    assert t == pytest.approx(3.0, rel=0.1)


def test_fit_calibration_lowers_nll_and_ece_on_its_own_data() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, size=(400, 3))
    y = (rng.random(z.shape) < sigmoid(z)).astype(float)
    cal = fit_calibration(y, 4.0 * z, pos_weight=np.ones(3))
    assert cal["nll_after"] < cal["nll_before"]
    p = apply_calibration(4.0 * z, cal["temperature"], cal["offset"])
    assert ece(y, p)["mean"] < ece(y, sigmoid(4.0 * z))["mean"]
    assert set(cal["cv_nll"]) >= {"uncalibrated", "single temperature, offset none"}


def test_ece_is_zero_when_bins_match_frequencies() -> None:
    y = np.array([[1], [0], [1], [0]], dtype=float)
    p = np.full((4, 1), 0.5)
    assert ece(y, p)["mean"] == pytest.approx(0.0)
    assert ece(y, np.array([[1.0], [1.0], [1.0], [1.0]]))["pooled"] == pytest.approx(0.5)


def test_min_sensitivity_threshold_catches_the_required_share() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.15, 0.5, 0.6, 0.7, 0.9])
    out = min_sensitivity_threshold(y, s, 0.8)
    pred = s >= out["threshold"]
    assert pred[y == 1].mean() >= 0.8
    # without the rule the best-F1 threshold would drop the 0.15 positive; with 1.0 it must not
    assert (s >= min_sensitivity_threshold(y, s, 1.0)["threshold"])[y == 1].all()
    assert min_sensitivity_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]))["threshold"] == 0.5


def test_tiers_catch_95_percent_and_keep_high_specific() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(40), np.zeros(160)].astype(bool)
    s = np.r_[rng.uniform(0.3, 1.0, 40), rng.uniform(0.0, 0.7, 160)]
    t = choose_tiers(y, s, catch=0.95, specificity=0.95)
    assert t["moderate"] <= t["high"]
    assert np.mean(s[y] >= t["moderate"]) >= 0.95
    assert np.mean(s[~y] >= t["high"]) <= 0.05
    # the highest such cut-off: raising it past the next positive would miss too many
    assert tier_of(t["high"], t) == "high" and tier_of(t["moderate"], t) == "moderate" and tier_of(0.0, t) == "low"
    small = choose_tiers(np.array([1, 1, 1, 0, 0], bool), np.array([0.2, 0.5, 0.9, 0.1, 0.3]))
    assert small["caught_moderate_or_high"] == 3  # < 20 positives: every one of them


def test_focal_loss_reduces_to_bce_and_downweights_easy_examples() -> None:
    torch = pytest.importorskip("torch")
    from ecgbridge.training.train import FocalLoss

    logits = torch.tensor([[3.0, -2.0], [0.1, 0.4]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(float(bce), rel=1e-6)
    easy = FocalLoss(gamma=2.0)(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    hard = FocalLoss(gamma=2.0)(torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    assert float(easy) < 0.01 * float(hard)
    weighted = FocalLoss(gamma=0.0, pos_weight=torch.tensor([2.0]))(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    assert float(weighted) == pytest.approx(2 * np.log(2), rel=1e-6)


def test_augmentation_is_seeded_finite_and_goes_through_the_serving_pipeline() -> None:
    from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
    from ecgbridge.training.augment import AugmentConfig, Augmenter

    rng = np.random.default_rng(0)
    t = np.arange(1000) / 100.0
    x = np.stack([np.sin(2 * np.pi * 1.2 * t + k) for k in range(12)])[None].repeat(6, axis=0)
    x = Pipeline.from_spec(DEFAULT_SPEC).apply(x, 100.0)[0]
    cfg = AugmentConfig(p_flat=1.0)
    a = Augmenter(cfg)(x, np.random.default_rng(3))
    b = Augmenter(cfg)(x, np.random.default_rng(3))
    assert a.shape == x.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert (np.abs(a).max(axis=-1) == 0).sum(axis=-1).min() >= 1  # every record has a flat lead
    live = np.abs(a).max(axis=-1) > 0
    assert np.allclose(a.std(axis=-1)[live], 1.0, atol=1e-3)  # z-scored by the serving pipeline
    assert not np.allclose(a, x)
    del rng
