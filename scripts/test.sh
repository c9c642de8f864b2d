#!/usr/bin/env bash
# Install ecgbridge with its test and training extras into .venv, install the FHIR server peer
# (Medplum, from the npm registry) and run the whole test suite. Tests whose peers are missing
# (redis-server, DCMTK, node, PostgreSQL, ../shared/data) skip with a message saying what is missing;
# .ci/run installs those peers first. Before the tests, scripts/lint.sh checks the import contracts,
# ruff and mypy (docs/architecture.md). Extra arguments go to pytest. The tests run in as many
# pytest-xdist processes as there are cores (ECGBRIDGE_TEST_PROCESSES, default auto; 0 runs them in
# this process), a test file at a time per process, so a file's fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test,train]'
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/fhir_server --no-audit --no-fund --loglevel=error
  npm ci --prefix tests/oidc_provider --no-audit --no-fund --loglevel=error
else
  echo "npm not found: the FHIR server and OpenID Connect provider tests will be skipped" >&2
fi
bash scripts/lint.sh
# The Prometheus alert rules and their unit tests (promtool, Debian's prometheus package).
rc=0; bash deploy/monitoring/check.sh || rc=$?
if [ "$rc" -eq 3 ]; then echo "promtool not found: the alert rules were not checked (apt-get install prometheus)" >&2
elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
rc=0; bash deploy/check.sh || rc=$?; if [ "$rc" -eq 3 ]; then echo "deploy/check.sh: a schema validator is missing: the deployment files were not checked" >&2; elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
exec .venv/bin/python -m pytest -n "${ECGBRIDGE_TEST_PROCESSES:-auto}" --dist loadfile --durations=30 "$@"
