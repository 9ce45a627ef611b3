#!/usr/bin/env bash
# Compares, in one run on loopback, a direct connection with eastwest-proxy, nginx
# (stream + ssl_preread) and haproxy (mode tcp + req.ssl_sni), all routing the same Istio SNI
# to the same mTLS backend. Prints a Markdown table (and writes it to $OUT if set).
#
# Pinning (2-core box): the gateway runs alone on core $GW_CPU; the load generator AND the
# backend share core $LG_CPU. Gateway CPU comes from /proc/<pid>/stat (utime+stime, summed
# over the gateway's processes) before and after each phase, RSS from /proc/<pid>/status.
#
#   bench/compare/run.sh                       # everything, ~5 minutes
#   PHASE_SECS=3 TARGETS="eastwest nginx" bench/compare/run.sh
#   PHASES="connect" TARGETS="eastwest nginx" ROUNDS=5 bench/compare/run.sh   # one figure only
# Target `floor` (not in the default set) is proxy/examples/splice_floor.rs: no gateway, the least
# a user-space relay can do (one thread, level-triggered epoll, splice, nothing else); target
# `tokio-floor` is proxy/examples/tokio_floor.rs, the least a relay on tokio does.
# The targets themselves are started by gateways.sh, shared with wrk.sh.
#
# Needs: nginx with the stream module (Debian: libnginx-mod-stream), haproxy, taskset, jq,
# python3. Builds eastwest-proxy and the loadgen example in release mode unless SKIP_BUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROXY=${PROXY:-$TARGET_DIR/release/eastwest-proxy}
LOADGEN=${LOADGEN:-$TARGET_DIR/release/examples/loadgen}

TARGETS=${TARGETS:-"direct eastwest nginx nginx-halfclose haproxy haproxy-splice"}
PHASES=${PHASES:-"idle latency keepalive connect bulk large"}
PHASE_SECS=${PHASE_SECS:-4}
# Every target is measured ROUNDS times, interleaved; the report shows medians.
ROUNDS=${ROUNDS:-3}
LG_CPU=${LG_CPU:-0}
GW_CPU=${GW_CPU:-1}
KEEPALIVE_CONNS=${KEEPALIVE_CONNS:-64}
CONNECT_CONNS=${CONNECT_CONNS:-16}
BULK_CONNS=${BULK_CONNS:-4}
REQUEST_SIZE=${REQUEST_SIZE:-256}
RESPONSE_SIZE=${RESPONSE_SIZE:-1024}
# The "large" phase: request/response with big responses on a few kept-alive connections
# (wrk fetching 1 MiB files): each response starts on a quiet connection, unlike "bulk"'s one
# endless stream, so it shows what a gateway does while a direction ramps up.
LARGE_CONNS=${LARGE_CONNS:-4}
LARGE_RESPONSE_SIZE=${LARGE_RESPONSE_SIZE:-1048576}
# The "stream" phase (not in the default PHASES): kept-alive requests each answered as a token
# stream, STREAM_RECORDS records of STREAM_RECORD_SIZE bytes, each written and flushed alone
# STREAM_GAP_US apart (the case token timing follows; compare eastwest with eastwest-notiming).
STREAM_CONNS=${STREAM_CONNS:-64}
STREAM_RECORDS=${STREAM_RECORDS:-128}
STREAM_RECORD_SIZE=${STREAM_RECORD_SIZE:-100}
STREAM_GAP_US=${STREAM_GAP_US:-1000}
IDLE_CONNS=${IDLE_CONNS:-10000}
PORT_BASE=${PORT_BASE:-18400}
OUT=${OUT:-}
# Niceness for everything measured (gateway, load generator, backend), the same for all: keeps
# background compiles on this shared box from preempting the run. 0 when not root.
PRIO=${PRIO:--15}
SNI=outbound_.8000_._.bench.svc.cluster.local

BACKEND_ADDR=127.0.0.1:$((PORT_BASE + 1))
EASTWEST_ADDR=127.0.0.1:$((PORT_BASE + 2))
EASTWEST_ADMIN=127.0.0.1:$((PORT_BASE + 3))
NGINX_ADDR=127.0.0.1:$((PORT_BASE + 4))
HAPROXY_ADDR=127.0.0.1:$((PORT_BASE + 5))
FLOOR_ADDR=127.0.0.1:$((PORT_BASE + 6))
FLOOR=${FLOOR:-$TARGET_DIR/release/examples/splice_floor}
TOKIO_FLOOR=${TOKIO_FLOOR:-$TARGET_DIR/release/examples/tokio_floor}
EASTWEST_TEMPLATE=eastwest.yaml.in

[ "$(id -u)" = 0 ] || PRIO=0
# Command prefixes (not functions, so `&` and $! give the measured process itself).
# SCHED=fifo runs everything measured SCHED_FIFO (the kernel's RT throttling still leaves 5%).
if [ "${SCHED:-fifo}" = fifo ]; then PRIO_CMD=(chrt -f 1); else PRIO_CMD=(nice -n "$PRIO"); fi
ON_GW=("${PRIO_CMD[@]}" taskset -c "$GW_CPU")
ON_LG=("${PRIO_CMD[@]}" taskset -c "$LG_CPU")
log() { echo "[compare $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=bench/compare/gateways.sh
source "$HERE/gateways.sh"

for tool in taskset jq python3 nginx haproxy; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || die "$tool not found"
done
export PATH=$PATH:/usr/sbin
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] ||
    die "nginx stream module missing: apt-get install libnginx-mod-stream"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building release eastwest-proxy, loadgen, splice_floor and tokio_floor (nice)"
    (cd "$ROOT" && nice cargo build --release -q -p eastwest-proxy --bin eastwest-proxy --example loadgen \
        --example splice_floor --example tokio_floor)
fi
[ -x "$PROXY" ] && [ -x "$LOADGEN" ] || die "missing $PROXY or $LOADGEN"

# Each proxied connection holds 2 fds in the gateway; raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
MAXCONN=$(((NOFILE - 100) / 2))
if [ "$IDLE_CONNS" -gt "$MAXCONN" ]; then
    log "fd hard limit $NOFILE allows $MAXCONN idle connections through a gateway, not $IDLE_CONNS"
    IDLE_CONNS=$MAXCONN
fi

WORK=$(mktemp -d /tmp/eastwest-compare.XXXXXX)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
ROUND=0
BACKEND_PID=
GATEWAY_PID=
CLIENT_PID=
cleanup() {
    for pid in $CLIENT_PID $GATEWAY_PID $BACKEND_PID; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

ports_free "$BACKEND_ADDR" "$EASTWEST_ADDR" "$EASTWEST_ADMIN" "$NGINX_ADDR" "$HAPROXY_ADDR" "$FLOOR_ADDR"

# fill DIR TEMPLATE LISTEN: writes DIR/TEMPLATE-without-.in with the @...@ filled in.
fill() {
    sed -e "s|@WORK@|$WORK|g" -e "s|@BACKEND@|$BACKEND_ADDR|g" -e "s|@NOFILE@|$NOFILE|g" \
        -e "s|@MAXCONN@|$MAXCONN|g" -e "s|@ADMIN@|$EASTWEST_ADMIN|g" \
        -e "s|@LISTEN@|$3|g" "$HERE/$2" >"$1/${2%.in}"
    echo "$1/${2%.in}"
}

client_args() {
    echo client --certs "$WORK/certs" --target "$ADDR" --sni "$SNI" \
        --request-size "$REQUEST_SIZE" --response-size "$RESPONSE_SIZE"
}
client() {
    # shellcheck disable=SC2046 # client_args has no spaces inside arguments
    timeout $((PHASE_SECS + 120)) "${ON_LG[@]}" "$LOADGEN" $(client_args) "$@"
}

# record TARGET PHASE CLIENT_JSON CPU_SECONDS [RSS_KIB RSS_BEFORE_KIB]
record() {
    jq -c --arg target "$1" --arg phase "$2" --argjson cpu "${4:-null}" \
        --argjson rss "${5:-null}" --argjson rss0 "${6:-null}" --argjson round "$ROUND" \
        '. + {target: $target, phase: $phase, round: $round, gw_cpu_s: $cpu, rss_kib: $rss, rss_before_kib: $rss0}' \
        <<<"$3" >>"$RESULTS"
}

# phase TARGET NAME CLIENT-ARGS...: runs the client, charging the gateway's CPU to it.
phase() {
    local target=$1 name=$2 before after json
    shift 2
    before=$([ -n "$GATEWAY_PID" ] && cpu_total_seconds "$GATEWAY_PID" || echo 0)
    json=$(client "$@") || die "$target $name: client failed"
    after=$([ -n "$GATEWAY_PID" ] && cpu_total_seconds "$GATEWAY_PID" || echo 0)
    local cpu=null
    [ -n "$GATEWAY_PID" ] && cpu=$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')
    record "$target" "$name" "$json" "$cpu"
    log "$target $name: $(jq -c '{requests_per_sec, connects_per_sec, mb_per_sec, p50_us, p99_us, errors}' <<<"$json") gateway cpu ${cpu}s"
    # Let closing connections settle before the next phase.
    sleep 0.5
}

# Opens IDLE_CONNS connections, each after one request, and reads the gateway's RSS.
idle_phase() {
    local target=$1 out=$WORK/$1-idle.json rss0 rss
    rss0=$(rss_kib "$GATEWAY_PID")
    # Not through client(): $! must be the load generator itself, so kill stops it.
    # shellcheck disable=SC2046
    "${ON_LG[@]}" "$LOADGEN" $(client_args) --mode idle --connections "$IDLE_CONNS" \
        --duration 120 >"$out" &
    CLIENT_PID=$!
    for _ in $(seq 1 1200); do
        [ -s "$out" ] && break
        kill -0 "$CLIENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -s "$out" ] || die "$target idle: client printed nothing"
    sleep 1
    rss=$(rss_kib "$GATEWAY_PID")
    kill "$CLIENT_PID" 2>/dev/null || true
    wait "$CLIENT_PID" 2>/dev/null || true
    CLIENT_PID=
    record "$target" idle "$(head -1 "$out")" null "$rss" "$rss0"
    log "$target idle: $(jq -c '{connections, errors}' "$out") RSS ${rss0} KiB -> ${rss} KiB"
    sleep 2
}

has_phase() { [[ " $PHASES " == *" $1 "* ]]; }

log "work dir $WORK; phases ${PHASE_SECS}s; gateway on CPU $GW_CPU, loadgen+backend on CPU $LG_CPU"
"$LOADGEN" certs --out "$WORK/certs"
"${ON_LG[@]}" "$LOADGEN" backend --listen "$BACKEND_ADDR" --certs "$WORK/certs" \
    2>"$WORK/backend.log" &
BACKEND_PID=$!
wait_port "$BACKEND_ADDR"

for ROUND in $(seq 1 "$ROUNDS"); do
    for target in $TARGETS; do
        log "== $target (round $ROUND of $ROUNDS)"
        start_gateway "$target"
        # Memory is the same every round (checked); measure it once, on a fresh gateway.
        if [ -n "$GATEWAY_PID" ] && [ "$ROUND" = 1 ] && has_phase idle && [ "$target" != haproxy-splice ]; then
            idle_phase "$target"
        fi
        ! has_phase latency ||
            phase "$target" latency --mode keepalive --connections 1 --duration "$PHASE_SECS"
        ! has_phase keepalive ||
            phase "$target" keepalive --mode keepalive --connections "$KEEPALIVE_CONNS" --duration "$PHASE_SECS"
        ! has_phase connect ||
            phase "$target" connect --mode connect --connections "$CONNECT_CONNS" --duration "$PHASE_SECS"
        ! has_phase bulk ||
            phase "$target" bulk --mode bulk --connections "$BULK_CONNS" --duration "$PHASE_SECS"
        ! has_phase stream ||
            RESPONSE_SIZE=$((STREAM_RECORDS * STREAM_RECORD_SIZE)) phase "$target" stream \
                --mode keepalive --connections "$STREAM_CONNS" --duration "$PHASE_SECS" \
                --record-size "$STREAM_RECORD_SIZE" --record-gap-us "$STREAM_GAP_US"
        ! has_phase large ||
            RESPONSE_SIZE=$LARGE_RESPONSE_SIZE phase "$target" large --mode keepalive \
                --connections "$LARGE_CONNS" --duration "$PHASE_SECS"
        stop_gateway
    done
done

{
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //');" \
        "kernel $(uname -r); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "$(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3)," \
        "eastwest-proxy $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')." \
        "${ROUNDS} rounds of ${PHASE_SECS}s phases (medians shown); keep-alive ${KEEPALIVE_CONNS} connections, connect ${CONNECT_CONNS}," \
        "bulk ${BULK_CONNS}, large ${LARGE_CONNS} × ${LARGE_RESPONSE_SIZE} B responses; requests ${REQUEST_SIZE} B, responses ${RESPONSE_SIZE} B; idle ${IDLE_CONNS}."
    echo
    python3 "$HERE/report.py" "$RESULTS"
} >"$WORK/report.md"
cat "$WORK/report.md"
if [ -n "$OUT" ]; then
    cp "$WORK/report.md" "$OUT"
    cp "$RESULTS" "${OUT%.md}.jsonl"
fi
