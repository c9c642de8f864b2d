"""The soak, short: 100 ECGs through a whole deployment under every fault of ``bench/soak.py``; nothing lost.

The CI version of issue 11's soak: the same code as the benchmark (``bench.soak.run_soak``)
with 100 ECGs instead of 1000, a 1-minute FHIR outage instead of 5 and worker A killed every
25 analysed ECGs instead of every 100, two ECGs a second. It takes about three to four minutes. The data directory is a
tmpfs mounted for the run (the disk-full fault fills it for real), so it needs root; without
root it skips, and under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import SoakPlan, run_soak
from tests.support.fhir_server import node_available
from tests.support.peers import need, needs
from tests.support.processes import redis_binary

pytestmark = [pytest.mark.integration, needs(node_available())]

CI_PLAN = SoakPlan(
    n=100,
    rate_per_s=2.0,
    kill_every=25,
    fhir_outage_s=60.0,
    hl7_ae_s=20.0,
    disk_full_s=15.0,
    disk_size="512m",
    drain_timeout_s=600.0,
    claim_s=60.0,  # a test EHR answers in milliseconds: a killed worker's claim may lapse sooner
    judge_memory=False,  # 100 ECGs are too few to tell a leak from a late cache; bench.soak judges 1000
)


def test_soak_under_every_fault_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    if redis_binary() is None:
        need("no redis-server binary (apt-get install redis-server)")
    if os.geteuid() != 0:
        need("the soak fills a tmpfs it mounts for the data directory: mounting needs root")
    report = run_soak(CI_PLAN, tmp_path)
    print(report.text())
    assert report.passed, report.text()
    assert (report.acknowledged, report.lost, report.duplicates, report.stored_twice) == (100, 0, 0, 0), report.text()
    assert report.acknowledged == report.delivered_exactly_once + report.dead_lettered
    faults = " ".join(report.faults)
    for fault in ("worker A SIGKILLed", "FHIR server unreachable", "Redis SIGKILLed", "gateway stopped", "answers AE"):
        assert fault in faults, f"the fault '{fault}' did not happen: {faults}"
    assert "file system full" in faults and report.answers_while_disk_full, "no ECG was sent while the disk was full"
    assert report.acked_while_disk_full_not_stored == 0
