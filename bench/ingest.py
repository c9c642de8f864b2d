"""DICOM ingest rate: objects per second accepted by ecgbridge's gateway and by DCMTK's storescp.

Same files (copies of the real 12-lead ECG, about 290 kB each), same storescu
client, same run. "Accepted" for ecgbridge means written and fsync'ed, decoded
and checked as an ECG, recorded in SQLite, routed and its id enqueued on Redis
before the success status; storescp just writes the file (no fsync).

    python -m bench.ingest [--n 200] [--associations 1 4]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.processes import EcgbridgeProcess, RedisServer, free_port, wait_for, write_config

from .common import make_ecg_files, require, time_storescu


def _storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "ANY-SCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(
        lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True).returncode == 0,
        15,
        0.1,
        "storescp",
    )
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="objects per measurement")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        require(tool)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = make_ecg_files(tmp / "in", args.n)
        size_kb = files[0].stat().st_size / 1024
        rows = []
        redis = RedisServer().start()
        try:
            for assocs in args.associations:
                port = free_port()
                scp = _storescp(port, tmp / f"scp{assocs}")
                try:
                    dcmtk_s = time_storescu(port, files, associations=assocs)
                finally:
                    scp.terminate()
                    scp.wait()

                port = free_port()
                cfg = write_config(
                    tmp / f"gw{assocs}.yaml",
                    {
                        "data_dir": str(tmp / f"gwdata{assocs}"),
                        "listeners": {"dicom": {"port": port}, "mllp": {"enabled": False}},
                        "broker": {"url": redis.url},
                        "log_level": "WARNING",
                    },
                )
                gw = EcgbridgeProcess(["gateway", "--config", str(cfg)], tmp / f"gw{assocs}.log").start()
                try:
                    wait_for(
                        lambda: (
                            subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True).returncode == 0
                        ),
                        60,
                        0.2,
                        "the ecgbridge gateway",
                    )
                    ours_s = time_storescu(port, files, associations=assocs)
                finally:
                    gw.stop()
                rows.append((assocs, args.n / dcmtk_s, args.n / ours_s))
        finally:
            redis.stop()

    print(f"DICOM ingest, {args.n} x 12-lead ECG ({size_kb:.0f} kB each), storescu client, {time.strftime('%Y-%m-%d')}")
    print(f"{'associations':>12}  {'DCMTK storescp obj/s':>21}  {'ecgbridge obj/s':>16}  {'ecgbridge/DCMTK':>15}")
    for assocs, dcmtk, ours in rows:
        print(f"{assocs:>12}  {dcmtk:>21.1f}  {ours:>16.1f}  {ours / dcmtk:>15.2f}")


if __name__ == "__main__":
    main()
