#!/usr/bin/env bash
# Check the Prometheus alerting rules: syntax (promtool check rules) and behaviour (promtool test rules).
# Exit 0: both pass; 1: a check failed; 3: promtool is not installed (Debian/Ubuntu: apt-get install prometheus).
set -uo pipefail
cd "$(dirname "$0")"
PROMTOOL=${PROMTOOL:-promtool}
if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
    echo "check.sh: promtool not found (apt-get install prometheus, or set PROMTOOL=/path/to/promtool)" >&2
    exit 3
fi
status=0
echo "== promtool check rules alerts.yml"
"$PROMTOOL" check rules alerts.yml || status=1
echo "== promtool test rules alerts.test.yml"
"$PROMTOOL" test rules alerts.test.yml || status=1
if command -v python3 >/dev/null 2>&1; then
    echo "== grafana-dashboard.json is valid JSON"
    python3 -m json.tool grafana-dashboard.json >/dev/null || status=1
fi
exit $status
