"""The long fuzz run: the properties of tests/fuzz with many more cases, every failure collected.

CI runs about 2,000 cases per target with a fixed seed (tests/fuzz); this runs
100,000 per target by default, with a seed of your choice, and does not stop at the
first failure: each distinct failure (exception type and the product line it came
from) is counted and its first input written to ``--out`` (to be kept as a regression
fixture under tests/fixtures/fuzz/). Exit status 1 when anything was found.

    python -m bench.fuzz [--cases 100000] [--target dicom hl7 xml mllp ehr] [--case hl7.inbound]
                         [--seed 0] [--out bench/out/fuzz]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.configuration import set_hypothesis_home_dir

REPO = Path(__file__).resolve().parents[1]
_PRODUCT = ("mapping", "gateway", "ecgbridge", "outbound", "worker", "inference")

__all__ = ["main", "run_case", "Finding"]


@dataclass
class Finding:
    """One distinct failure: how often it happened and where its first input was written."""

    signature: str
    count: int = 0
    example: Path | None = None
    message: str = ""


@dataclass
class CaseReport:
    name: str
    cases: int = 0
    seconds: float = 0.0
    findings: dict[str, Finding] = field(default_factory=dict)


def _signature(exc: BaseException) -> str:
    """Type and the innermost product frame (a crash inside handle_message: its cause's)."""
    cause = exc.__cause__ if exc.__cause__ is not None and type(exc).__name__ == "NoAnswer" else None
    inner = cause or exc
    frames = traceback.extract_tb(inner.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    for frame in frames:
        path = Path(frame.filename).resolve()
        if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in _PRODUCT:
            where = f"{path.relative_to(REPO)}:{frame.lineno}"
    if cause is None and type(exc).__name__ == "NoAnswer":
        return f"NoAnswer: {str(exc).split(':', 1)[0]}"
    return f"{type(inner).__name__} at {where}"


def run_case(case: Any, cases: int, rng_seed: int, out: Path) -> CaseReport:
    """Run one fuzz case for ``cases`` examples; failures are collected, not raised."""
    report = CaseReport(case.name)

    def record(value: Any, exc: BaseException) -> None:
        key = _signature(exc)
        finding = report.findings.setdefault(key, Finding(key, message=f"{type(exc).__name__}: {exc}"[:300]))
        finding.count += 1
        if finding.example is None:
            suffix, data = case.dump(value)
            out.mkdir(parents=True, exist_ok=True)
            finding.example = out / f"{case.name}-{len(report.findings)}{suffix}"
            finding.example.write_bytes(data)

    @seed(rng_seed)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case.strategy)
    def fuzz(value: Any) -> None:
        report.cases += 1
        try:
            case.run(value)
        except Exception as exc:
            record(value, exc)

    started = time.monotonic()
    fuzz()
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases per target (default 100000)")
    parser.add_argument("--target", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--case", nargs="*", help="single cases to run, e.g. hl7.inbound (overrides --target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "fuzz")
    args = parser.parse_args(argv)

    set_hypothesis_home_dir(REPO / "build" / "hypothesis")
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("ecgbridge").setLevel(logging.CRITICAL)  # the HL7 check reads the handler's own records
    from tests.fuzz.targets import CASES, TARGETS

    targets = args.target or list(TARGETS)
    chosen = [c for c in CASES if (c.name in args.case if args.case else c.target in targets)]
    if not chosen:
        parser.error("no such target or case")
    shares: dict[str, int] = Counter()
    for case in CASES:
        shares[case.target] += case.ci_examples
    print(f"fuzz: seed {args.seed}, {args.cases} cases per target, failures to {args.out}", flush=True)
    found = 0
    totals: Counter[str] = Counter()
    for case in chosen:
        n = args.cases if args.case else max(1, round(args.cases * case.ci_examples / shares[case.target]))
        report = run_case(case, n, args.seed, args.out)
        totals[case.target] += report.cases
        rate = report.cases / report.seconds if report.seconds else 0.0
        print(
            f"{case.name:16} {report.cases:8d} cases {report.seconds:8.1f} s ({rate:6.0f}/s) "
            f"{len(report.findings)} distinct failure(s)",
            flush=True,
        )
        for finding in report.findings.values():
            found += 1
            print(
                f"    {finding.count:6d} x {finding.signature}\n           {finding.message}\n           -> {finding.example}"
            )
    print("total: " + ", ".join(f"{t} {n} cases" for t, n in totals.items()) + f"; {found} distinct failure(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
