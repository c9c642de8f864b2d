"""The LVEF four-tier model: feature rows, the manifest reader, ONNX parity, serving, and a tiny train + evaluate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.errors import ModelError
from ecgbridge.inference.features import measure
from ecgbridge.inference.lvef import LVEF_DIR, LvefModel, choose_variant
from ecgbridge.inference.lvef_features import (
    ECG_FEATURE_NAMES,
    FEATURE_NAMES,
    FEATURE_SPECS,
    LVEF_TIERS,
    lvef_feature_row,
    tier_index,
)
from ecgbridge.mapping.ehr_context import EHR_VALUE_NAMES, EhrContext, EhrValue
from ecgbridge.mapping.wfdb_record import read_wfdb
from ecgbridge.training.datasets.lvef import LvefManifestError, patient_split, read_manifest
from tests.support.peers import need

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wfdb"


def _features(name: str) -> dict:
    return measure(read_wfdb(FIXTURES / name)).features()


def _ehr() -> EhrContext:
    return EhrContext(
        status="complete",
        age_years=71.0,
        sex="female",
        values={
            "nt_probnp": EhrValue("nt_probnp", 4200.0, "pg/mL", "33762-6", None),
            "egfr": EhrValue("egfr", 48.0, EHR_VALUE_NAMES["egfr"], "98979-8", None),
        },
        conditions={"heart_failure": True, "diabetes": False},
        medications={"loop_diuretic": True},
    )


# --------------------------------------------------------------------------- feature row


def test_feature_specs_are_fixed_and_complete() -> None:
    assert FEATURE_NAMES == tuple(s.name for s in FEATURE_SPECS)
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert FEATURE_NAMES[: len(ECG_FEATURE_NAMES)] == ECG_FEATURE_NAMES
    for name in EHR_VALUE_NAMES:
        spec = next(s for s in FEATURE_SPECS if s.name == name)
        assert spec.kind == "ehr" and spec.unit == EHR_VALUE_NAMES[name]
    assert {s.kind for s in FEATURE_SPECS} == {"ecg", "ehr"}


def test_feature_row_from_a_real_lbbb_fixture() -> None:
    feats = _features("00730_lr")  # PTB-XL 730: complete LBBB, z-scored
    row = lvef_feature_row(feats, {"MI": 0.1, "CD": 0.9}, None)
    assert list(row) == list(FEATURE_NAMES)
    assert row["lbbb"] == 1.0 and row["rbbb"] == 0.0
    assert row["qrs_duration"] == pytest.approx(feats["qrs_duration"]) and row["qrs_duration"] >= 120
    assert row["ecg_heart_rate"] == pytest.approx(feats["heart_rate"])
    assert row["p_CD"] == 0.9 and math.isnan(row["p_NORM"])
    # z-scored: no amplitudes, so the amplitude features are missing, not zero
    for name in ("sokolow_lyon", "cornell", "q_wave_leads", "st_depression_max", "low_voltage", "qrs_axis"):
        assert math.isnan(row[name]), name
    # no EHR: every EHR variable is missing
    assert all(math.isnan(row[s.name]) for s in FEATURE_SPECS if s.kind == "ehr")


def test_feature_row_from_a_millivolt_fixture_and_ehr() -> None:
    feats = _features("E07506")  # challenge record, real mV
    row = lvef_feature_row(feats, None, _ehr())
    assert row["sokolow_lyon"] == pytest.approx(feats["sokolow_lyon"])
    assert row["q_wave_leads"] == len(feats["q_waves"])
    assert row["t_inversion_leads"] == len(feats["t_inversion"])
    assert row["low_voltage"] == 0.0
    assert row["nt_probnp"] == 4200.0 and row["egfr"] == 48.0 and math.isnan(row["bnp"])
    assert row["age_years"] == 71.0 and row["sex_female"] == 1.0
    assert row["hx_heart_failure"] == 1.0 and row["hx_diabetes"] == 0.0 and math.isnan(row["hx_hypertension"])
    assert row["med_loop_diuretic"] == 1.0 and math.isnan(row["med_beta_blocker"])


def test_feature_row_survives_failed_measurements() -> None:
    row = lvef_feature_row(None, None, None)
    assert list(row) == list(FEATURE_NAMES) and all(math.isnan(v) for v in row.values())


def test_tiers() -> None:
    assert [tier_index(v) for v in (75, 50.1, 50, 40, 39.9, 30, 29.9, 10)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t.code for t in LVEF_TIERS] == ["LVEF_GT50", "LVEF_40_50", "LVEF_30_40", "LVEF_LT30"]


# --------------------------------------------------------------------------- manifest reader


def _csv(tmp_path: Path, header: str, *rows: str) -> Path:
    p = tmp_path / "m.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def _hea(tmp_path: Path) -> str:
    return os.path.relpath(FIXTURES / "00024_lr.hea", tmp_path)


def test_manifest_reads_rows_ehr_and_split(tmp_path: Path) -> None:
    hea = _hea(tmp_path)
    p = _csv(
        tmp_path,
        "ecg_path,lvef_percent,patient_id,split,age_years,sex,nt_probnp,hx_heart_failure,med_beta_blocker",
        f"{hea},55,p1,test,70,male,350,0,1",
        f"{hea},25.5,p2,,,,,,",
    )
    a, b = read_manifest(p)
    assert a.split == "test" and a.tier == 0 and a.ehr is not None
    assert a.ehr.values["nt_probnp"].value == 350 and a.ehr.conditions == {"heart_failure": False}
    assert a.ehr.medications == {"beta_blocker": True} and a.ehr.sex == "male"
    assert b.ehr is None and b.tier == 3 and b.split == patient_split("p2")


@pytest.mark.parametrize(
    ("header", "row", "expected"),
    [
        ("ecg_path,lvef_percent,patient_id", "missing.hea,55,p1", ["line 2", "'ecg_path'", "missing.hea", "not found"]),
        ("ecg_path,lvef_percent,patient_id", "{hea},92,p1", ["line 2", "'lvef_percent'", "92", "5-85"]),
        ("ecg_path,lvef_percent,patient_id", "{hea},0.55,p1", ["line 2", "'lvef_percent'", "written as 55"]),
        (
            "ecg_path,lvef_percent,patient_id,nt_pro_bnp",
            "{hea},55,p1,300",
            ["line 1", "'nt_pro_bnp'", "unknown column"],
        ),
        ("ecg_path,lvef_percent", "{hea},55", ["line 1", "'patient_id'", "required"]),
        ("ecg_path,lvef_percent,patient_id,split", "{hea},55,p1,holdout", ["line 2", "'split'", "holdout"]),
        ("ecg_path,lvef_percent,patient_id,hx_diabetes", "{hea},55,p1,maybe", ["line 2", "'hx_diabetes'", "1/0"]),
        ("ecg_path,lvef_percent,patient_id,creatinine", "{hea},55,p1,high", ["line 2", "'creatinine'", "not a number"]),
        ("ecg_path,lvef_percent,patient_id,sex", "{hea},55,p1,M", ["line 2", "'sex'", "female"]),
    ],
)
def test_manifest_errors_name_line_and_column(tmp_path: Path, header: str, row: str, expected: list[str]) -> None:
    p = _csv(tmp_path, header, row.format(hea=_hea(tmp_path)))
    with pytest.raises(LvefManifestError) as err:
        read_manifest(p)
    for text in expected:
        assert text in str(err.value)


def test_manifest_split_must_be_patient_level(tmp_path: Path) -> None:
    hea = _hea(tmp_path)
    p = _csv(tmp_path, "ecg_path,lvef_percent,patient_id,split", f"{hea},55,p1,train", f"{hea},45,p1,test")
    with pytest.raises(LvefManifestError, match="line 3.*both 'train' and 'test'"):
        read_manifest(p)


# --------------------------------------------------------------------------- shipped model: parity and serving


def _random_rows(model: LvefModel, variant: str, n: int, seed: int = 0) -> np.ndarray:
    """Plausible feature values (per-feature ranges) with NaN holes, plus an all-NaN row."""
    rng = np.random.default_rng(seed)
    ranges = {
        "ecg_heart_rate": (40, 160),
        "pr_interval": (100, 300),
        "qrs_duration": (70, 190),
        "qtc_fridericia": (350, 520),
        "qrs_axis": (-90, 180),
        "nt_probnp": (10, 20000),
        "bnp": (5, 3000),
        "troponin": (1, 200),
        "potassium": (3, 6),
        "sodium": (125, 148),
        "creatinine": (0.5, 4),
        "egfr": (10, 120),
        "hemoglobin": (8, 17),
        "systolic_bp": (85, 190),
        "diastolic_bp": (45, 110),
        "heart_rate": (40, 150),
        "weight": (40, 140),
        "height": (145, 200),
        "bmi": (16, 45),
        "age_years": (20, 95),
    }
    names = model.features(variant)
    x = np.empty((n, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        lo, hi = ranges.get(name, (0.0, 1.0))
        col = rng.uniform(lo, hi, n)
        if name in ("lbbb", "rbbb", "low_voltage", "p_wave_inconsistent", "sex_female") or name.startswith(
            ("hx_", "med_")
        ):
            col = np.round(col)
        x[:, j] = col
    x[rng.random(x.shape) < 0.3] = np.nan
    return np.concatenate([x, np.full((1, len(names)), np.nan, dtype=np.float32)])


@pytest.mark.parametrize("variant", ["ecg+ehr", "ecg-only"])
def test_onnx_matches_lightgbm_including_nan(variant: str) -> None:
    model = LvefModel.load()
    x = _random_rows(model, variant, 400)
    assert np.isnan(x).any(axis=1).sum() > 300
    p_onnx = model.predict_proba(x, variant)
    import lightgbm as lgb

    spec = model.manifest.variants[variant]
    booster = lgb.Booster(model_file=str(LVEF_DIR / spec.booster))
    p_lgb = booster.predict(x.astype(np.float64))
    assert p_onnx.shape == (len(x), 4)
    assert float(np.max(np.abs(p_onnx - p_lgb))) < 1e-5
    assert np.allclose(p_onnx.sum(axis=1), 1.0, atol=1e-5)


def test_shipped_model_is_marked_synthetic() -> None:
    model = LvefModel.load()
    assert model.manifest.synthetic and "synthetic" in model.manifest.notice.lower()
    first = (LVEF_DIR / "MODEL_CARD.md").read_text().splitlines()[0].lower()
    assert "synthetic" in first and "means nothing clinically" in first
    for v in model.manifest.variants.values():
        for fname in v.sha256:
            assert (LVEF_DIR / fname).stat().st_size < 400_000


def test_predict_with_ehr_uses_ecg_ehr_and_names_ehr_variables() -> None:
    from ecgbridge.inference.models import ModelRegistry

    ecg = read_wfdb(FIXTURES / "00730_lr")
    diagnosis = ModelRegistry().get("diagnosis").run(ecg)
    out = LvefModel.load().predict(measure(ecg).features(), diagnosis, _ehr())
    assert out.task == "lvef" and out.model == "lvef-synthetic" and out.version
    assert [f.code for f in out.findings] == [t.code for t in LVEF_TIERS]
    assert sum(f.present for f in out.findings) == 1
    assert sum(f.probability for f in out.findings) == pytest.approx(1.0, abs=1e-4)
    best = max(out.findings, key=lambda f: f.probability)
    assert best.present and out.extra["tier"] == best.code and out.extra["tier_display"] == best.display
    assert out.extra["variant"] == "ecg+ehr" and out.extra["ehr_status"] == "complete"
    assert out.extra["synthetic"] is True and "synthetic" in out.extra["notice"].lower()
    attrs = out.extra["attributions"]
    assert 0 < len(attrs) <= 8
    assert {"feature", "display", "kind", "value", "unit", "contribution"} <= set(attrs[0])
    assert any(a["kind"] == "ehr" for a in attrs)
    assert abs(attrs[0]["contribution"]) >= abs(attrs[-1]["contribution"])
    assert any("BNP" in note for note in out.extra["missing_context"])  # BNP was not given
    json.dumps(out.extra)  # JSON-safe (stored with the result)


@pytest.mark.parametrize("ehr", [None, EhrContext.missing("unavailable", "EHR timed out after 5 s")])
def test_predict_without_ehr_is_ecg_only(ehr: EhrContext | None) -> None:
    out = LvefModel.load().predict(_features("00024_lr"), {"NORM": 0.9, "MI": 0.02}, ehr)
    assert out.extra["variant"] == "ecg-only" == choose_variant(ehr)
    assert all(a["kind"] == "ecg" for a in out.extra["attributions"])
    assert out.extra["ehr_status"] == ("not_configured" if ehr is None else "unavailable")
    if ehr is not None:
        assert "EHR timed out after 5 s" in out.extra["missing_context"]


def test_load_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        LvefModel.load(tmp_path / "nowhere")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no manifest.json"):
        LvefModel.load(tmp_path / "m")
    manifest = json.loads((LVEF_DIR / "manifest.json").read_text())
    manifest["variants"]["ecg-only"]["features"][0] = "not_a_feature"
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not_a_feature"):
        LvefModel.load(tmp_path / "m")


# --------------------------------------------------------------------------- end to end, fixtures only


def test_train_and_evaluate_on_a_tiny_fixture_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ecgbridge.training import lvef_evaluate, lvef_model
    from ecgbridge.training.lvef_synthetic import folder_sources, generate_cohort

    csv_path = tmp_path / "cohort" / "tiny.csv"
    summary = generate_cohort(folder_sources(FIXTURES), csv_path, seed=1, replicas=40)
    assert summary["rows"] == 160 and (tmp_path / "cohort" / "tiny.features.json").is_file()
    assert (
        generate_cohort(folder_sources(FIXTURES), tmp_path / "again.csv", seed=1, replicas=40)["tiers"]
        == summary["tiers"]
    )
    out = tmp_path / "model"
    rc = lvef_model.main(
        [
            "--manifest",
            str(csv_path),
            "--synthetic",
            "--out",
            str(out),
            "--threads",
            "1",
            "--max-rounds",
            "15",
            "--min-data-in-leaf",
            "5",
            "--bootstrap",
            "20",
        ]
    )
    assert rc == 0
    for name in (
        "manifest.json",
        "ecg_ehr.onnx",
        "ecg_only.onnx",
        "ecg_ehr.lgb.txt",
        "ecg_only.lgb.txt",
        "MODEL_CARD.md",
    ):
        assert (out / name).is_file(), name
    card = (out / "MODEL_CARD.md").read_text()
    assert card.splitlines()[0].startswith("# lvef-synthetic") and "SYNTHETIC" in card.splitlines()[0]
    assert "Quadratic weighted kappa" in card and "Confusion matrix" in card
    capsys.readouterr()
    rc = lvef_evaluate.main(
        ["--model", str(out), "--manifest", str(csv_path), "--split", "all", "--bootstrap", "20", "--json"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 160 and report["model"]["synthetic"] is True
    served = report["evaluations"]["served"]
    assert served["n"] == 160 and len(served["tiers"]) == 4 and np.array(served["confusion"]).sum() == 160
    model = LvefModel.load(out)
    row = model.predict(_features("00622_lr"), None, _ehr())
    assert row.extra["variant"] == "ecg+ehr"
    assert any("diagnosis" in n for n in row.extra["missing_context"])


# --------------------------------------------------------------------------- with the shared data (optional)


def _shared_data() -> Path:
    base = os.environ.get("ECGBRIDGE_SHARED_DATA")
    return (Path(base) if base else Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def test_synthetic_cohort_follows_its_documented_associations(tmp_path: Path) -> None:
    root = _shared_data()
    if not (root / "ptbxl-subset" / "ptbxl_database.csv").is_file():
        need(f"shared data not found at {root} (set ECGBRIDGE_SHARED_DATA); skipping the PTB-XL cohort test")
    from scipy.stats import spearmanr

    from ecgbridge.training.lvef_synthetic import generate_cohort, ptbxl_sources

    sources = ptbxl_sources(root / "ptbxl-subset")[:250]
    csv_path = tmp_path / "ptbxl.csv"
    generate_cohort(sources, csv_path, seed=0)
    records = read_manifest(csv_path)
    assert len(records) == 250
    ages = [r.ehr.age_years for r in records if r.ehr is not None and r.ehr.age_years is not None]
    assert ages and all(0 <= a <= 90 for a in ages)  # PTB-XL's real ages (300 = "over 89" -> 90)
    pairs = [
        (r.lvef_percent, r.ehr.values["nt_probnp"].value)
        for r in records
        if r.ehr is not None and "nt_probnp" in r.ehr.values
    ]
    rho = spearmanr(*zip(*pairs)).statistic
    assert rho < -0.4, rho  # high NT-proBNP goes with a low EF
    assert {r.split for r in records} <= {"train", "val", "test"}
    assert 0.1 < sum(r.ehr is None for r in records) / len(records) < 0.3  # ~20 % with no EHR at all
