#!/usr/bin/env bash
# The issue-18 harness: off-the-shelf clients (wrk for HTTP/1.1, h2load for HTTP/2) fetching
# static files from an nginx HTTPS backend, directly or through a gateway that passes TLS
# through by SNI (eastwest-proxy `mode: sni`, nginx `stream` + `ssl_preread`, the same with
# `proxy_half_close on` (nginx-halfclose: passes a FIN on as eastwest and haproxy do), haproxy
# `mode tcp` + `req.ssl_sni`, haproxy with `option splice-auto`).
#
# Unlike run.sh (our own Rust load generator and backend, 64 KiB TLS writes), here the backend
# is nginx with its 16 KiB TLS records and the clients are C tools with OpenSSL/nghttp2.
# Pinning (2-core box): clients AND backend on core $LG_CPU, the gateway alone on core $GW_CPU,
# one worker each; gateway and backend SCHED_FIFO 1, clients nice -15. Gateway CPU = utime+stime from
# /proc/<pid>/stat over its processes, read before and after each phase (also reported apart:
# user space, where gateways differ, and the kernel, whose work per byte is the same for all).
# Also per phase: the client+backend core's busy time (/proc/stat), the backend's share, and the
# gateway's sleeps (voluntary context switches): on loopback each sleep is a wake-up that the
# sender on the other core pays for, so a relay cheap for itself can cost its neighbours more.
#
#   bench/compare/wrk.sh                                   # 6 targets x 4 phases x 3 rounds, ~8 min
#   ROUNDS=5 PHASES="large h2large" TARGETS="direct eastwest" bench/compare/wrk.sh
#
# Target `floor` (not in the default set) is proxy/examples/splice_floor.rs: no gateway, the
# least a user-space relay can do (one thread, level-triggered epoll, splice, nothing else).
# Target `tokio-floor` (not in the default set either) is proxy/examples/tokio_floor.rs: the
# least a relay on eastwest's runtime does (a task per connection, copy_bidirectional).
# PERF_STAT=1 also runs `perf stat` on the gateway during each phase (task-clock and context
# switches; PERF_STAT=syscalls adds syscalls and epoll_wait calls, whose tracepoints cost the
# gateway a little per syscall), added to the results and reported per unit.
#
# Phases: ka      wrk, 64 kept-alive connections, 100 B file      -> req/s, gateway CPU µs/req
#         conn    wrk, 16 connections, `Connection: close`, 100 B  -> conn/s, µs/conn (full
#                 handshakes: the backend has tickets and session cache off)
#         large   wrk, 4 kept-alive connections, 1 MiB file        -> MB/s, µs/MB
#         h2large h2load, 4 connections, 1 stream each, 1 MiB file -> MB/s, µs/MB
# MB = 10^6 bytes of file (response bodies), as run.sh's loadgen counts TLS payload.
# Needs: wrk, h2load (nghttp2-client), nginx (+ libnginx-mod-stream), haproxy, openssl,
# taskset, chrt, jq, python3. Builds eastwest-proxy in release mode unless SKIP_BUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROXY=${PROXY:-$TARGET_DIR/release/eastwest-proxy}

TARGETS=${TARGETS:-"direct eastwest nginx nginx-halfclose haproxy haproxy-splice"}
PHASES=${PHASES:-"ka conn large h2large"}
PHASE_SECS=${PHASE_SECS:-6}
ROUNDS=${ROUNDS:-3}
LG_CPU=${LG_CPU:-0}
GW_CPU=${GW_CPU:-1}
KA_CONNS=${KA_CONNS:-64}
CONN_CONNS=${CONN_CONNS:-16}
LARGE_CONNS=${LARGE_CONNS:-4}
PORT_BASE=${PORT_BASE:-18500}
OUT=${OUT:-}
PERF_STAT=${PERF_STAT:-0}
SNI=localhost
SMALL=100
LARGE=1048576

BACKEND_ADDR=127.0.0.1:$((PORT_BASE + 1))
EASTWEST_ADDR=127.0.0.1:$((PORT_BASE + 2))
EASTWEST_ADMIN=127.0.0.1:$((PORT_BASE + 3))
NGINX_ADDR=127.0.0.1:$((PORT_BASE + 4))
HAPROXY_ADDR=127.0.0.1:$((PORT_BASE + 5))
FLOOR_ADDR=127.0.0.1:$((PORT_BASE + 6))
FLOOR=${FLOOR:-$TARGET_DIR/release/examples/splice_floor}
TOKIO_FLOOR=${TOKIO_FLOOR:-$TARGET_DIR/release/examples/tokio_floor}
EASTWEST_TEMPLATE=wrk-eastwest.yaml.in

# The gateway and the backend run SCHED_FIFO 1 (as in run.sh); the clients at nice -15 in the
# normal class: wrk under SCHED_FIFO spins without blocking and starves the backend on its core.
if [ "${SCHED:-fifo}" = fifo ] && [ "$(id -u)" = 0 ]; then PRIO_CMD=(chrt -f 1); else PRIO_CMD=(nice -n 0); fi
if [ "$(id -u)" = 0 ]; then CLIENT_PRIO=(nice -n -15); else CLIENT_PRIO=(nice -n 0); fi
ON_GW=("${PRIO_CMD[@]}" taskset -c "$GW_CPU")
ON_LG=("${PRIO_CMD[@]}" taskset -c "$LG_CPU")
ON_CLIENT=(timeout $((PHASE_SECS + 30)) "${CLIENT_PRIO[@]}" taskset -c "$LG_CPU")
log() { echo "[wrk $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=bench/compare/gateways.sh
source "$HERE/gateways.sh"

export PATH=$PATH:/usr/sbin
for tool in wrk h2load nginx haproxy openssl taskset jq python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install wrk nghttp2-client ...)"
done
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] ||
    die "nginx stream module missing: apt-get install libnginx-mod-stream"

if [ "${SKIP_BUILD:-0}" != 1 ] && [[ " $TARGETS " == *" eastwest"* || " $TARGETS " == *"floor "* ]]; then
    log "building release eastwest-proxy (nice)"
    (cd "$ROOT" && nice cargo build --release -q -p eastwest-proxy --bin eastwest-proxy --example splice_floor \
        --example tokio_floor)
fi

ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
MAXCONN=$(((NOFILE - 100) / 2))

WORK=$(mktemp -d /tmp/eastwest-wrk.XXXXXX)
# nginx's workers run as nobody: they must read the files and certificates.
chmod 755 "$WORK"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
BACKEND_PID=
GATEWAY_PID=
cleanup() {
    for pid in $GATEWAY_PID $BACKEND_PID; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# core_busy_seconds CPU: seconds that core has been busy (all but idle and iowait), from /proc/stat.
core_busy_seconds() {
    awk -v cpu="cpu$1" -v hz="$CLK_TCK" '$1 == cpu { printf "%.3f", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat
}
# voluntary_switches PID: times the process's threads (its children's too) went to sleep.
voluntary_switches() {
    local n=0 pid
    for pid in $(tree_pids "$1"); do
        n=$((n + $(awk '/^voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }' /proc/"$pid"/task/*/status 2>/dev/null || echo 0)))
    done
    echo "$n"
}
ports_free "$BACKEND_ADDR" "$EASTWEST_ADDR" "$EASTWEST_ADMIN" "$NGINX_ADDR" "$HAPROXY_ADDR" "$FLOOR_ADDR"

# fill DIR TEMPLATE LISTEN: DIR/TEMPLATE-without-.in with @...@ filled in, and run.sh's Istio
# SNI replaced by this harness's (the backend certificate's name).
fill() {
    sed -e "s|@WORK@|$WORK|g" -e "s|@BACKEND@|$BACKEND_ADDR|g" -e "s|@NOFILE@|$NOFILE|g" \
        -e "s|@MAXCONN@|$MAXCONN|g" -e "s|@ADMIN@|$EASTWEST_ADMIN|g" -e "s|@LISTEN@|$3|g" \
        -e "s|outbound_\.8000_\._\.bench\.svc\.cluster\.local|$SNI|g" "$HERE/$2" >"$1/${2%.in}"
    echo "$1/${2%.in}"
}

url() { echo "https://$SNI:${ADDR#*:}/$1"; }

# run_client PHASE: runs the phase's client; prints "units seconds errors" (units = requests).
run_client() {
    local out=$WORK/client.out
    case $1 in
    ka) "${ON_CLIENT[@]}" wrk -t1 -c"$KA_CONNS" -d"${PHASE_SECS}s" "$(url small)" >"$out" ;;
    conn) "${ON_CLIENT[@]}" wrk -t1 -c"$CONN_CONNS" -d"${PHASE_SECS}s" -H 'Connection: close' "$(url small)" >"$out" ;;
    large) "${ON_CLIENT[@]}" wrk -t1 -c"$LARGE_CONNS" -d"${PHASE_SECS}s" "$(url large)" >"$out" ;;
    h2large) "${ON_CLIENT[@]}" h2load -c"$LARGE_CONNS" -m1 -D"$PHASE_SECS" "$(url large)" >"$out" ;;
    esac
    case $1 in
    h2large)
        # "finished in 6.00s, ..." and "requests: N total, N started, N done, N succeeded, F failed, E errored"
        awk '/^finished in/ { s = $3 + 0 } /^requests:/ { ok = $8; bad = $10 + $12 }
             END { print ok + 0, s, bad + 0 }' "$out"
        ;;
    *)
        # "  123 requests in 6.00s, 1.2GB read"; errors: "Socket errors: ..." / "Non-2xx ..."
        awk '/requests in/ { n = $1; s = $4 + 0 }
             /Socket errors/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
             /Non-2xx/ { e += $NF }
             END { print n + 0, s, e + 0 }' "$out"
        ;;
    esac
}

phase() {
    local target=$1 name=$2 before after cpu=null user=null sys=null n s e size=$SMALL
    [[ $name == large || $name == h2large ]] && size=$LARGE
    local perf_pid= perf_out=$WORK/perf.csv perf='{}'
    before=$([ -n "$GATEWAY_PID" ] && cpu_seconds "$GATEWAY_PID" || echo 0 0)
    # What the relay costs its neighbours too: the client+backend core, the backend alone, and
    # how often the gateway slept (each sleep is a wake-up the sender on the other core pays for).
    local core0 backend0 sleeps0=0 core1 backend1 sleeps=null
    core0=$(core_busy_seconds "$LG_CPU") backend0=$(cpu_seconds "$BACKEND_PID")
    [ -n "$GATEWAY_PID" ] && sleeps0=$(voluntary_switches "$GATEWAY_PID")
    if [ "$PERF_STAT" != 0 ] && [ -n "$GATEWAY_PID" ]; then
        local events=task-clock,context-switches
        [ "$PERF_STAT" = syscalls ] && events=$events,raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait
        perf stat -x, -o "$perf_out" -p "$(tree_pids "$GATEWAY_PID" | paste -sd,)" -e "$events" \
            2>/dev/null &
        perf_pid=$!
    fi
    read -r n s e < <(run_client "$name") || die "$target $name: client failed"
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        # CSV lines "value,unit,event,...": task-clock in ms, the others counts.
        perf=$(awk -F, '$3 == "task-clock" { t = $1 } $3 == "context-switches" { c = $1 }
            $3 == "raw_syscalls:sys_enter" { y = $1 } $3 == "syscalls:sys_enter_epoll_wait" { w = $1 }
            END { printf "{\"task_clock_s\": %f, \"cs\": %d", t / 1000, c; if (y != "") printf ", \"syscalls\": %d, \"epoll_waits\": %d", y, w; print "}" }' "$perf_out")
    fi
    after=$([ -n "$GATEWAY_PID" ] && cpu_seconds "$GATEWAY_PID" || echo 0 0)
    core1=$(core_busy_seconds "$LG_CPU") backend1=$(cpu_seconds "$BACKEND_PID")
    [ -n "$GATEWAY_PID" ] && sleeps=$(($(voluntary_switches "$GATEWAY_PID") - sleeps0))
    local lg_core backend_cpu
    read -r lg_core backend_cpu < <(awk -v c0="$core0" -v c1="$core1" -v b0="$backend0" -v b1="$backend1" 'BEGIN {
        split(b0, x, " "); split(b1, y, " "); print c1 - c0, (y[1] + y[2]) - (x[1] + x[2]) }')
    if [ -n "$GATEWAY_PID" ]; then
        read -r cpu user sys < <(awk -v a="$after" -v b="$before" 'BEGIN {
            split(a, x, " "); split(b, y, " "); u = x[1] - y[1]; s = x[2] - y[2]; print u + s, u, s }')
    fi
    jq -nc --arg target "$target" --arg phase "$name" --argjson round "$ROUND" \
        --argjson requests "$n" --argjson secs "$s" --argjson errors "$e" --argjson size "$size" \
        --argjson cpu "$cpu" --argjson user "$user" --argjson sys "$sys" \
        --argjson lg_core "$lg_core" --argjson backend "$backend_cpu" --argjson sleeps "$sleeps" --arg load "$(cut -d' ' -f1 /proc/loadavg)" --argjson perf "$perf" \
        '{target: $target, phase: $phase, round: $round, requests: $requests, secs: $secs,
          errors: $errors, size: $size, gw_cpu_s: $cpu, gw_user_s: $user, gw_sys_s: $sys,
          lg_core_s: $lg_core, backend_cpu_s: $backend, gw_sleeps: $sleeps,
          load: ($load | tonumber)} + $perf' >>"$RESULTS"
    log "$target $name: $n requests in ${s}s, $e errors, gateway cpu ${cpu}s"
    [ "$n" -gt 0 ] || die "$target $name: no request completed (see $WORK/client.out)"
    sleep 0.5
}

log "work dir $WORK; ${PHASE_SECS}s phases; gateway on CPU $GW_CPU, clients+backend on CPU $LG_CPU"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$SNI" \
    -addext "subjectAltName=DNS:$SNI" -keyout "$WORK/localhost.key" -out "$WORK/localhost.crt" 2>/dev/null
chmod 644 "$WORK/localhost.key"
mkdir -p "$WORK/www" "$WORK/backend"
head -c "$SMALL" /dev/urandom >"$WORK/www/small"
head -c "$LARGE" /dev/urandom >"$WORK/www/large"
chmod -R a+rX "$WORK/www"
bcfg=$(fill "$WORK/backend" wrk-backend.conf.in "")
"${ON_LG[@]}" nginx -p "$WORK/backend" -e stderr -c "$bcfg" 2>"$WORK/backend.log" &
BACKEND_PID=$!
wait_port "$BACKEND_ADDR"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

for ROUND in $(seq 1 "$ROUNDS"); do
    for target in $TARGETS; do
        log "== $target (round $ROUND of $ROUNDS)"
        start_gateway "$target"
        for p in $PHASES; do phase "$target" "$p"; done
        stop_gateway
    done
done

{
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores; kernel $(uname -r);" \
        "load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(h2load --version 2>&1 | head -1)," \
        "$(nginx -v 2>&1 | sed 's/.*: //') (backend and gateway), $(haproxy -v | head -1 | cut -d' ' -f1-3)," \
        "eastwest-proxy $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')." \
        "${ROUNDS} rounds of ${PHASE_SECS}s phases, interleaved; medians [min–max]."
    echo
    python3 "$HERE/wrk_report.py" "$RESULTS"
} >"$WORK/report.md"
cat "$WORK/report.md"
if [ -n "$OUT" ]; then
    cp "$WORK/report.md" "$OUT"
    cp "$RESULTS" "${OUT%.md}.jsonl"
fi
