"""Importing an archive: ECG files stored per second by ``ecgbridge import``, analysed per second by the workers.

    python -m bench.archive [--n 300] [--workers 2]

N copies of the real Mortara 12-lead DICOM ECG (each its own SOP Instance UID) in a folder;
a real redis-server, W ``ecgbridge worker --queues analysis`` processes and an ``ecgbridge
gateway``; ``ecgbridge import --no-deliver`` run as a user would. Beside it, in the same run:
copying the same files with ``cp`` and fsync (what storing them costs at the least) and the
same number of bare processes doing the workers' analysis of the same ECGs (decode, the
diagnosis model with the quality gate and measurements, the CAMs; no store, no broker): what
the analysis costs at the least. No report is drawn in either (``--no-deliver``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.processes import REPO, RedisServer
from tests.support.stack import Stack

from .common import make_ecg_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="analysis worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = make_ecg_files(tmp / "archive", args.n)
        copied = _copy_with_fsync(files, tmp / "copy")
        analyse_only = _analyse_processes(files[: 20 * args.workers], args.workers)
        redis = RedisServer().start()
        stack = Stack(tmp=tmp / "stack", broker_url=redis.url)
        try:
            for _ in range(args.workers):
                stack.start_worker("analysis")
            stack.start_gateway()
            started = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "ecgbridge", "import", "--config", str(stack.config), "--no-deliver", "--json"]
                + [str(tmp / "archive")],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            stored_s = time.monotonic() - started
            summary = json.loads(out.stdout)
            stack.wait_state("analysed", count=args.n, timeout_s=60 + args.n)
            analysed_s = time.monotonic() - started
        finally:
            stack.stop()
            redis.stop()
    print(
        f"import of {args.n} DICOM ECGs (284 kB each), {args.workers} analysis worker(s), {time.strftime('%Y-%m-%d')}"
    )
    print(f"  ecgbridge import: {summary['stored']} stored in {stored_s:.1f} s = {args.n / stored_s:.1f} files/s")
    print(
        f"  all analysed after {analysed_s:.1f} s = {args.n / analysed_s:.1f} ECG/s "
        "(diagnosis and its heatmaps; no report drawn: --no-deliver, no destination wants one)"
    )
    print(f"  peer, cp + fsync of the same files: {args.n / copied:.1f} files/s")
    print(
        f"  peer, the same analysis in {args.workers} bare process(es) (decode, diagnosis, CAMs; no store, "
        f"no broker), warm: {analyse_only:.1f} ECG/s"
    )


def _copy_with_fsync(files: list[Path], folder: Path) -> float:
    import os
    import shutil

    folder.mkdir()
    started = time.monotonic()
    for f in files:
        target = folder / f.name
        shutil.copyfile(f, target)
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.monotonic() - started


def _analyse_processes(files: list[Path], processes: int) -> float:
    """ECGs per second of ``ecgbridge analyse`` over ``files`` in ``processes`` processes (start-up excluded)."""
    chunks = [files[i::processes] for i in range(processes)]
    code = (
        "import sys,time; from pathlib import Path; from ecgbridge.mapping.readers import read_ecg_file; "
        "from ecgbridge.inference.models import ModelRegistry; from ecgbridge.inference.pipeline import analyse_ecg; "
        "from ecgbridge.inference.explain import cams_for; r=ModelRegistry(); "
        "e=read_ecg_file(Path(sys.argv[1])); analyse_ecg(e, r, ['diagnosis']); t=time.perf_counter(); "
        "[(analyse_ecg(x, r, ['diagnosis']), cams_for(r.signal_model('diagnosis'), x)) "
        "for x in (read_ecg_file(Path(p)) for p in sys.argv[1:])]; print(time.perf_counter()-t)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *map(str, chunk)], stdout=subprocess.PIPE, text=True)
        for chunk in chunks
    ]
    seconds = max(float(p.communicate()[0].strip()) for p in procs)
    return len(files) / seconds


if __name__ == "__main__":
    main()
