#!/usr/bin/env bash
# The maintained-project checks: import contracts (the rooms of docs/architecture.md), ruff lint and
# format, mypy (strict on core and mapping). Run by scripts/test.sh before the tests, hence by CI.
# Static tools cannot follow setuptools' editable import hook, so they read build/pkgtree, a tree of
# links that mirrors the installed package (scripts/pkgtree.py); paths in messages are mapped back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(cd "$(dirname "$PY")" && pwd)
"$PY" scripts/pkgtree.py build/pkgtree >/dev/null
back() { sed -E 's#build/pkgtree/ecgbridge/(core|errors\.py|cli\.py|service\.py|broker\.py|__init__\.py|__main__\.py)#ecgbridge/\1#; s#build/pkgtree/ecgbridge/##'; }
status=0
echo "== import contracts (import-linter)"
# from build/, so the real ecgbridge/ folder (without its mapped subpackages) is not on sys.path
(cd build && PYTHONPATH="$PWD/pkgtree" "$BIN/lint-imports" ../pyproject.toml --no-cache) | sed -n '/^Contracts$/,$p' || status=1
echo "== ruff check"
"$BIN/ruff" check . || status=1
echo "== ruff format --check"
"$BIN/ruff" format --check . >/dev/null || { "$BIN/ruff" format --check . | tail -n 20 || true; status=1; }
echo "== mypy"
"$BIN/mypy" 2>&1 | back || status=1
exit $status
