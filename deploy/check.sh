#!/usr/bin/env bash
# Check the deployment files offline, without a Docker engine or a cluster:
#  - every Kubernetes manifest in kubernetes/ against the Kubernetes OpenAPI schemas that
#    kubernetes-validate ships (--strict: an unknown or misspelt field fails), for each
#    Kubernetes version in K8S_VERSIONS;
#  - kubernetes/keda.yaml (KEDA's ScaledObject, a custom resource kubernetes-validate has no
#    schema for) against schemas/keda-scaledobject.schema.json, and kustomization.yaml
#    against schemas/kustomization.schema.json (check-jsonschema);
#  - compose.yaml against the Compose specification schema vendored in check-jsonschema
#    (--builtin-schema vendor.compose-spec; nothing is downloaded);
#  - where kubectl is installed, the kustomization as `kubectl apply -k` renders it.
# How these files agree with each other and with the code (ports published, listeners on
# 0.0.0.0, the inbox, every setting loading, the queue KEDA watches) is
# tests/unit/test_deploy.py. scripts/test.sh runs this script before pytest (so CI does).
#
# Exit 0: every check passed; 1: a check failed; 3: kubernetes-validate or check-jsonschema
# is not installed (both are in the `test` extra: pip install -c constraints.txt -e '.[test]').
# KUBERNETES_VALIDATE, CHECK_JSONSCHEMA and KUBECTL name other binaries.
set -uo pipefail
cd "$(dirname "$0")"
K8S_VERSIONS=${K8S_VERSIONS:-"1.30 1.37"}

# The repository's virtual environment first (scripts/test.sh installs there), then PATH.
tool() {
    local override=$1 name=$2
    if [ -n "$override" ]; then echo "$override"
    elif [ -x "../.venv/bin/$name" ]; then echo "../.venv/bin/$name"
    elif command -v "$name" >/dev/null 2>&1; then command -v "$name"
    fi
}
KV=$(tool "${KUBERNETES_VALIDATE:-}" kubernetes-validate)
CJ=$(tool "${CHECK_JSONSCHEMA:-}" check-jsonschema)
missing=()
{ [ -n "$KV" ] && command -v "$KV" >/dev/null 2>&1; } || missing+=(kubernetes-validate)
{ [ -n "$CJ" ] && command -v "$CJ" >/dev/null 2>&1; } || missing+=(check-jsonschema)
if [ ${#missing[@]} -gt 0 ]; then
    echo "deploy/check.sh: ${missing[*]} not found: the deployment files were NOT checked" \
         "(pip install -c constraints.txt -e '.[test]', or set KUBERNETES_VALIDATE / CHECK_JSONSCHEMA)" >&2
    exit 3
fi

status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# kubernetes-validate only warns about a kind it has no schema for; here that is a failure,
# except for the kinds given (checked against our own schema below).
validate_k8s() {  # validate_k8s VERSION KINDS_CHECKED_ELSEWHERE(regex, or NONE) FILE...
    local version=$1 elsewhere=$2; shift 2
    local out rc=0
    out=$("$KV" --strict --quiet -k "$version" "$@" 2>&1) || rc=1
    out=$(printf '%s\n' "$out" | grep -Ev "Couldn't find schema for kind ($elsewhere) " || true)
    [ -n "$out" ] && printf '%s\n' "$out"
    if printf '%s\n' "$out" | grep -q "Couldn't find schema"; then
        echo "   a kind above has no schema here: add one under schemas/ and check it like keda.yaml" >&2
        rc=1
    fi
    return $rc
}

manifests=()
for f in kubernetes/*.yaml; do
    case "$(basename "$f")" in
        kustomization.yaml|keda.yaml) ;;
        *) manifests+=("$f") ;;
    esac
done
for version in $K8S_VERSIONS; do
    echo "== kubernetes-validate --strict, Kubernetes $version: ${manifests[*]}"
    validate_k8s "$version" NONE "${manifests[@]}" || status=1
done

echo "== check-jsonschema: kubernetes/keda.yaml (KEDA ScaledObject) against schemas/keda-scaledobject.schema.json"
"$CJ" --schemafile schemas/keda-scaledobject.schema.json kubernetes/keda.yaml || status=1

echo "== check-jsonschema: kubernetes/kustomization.yaml against schemas/kustomization.schema.json"
"$CJ" --schemafile schemas/kustomization.schema.json kubernetes/kustomization.yaml || status=1

echo "== check-jsonschema: compose.yaml against the Compose specification (vendor.compose-spec)"
"$CJ" --builtin-schema vendor.compose-spec compose.yaml || status=1

KC=$(tool "${KUBECTL:-}" kubectl)
if [ -n "$KC" ] && command -v "$KC" >/dev/null 2>&1; then
    echo "== kubectl kustomize kubernetes, the result validated (Kubernetes ${K8S_VERSIONS##* }; its ScaledObject: above)"
    if "$KC" kustomize kubernetes >"$tmp/rendered.yaml"; then
        validate_k8s "${K8S_VERSIONS##* }" "ScaledObject" "$tmp/rendered.yaml" || status=1
    else
        status=1
    fi
else
    echo "== kubectl not found: the kustomization was not rendered (its schema was checked above)"
fi

if [ $status -eq 0 ]; then
    echo "deploy/check.sh: all deployment files passed"
else
    echo "deploy/check.sh: FAILED (see above)" >&2
fi
exit $status
