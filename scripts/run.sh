#!/usr/bin/env bash
# Install ecgbridge (runtime only: no torch) into .venv and run it on its embedded defaults:
# embedded Redis broker, SQLite store, DICOM on 127.0.0.1:11112, data in ./ecgbridge-data.
# Extra arguments go to `ecgbridge run` (e.g. --config config/my.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e .
exec .venv/bin/ecgbridge run "$@"
