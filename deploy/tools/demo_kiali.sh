#!/usr/bin/env bash
# The real demo as Kiali sees it (issue 16), for deploy/test.sh:
#
#   deploy/tools/demo_kiali.sh BIN_DIR PYTHON WORK_DIR
#
# 1. starts Debian's prometheus with the eastwest-proxy job of monitoring/prometheus-scrape.yaml
#    (1 s interval) pointed at a fixed loopback port, and waits until it is ready;
# 2. runs a short `eastwest-bench demo` whose gateway serves /metrics on that port and lingers
#    after its report until told to stop (SIGTERM);
# 3. for every scenario of its results.json, runs Kiali's TCP-edge queries (kiali_edge.py) over
#    that scenario's time window, as Kiali's graph does for that queryTime and duration: the
#    edge istio-eastwestgateway -> sglang.demo.svc.cluster.local with non-zero bytes for each
#    15443 and 15008 (ambient) scenario, polled with a deadline; over the direct scenario, which
#    bypasses the gateway while Prometheus scrapes it, the same check must fail;
# 4. the gateway's connection counters add up on both listeners (opened == closed once the
#    clients are gone), `promtool check metrics` on its /metrics; then stops the demo.
#
# Prints `ok   ...` / `FAIL ...` per check (deploy/test.sh counts them); exits 1 on any FAIL.
set -uo pipefail

TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY="$(dirname "$TOOLS")"
BIN=$1 PY=$2 WORK=$3
KIALI=("$PY" "$TOOLS/kiali_edge.py")
SOURCE_WORKLOAD=istio-eastwestgateway
SERVICE=sglang.demo.svc.cluster.local
FAILED=0
PIDS=()

pass() { printf 'ok   %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$*"; }

# free_port, http_get, wait_for, stop_pids
source "$TOOLS/loopback.sh"
trap stop_pids EXIT

# Instant query $1 (at Unix time $2, if given): one `{labels} value` line per series; fails on
# an empty result.
prom_query() {
  "$PY" - "http://127.0.0.1:$PROM_PORT/api/v1/query" "$1" "${2:-}" 2>/dev/null <<'EOF'
import json, sys, urllib.parse, urllib.request
url, query, at = sys.argv[1:4]
params = {"query": query} | ({"time": at} if at else {})
with urllib.request.urlopen(url + "?" + urllib.parse.urlencode(params), timeout=2) as r:
    result = json.load(r)["data"]["result"]
for s in result:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s["metric"].items()))
    print(f"{{{labels}}} {s['value'][1]}")
sys.exit(0 if result else 1)
EOF
}

# Succeeds when the gateway's connections add up on both listeners: opened == closed, each
# listener present. Prints opened/closed per listener.
connections_add_up() {
  local opened closed
  opened="$(prom_query 'sum by (listener) (eastwest_connections_opened_total{job="eastwest-proxy"})' | sort)" || return 1
  closed="$(prom_query 'sum by (listener) (eastwest_connections_closed_total{job="eastwest-proxy"})' | sort)" || return 1
  [ "$opened" = "$closed" ] && grep -q hbone <<<"$opened" && grep -q tls <<<"$opened" || return 1
  printf '%s' "$opened" | tr '\n' ' '
}

METRICS_PORT="$(free_port)"
PROM_PORT="$(free_port)"
"$PY" "$TOOLS/manifests.py" prometheus-test-config "$DEPLOY/monitoring/prometheus-scrape.yaml" \
  "$WORK/prometheus.yml" "eastwest-proxy=127.0.0.1:$METRICS_PORT" || exit 1
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
PIDS+=("$PROM_PID")
# Scraping before the demo starts (its target is down until then; Prometheus hands new
# targets to its scrapers some seconds after start), so every scenario is covered.
if ! wait_for 60 "$PROM_PID" prom_query 'up{job="eastwest-proxy"}'; then
  fail "Prometheus not scraping the demo's port within 60s; its log:"
  tail -5 "$WORK/prometheus.log"
  exit 1
fi

# A short demo: 4 requests per scenario, 2 in flight, 48 tokens at 25 ms, so each scenario
# spans several 1 s scrapes (about 3.5 s each, 20 s in all in a debug build).
"$BIN/eastwest-bench" demo --disable-tqdm --rtt 10ms --ttft 20ms --itl 25ms --num-prompts 4 \
  --concurrency 2 --input-len 32 --output-len 48 --metrics-address "127.0.0.1:$METRICS_PORT" \
  --linger 300s --out "$WORK/demo-out" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
PIDS+=("$DEMO_PID")
if wait_for 180 "$DEMO_PID" test -s "$WORK/demo-out/results.json"; then
  pass "eastwest-bench demo ran its scenarios with its gateway's /metrics on 127.0.0.1:$METRICS_PORT"
else
  fail "the demo wrote no results.json within 180s (or exited); its log:"
  tail -20 "$WORK/demo.log"
  exit 1
fi

mapfile -t WINDOWS < <("${KIALI[@]}" windows "$WORK/demo-out/results.json")
if [ "${#WINDOWS[@]}" != 5 ]; then
  fail "expected 5 scenario windows in results.json, got ${#WINDOWS[@]}"
fi
# The edge over every cross-region scenario (15443 kept-alive and cold, 15008 warm and cold).
for line in "${WINDOWS[@]}"; do
  read -r cross at window name <<<"$line"
  [ "$cross" = 1 ] || continue
  edge=("${KIALI[@]}" check "http://127.0.0.1:$PROM_PORT" demo "$SOURCE_WORKLOAD" "$SERVICE" \
    "$at" "$window")
  if [ "$window" -lt 2 ]; then
    fail "$name lasted under 2 s: too short for rate() over 1 s scrapes"
  elif wait_for 30 "$DEMO_PID" "${edge[@]}"; then
    pass "Kiali's TCP-edge queries over '$name': $("${edge[@]}")"
  else
    fail "no $SOURCE_WORKLOAD -> $SERVICE edge from Kiali's queries over '$name' within 30s:"
    "${edge[@]}" || true
  fi
done
# ... and none over the direct scenario: the gateway was up and scraped, but saw no traffic.
for line in "${WINDOWS[@]}"; do
  read -r cross at window name <<<"$line"
  [ "$cross" = 0 ] || continue
  edge=("${KIALI[@]}" check "http://127.0.0.1:$PROM_PORT" demo "$SOURCE_WORKLOAD" "$SERVICE" \
    "$at" "$window")
  # At least one good scrape in the window: the gateway exported no istio_tcp_ series then.
  scraped="$(prom_query "max_over_time(up{job=\"eastwest-proxy\"}[${window}s])" "$at")"
  if [ "${scraped##* }" != 1 ]; then
    fail "the gateway was not scraped during '$name' (up: ${scraped:-none}): no negative test"
  elif "${edge[@]}" >/dev/null 2>&1; then
    fail "Kiali's queries show a gateway edge over '$name', which bypasses the gateway: $("${edge[@]}")"
  else
    pass "over '$name' (gateway up and scraped, no traffic through it) the same check fails, as it must"
  fi
done

if wait_for 30 "$DEMO_PID" connections_add_up; then
  pass "connections opened == closed per listener once the demo's clients are gone: $(connections_add_up)"
else
  fail "the gateway's connection counters do not add up within 30s:"
  prom_query '{__name__=~"eastwest_connections_(opened|closed)_total|eastwest_hbone_streams_(opened|closed)_total", job="eastwest-proxy"}' |
    grep -v ' 0$' || true
fi

# What the gateway counted in Istio's families, 15443 (source_principal unknown: passthrough
# sees no certificate) apart from 15008 (the source ztunnel's SPIFFE ID).
for family in connections_opened connections_closed received_bytes sent_bytes; do
  echo "istio_tcp_${family}_total by source_principal:" \
    "$(prom_query "sum by (source_principal) (istio_tcp_${family}_total{job=\"eastwest-proxy\"})" | tr '\n' ' ')"
done

if http_get "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/demo-scrape.txt" &&
  promtool check metrics <"$WORK/demo-scrape.txt" >"$WORK/demo-check-metrics.log" 2>&1; then
  pass "promtool check metrics: the demo gateway's /metrics ($(grep -c '^istio_tcp_' "$WORK/demo-scrape.txt") istio_tcp_ series)"
else
  fail "promtool check metrics on the demo gateway's /metrics:"
  head -20 "$WORK/demo-check-metrics.log"
fi

# Told to stop, the lingering demo shuts down cleanly.
kill -TERM "$DEMO_PID"
deadline=$((SECONDS + 30))
while kill -0 "$DEMO_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 0.2
done
if kill -0 "$DEMO_PID" 2>/dev/null; then
  fail "the demo did not stop within 30s of SIGTERM"
elif wait "$DEMO_PID"; then
  PIDS=("$PROM_PID")
  pass "the lingering demo stopped on SIGTERM and exited 0"
else
  fail "the demo exited non-zero; its log:"
  tail -20 "$WORK/demo.log"
fi
[ "$FAILED" = 0 ]
