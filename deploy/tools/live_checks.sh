# Sourced by deploy/test.sh: the checks that run eastwest binaries and a real Prometheus on
# 127.0.0.1. They use test.sh's log/pass/fail, its WORK, BIN, PY, KUBECTL, MANIFESTS, KIALI,
# DEPLOY, PROXY and RENDERED, and loopback.sh's free_port, http_get, wait_for and PIDS.
# shellcheck shell=bash

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
