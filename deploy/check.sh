#!/bin/sh
# Checks the deployment files under deploy/, one line per check, and exits non-zero if any fails.
#
#   sh deploy/check.sh          (from the repository root, or from anywhere)
#
# Needs: kubectl with kustomize (1.32 here), kubernetes-validate (PyPI; it brings PyYAML and
# jsonschema, which deploy/check.py uses too) and promtool (Debian's prometheus package):
#   pip install kubernetes-validate
#   apt-get install --no-install-recommends prometheus
#
# What is checked:
#   - the kustomizations render (base, overlays/openshift, overlays/enforce);
#   - every rendered object of a built-in kind validates against the Kubernetes 1.32 schema,
#     strictly (unknown fields fail), with kubernetes-validate;
#   - ServiceMonitor, PrometheusRule and SecurityContextConstraints, which kubernetes-validate has
#     no schema for, validate against structural subsets of their CRD schemas (check.py crds);
#   - the rendered objects agree with each other: selectors, ports, service account, SCC grants,
#     and what `meshguard flows --cluster` relies on (the agent API's port named api, its token
#     from a mounted Secret, the meshguard-viewer Role granting exactly the access it needs);
#   - least privilege: no Role or ClusterRole grants Secrets or a wildcard, the agent's only reads
#     pods and namespaces; the SCC allows exactly the DaemonSet's volume types, to its service
#     account alone; the host paths are the reviewed ones, read-only where they can be; a
#     NetworkPolicy limits who reaches each of the agent's ports;
#   - the PrometheusRule's groups equal deploy/prometheus/rules.yaml's;
#   - promtool check rules and promtool test rules;
#   - the rules and the Grafana dashboard use only metrics, labels and label values the agent
#     exports, and the dashboard parses and uses the ${DS_PROMETHEUS} data source.
set -u

KUBERNETES_VERSION=1.32
DEPLOY=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM
START=$(date +%s)
checks=0
failed=0

# run DESCRIPTION COMMAND...: runs the command, prints one line, and the command's output
# (indented) only when it fails.
run() {
    desc=$1
    shift
    checks=$((checks + 1))
    if "$@" >"$TMP/out" 2>&1; then
        printf 'ok    %s\n' "$desc"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s\n' "$desc"
        sed 's/^/      /' "$TMP/out"
    fi
}

# skip DESCRIPTION WHY: a check that could not run counts as failed.
skip() {
    checks=$((checks + 1))
    failed=$((failed + 1))
    printf 'FAIL  %s (not run: %s)\n' "$1" "$2"
}

tools() {
    missing=""
    command -v kubectl >/dev/null 2>&1 || missing="$missing kubectl"
    command -v promtool >/dev/null 2>&1 || missing="$missing promtool(apt:prometheus)"
    command -v python3 >/dev/null 2>&1 || missing="$missing python3"
    python3 -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null ||
        missing="$missing python3-modules(pip:kubernetes-validate)"
    if [ -n "$missing" ]; then
        echo "missing:$missing"
        return 1
    fi
}

# The CLI where pip put it on PATH, else the module of the python3 that has it.
kubernetes_validate() {
    if command -v kubernetes-validate >/dev/null 2>&1; then
        kubernetes-validate "$@"
    else
        python3 -m kubernetes_validate "$@"
    fi
}

# Strict validation of the built-in kinds. --quiet prints only problems, so any output (such as
# "Couldn't find schema" for a misspelt apiVersion, which would otherwise pass) is a failure.
validate_builtin() {
    builtin="${1%.yaml}-builtin-kinds.yaml"
    python3 "$DEPLOY/check.py" builtin "$1" "$builtin" || return 1
    kubernetes_validate --kubernetes-version "$KUBERNETES_VERSION" --strict --quiet \
        "$builtin" >"$TMP/kv" 2>&1
    rc=$?
    cat "$TMP/kv"
    [ "$rc" -eq 0 ] && [ ! -s "$TMP/kv" ]
}

run "tools: kubectl, promtool, python3 with kubernetes-validate" tools
if [ "$failed" -ne 0 ]; then
    echo "check.sh: install the missing tools first (see the top of $0)"
    exit 1
fi

for target in base overlays/openshift overlays/enforce; do
    out="$TMP/$(echo "$target" | tr / _).yaml"
    validate="$target: built-in kinds valid (kubernetes-validate -k $KUBERNETES_VERSION --strict)"
    crds="$target: ServiceMonitor, PrometheusRule, SCC valid by structure"
    consistent="$target: objects consistent (selectors, ports, service account, SCC, API access)"
    privilege="$target: least privilege (RBAC, SCC, host paths, NetworkPolicy)"
    groups="$target: PrometheusRule groups = prometheus/rules.yaml"
    run "$target: kubectl kustomize renders" sh -c 'kubectl kustomize "$1" >"$2"' \
        sh "$DEPLOY/$target" "$out"
    if [ ! -s "$out" ]; then
        for c in "$validate" "$crds" "$consistent" "$privilege" "$groups"; do
            skip "$c" "did not render"
        done
        continue
    fi
    run "$validate" validate_builtin "$out"
    run "$crds" python3 "$DEPLOY/check.py" crds "$out"
    run "$consistent" python3 "$DEPLOY/check.py" consistency "$out"
    run "$privilege" python3 "$DEPLOY/check.py" privilege "$out"
    run "$groups" python3 "$DEPLOY/check.py" groups "$out" "$DEPLOY/prometheus/rules.yaml"
done

# The removal DaemonSet: renders, validates, and runs `meshguard uninstall`.
out="$TMP/uninstall.yaml"
run "uninstall: kubectl kustomize renders" sh -c 'kubectl kustomize "$1" >"$2"' \
    sh "$DEPLOY/uninstall" "$out"
if [ -s "$out" ]; then
    run "uninstall: built-in kinds valid (kubernetes-validate -k $KUBERNETES_VERSION --strict)" \
        validate_builtin "$out"
    run "uninstall: runs meshguard uninstall, not labelled as an agent" \
        python3 "$DEPLOY/check.py" uninstall "$out"
else
    skip "uninstall: built-in kinds valid" "did not render"
    skip "uninstall: runs meshguard uninstall, not labelled as an agent" "did not render"
fi

run "promtool check rules prometheus/rules.yaml" \
    promtool check rules "$DEPLOY/prometheus/rules.yaml"
run "promtool test rules prometheus/rules-test.yaml" \
    promtool test rules "$DEPLOY/prometheus/rules-test.yaml"
run "rules use only the agent's metrics, labels and values" \
    python3 "$DEPLOY/check.py" promql "$DEPLOY/prometheus/rules.yaml"
run "grafana-dashboard.json parses, uses \${DS_PROMETHEUS} and only the agent's metrics" \
    python3 "$DEPLOY/check.py" dashboard "$DEPLOY/base/grafana-dashboard.json"

elapsed=$(($(date +%s) - START))
if [ "$failed" -ne 0 ]; then
    echo "check.sh: $failed of $checks checks FAILED (${elapsed}s)"
    exit 1
fi
echo "check.sh: all $checks checks passed (${elapsed}s)"
