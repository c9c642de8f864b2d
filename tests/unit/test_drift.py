"""Drift: each week's inputs and positive calls against the reference weeks, by PSI; exported to /metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from ecgbridge.cli import main
from ecgbridge.core.drift import PSI_ALERT, drift_report, last_days, record_ecg_stats
from ecgbridge.core.store import EcgStatsRow, MessageStore, ResultRow
from ecgbridge.mapping.ecg import AnalysisResult
from ecgbridge.mapping.readers import read_ecg_file
from tests.conftest import FIXTURES
from tests.unit.test_explain import result_with

START = datetime(2026, 9, 7, 9, 0, tzinfo=UTC)  # a Monday


def _site(store: MessageStore, now: datetime) -> None:
    """Five quiet weeks, then a sixth with a new cart (lower amplitudes) and fewer normal calls."""
    rng = np.random.default_rng(0)
    with store.session() as s, s.begin():
        for week in range(6):
            new_cart = week == 5
            for i in range(60):
                at = START + timedelta(weeks=week, hours=2 * i)
                mid = f"m-{week}-{i}"
                s.add(
                    EcgStatsRow(
                        message_id=mid,
                        analysed_at=at,
                        route="all-ecg",
                        fs=500.0,
                        n_leads=12,
                        duration_s=10.0,
                        device="NEW CART 2" if new_cart else "MAC 5500",
                        source_format="dicom",
                        amplitude_mv=float(rng.normal(0.9 if new_cart else 1.6, 0.15)),
                        quality_flags=["baseline_wander"] if i % 10 == 0 else [],
                    )
                )
                normal = rng.random() < (0.2 if new_cart else 0.5)
                result = result_with({"NORM": 0.9 if normal else 0.1}, model="diagnosis")
                s.add(ResultRow(message_id=mid, models="diagnosis@0.1.1", result=result.to_dict(), created_at=at))


def test_a_new_cart_and_fewer_normal_calls_show_in_the_week_they_came(tmp_path: Path) -> None:
    store = MessageStore(f"sqlite:///{tmp_path / 's.db'}", tmp_path)
    store.create_schema()
    now = START + timedelta(weeks=6)
    _site(store, now)
    report = drift_report(store, now=now)
    assert report["reference"]["n"] == 240 and report["reference"]["since"].startswith("2026-09-07")
    quiet, shifted = report["weeks"]
    assert (quiet["week"], shifted["week"]) == ("2026-10-05", "2026-10-12")
    assert quiet["statistics"]["amplitude_mv"]["psi"] < 0.1 and quiet["statistics"]["device"]["psi"] < 0.1
    assert shifted["statistics"]["amplitude_mv"]["psi"] > PSI_ALERT
    assert shifted["statistics"]["device"]["psi"] > PSI_ALERT
    assert shifted["statistics"]["fs_hz"]["psi"] < 0.01  # what did not change stays quiet
    normal = shifted["statistics"]["positive:diagnosis/NORM"]
    assert normal["current"] < normal["reference"] and normal["psi"] > 0.1
    assert shifted["statistics"]["flag:baseline_wander"]["psi"] < 0.1
    recent = last_days(store, now=now)
    assert recent["amplitude_mv"]["psi"] > PSI_ALERT


def test_drift_is_exported_to_metrics_and_printed_by_the_cli(tmp_path: Path, capsys) -> None:
    from tests.unit.test_metrics import _context, _samples, _scrape

    store = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data")
    store.create_schema()
    _site(store, datetime.now(UTC))
    # the sixth week is the last seven days
    with store.session() as s, s.begin():
        shift = datetime.now(UTC) - (START + timedelta(weeks=6))
        for row in s.query(EcgStatsRow):
            row.analysed_at = row.analysed_at + shift
    samples = _samples(_scrape(_context(store))[0])
    assert samples[("ecgbridge_drift_psi", frozenset({("statistic", "amplitude_mv")}))] > PSI_ALERT
    assert samples[("ecgbridge_output_positive_rate", frozenset({("model", "diagnosis"), ("class", "NORM")}))] < 0.4
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nstorage:\n  database_url: sqlite:///{tmp_path / 'store.db'}\n")
    assert main(["drift", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "amplitude_mv" in out and " *" in out


def test_the_worker_records_what_the_ecg_looked_like(tmp_path: Path) -> None:
    store = MessageStore(f"sqlite:///{tmp_path / 's.db'}", tmp_path)
    store.create_schema()
    ecg = read_ecg_file(FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm")
    result = AnalysisResult("m-1", (), quality_flags=("baseline_wander:V4",))
    record_ecg_stats(store, "m-1", ecg, result, "all-ecg")
    record_ecg_stats(store, "m-1", ecg, result, "all-ecg")  # a re-analysis replaces its row
    with store.session() as s:
        (row,) = s.query(EcgStatsRow).all()
    assert (row.fs, row.n_leads, row.route, row.quality_flags) == (ecg.fs, 12, "all-ecg", ["baseline_wander"])
    assert 0.3 < row.amplitude_mv < 5.0 and row.duration_s == ecg.duration_s
