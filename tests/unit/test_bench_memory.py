"""bench.memory's measuring: a child's peak is its own, not its parent's; the verdicts follow the targets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.memory import Mem, descendants, mem, run_measured, targets


def test_peak_of_a_command_is_its_own_not_the_parents(tmp_path: Path) -> None:
    ballast = bytearray(os.urandom(1)) * (120 * 2**20)  # the parent resident at 120 MB or more
    parent = mem(os.getpid())
    assert parent is not None and parent.rss > 120
    _, small = run_measured(["true"], tmp_path / "true.peak")
    _, big = run_measured(
        [sys.executable, "-c", "b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096])"], tmp_path / "big.peak"
    )
    assert small < 20, small  # the kernel's ru_maxrss of a plain child would read >= the parent's 120 MB
    assert 64 < big < 120, big
    del ballast


def test_mem_and_descendants_of_this_process() -> None:
    here = mem(os.getpid())
    assert here is not None and 0 < here.rss <= here.hwm
    assert mem(2**22 + 7) is None  # above the kernel's pid_max: never a process
    assert os.getpid() not in descendants(os.getpid())


def test_verdicts_follow_the_targets() -> None:
    stack = {
        "gateway": Mem(149.0, 212.0),
        "gateway_children": [],
        "worker_parent": Mem(190.0, 190.0),
        "worker_children": [(11, Mem(260.0, 401.0))],
    }
    imports = {"runs": [{"n": 1000, "peak": 148.0}, {"n": 10000, "peak": 170.0}]}
    lines = targets(stack, imports)
    gateway = next(line for line in lines if "gateway" in line)
    assert "<= 150: met" in gateway and "212.0 MB <= 150: MISSED" in gateway
    assert "parent" in lines[2] and lines[2].endswith("met")
    assert "pool child 11" in lines[3] and lines[3].endswith("MISSED")  # its peak, 401 MB, is over 400
    assert "<= 300: met" in lines[4] and lines[4].endswith(
        "constant (10000 vs 1000 files: +22.0 MB, allowed 10): MISSED"
    )
