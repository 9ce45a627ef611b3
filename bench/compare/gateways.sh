# Sourced by run.sh and wrk.sh: starting and stopping each target, and reading a process tree's
# CPU and memory from /proc. The caller defines log, die and fill (its templates differ) and
# sets WORK, ON_GW, MAXCONN, EASTWEST_TEMPLATE, PROXY, FLOOR, TOKIO_FLOOR and the *_ADDR ports.
# shellcheck shell=bash

# The pid and its child processes (nginx: master + worker).
tree_pids() { echo "$1"; pgrep -P "$1" || true; }
CLK_TCK=$(getconf CLK_TCK)
# cpu_seconds PID: "user system" seconds of the process tree (threads included), from
# /proc/<pid>/stat's utime and stime.
cpu_seconds() {
    local user=0 sys=0 pid u s
    for pid in $(tree_pids "$1"); do
        # Fields after the ")" that ends comm: utime and stime are the 12th and 13th.
        read -r u s < <(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12, $13}') || true
        user=$((user + ${u:-0})) sys=$((sys + ${s:-0}))
    done
    awk -v u="$user" -v s="$sys" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f %.3f", u / hz, s / hz }'
}
# cpu_total_seconds PID: user + system.
cpu_total_seconds() { cpu_seconds "$1" | awk '{ printf "%.3f", $1 + $2 }'; }
# VmRSS of a process tree, in KiB.
rss_kib() {
    local total=0 pid r
    for pid in $(tree_pids "$1"); do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || r=0
        total=$((total + ${r:-0}))
    done
    echo "$total"
}
wait_port() {
    local addr=$1
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on $addr after 10 s"
}
ports_free() {
    local a
    for a in "$@"; do
        if ss -ltnH "sport = :${a#*:}" | grep -q .; then die "$a is in use (set PORT_BASE)"; fi
    done
}

# start_gateway TARGET: starts it on core $GW_CPU; sets GATEWAY_PID (empty for direct) and ADDR.
start_gateway() {
    case $1 in
    eastwest | eastwest-nosplice | eastwest-notiming | eastwest-base)
        # Its own directory: eastwest-proxy watches the config file's directory for reloads,
        # and the files the harness writes to $WORK would wake it.
        mkdir -p "$WORK/$1"
        cfg=$(fill "$WORK/$1" "$EASTWEST_TEMPLATE" "$EASTWEST_ADDR")
        # A/B in one interleaved run: the same build with splice or token timing off, or an
        # older build.
        local proxy=$PROXY
        if [ "$1" = eastwest-nosplice ]; then printf 'upstream:\n  splice: off\n' >>"$cfg"; fi
        if [ "$1" = eastwest-notiming ]; then printf 'telemetry:\n  token_timing: false\n' >>"$cfg"; fi
        if [ "$1" = eastwest-base ]; then proxy=${PROXY_BASE:?set PROXY_BASE to the older build}; fi
        # One tokio worker thread, like nginx's one worker and haproxy's one thread.
        EASTWEST_WORKER_THREADS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn "${ON_GW[@]}" "$proxy" --config "$cfg" \
            2>"$WORK/$1.log" &
        GATEWAY_PID=$! ADDR=$EASTWEST_ADDR
        ;;
    nginx | nginx-halfclose)
        mkdir -p "$WORK/nginx"
        cfg=$(fill "$WORK/nginx" nginx.conf.in "$NGINX_ADDR")
        sed -i "s|pid $WORK/nginx.pid|pid $WORK/nginx/nginx.pid|" "$cfg"
        # Stock nginx closes both directions at the first FIN; eastwest and haproxy pass the
        # half-close on. nginx-halfclose is nginx doing that same job.
        if [ "$1" = nginx-halfclose ]; then
            sed -i 's/^\( *\)proxy_timeout 1h;/&\n\1proxy_half_close on;/' "$cfg"
        fi
        "${ON_GW[@]}" nginx -p "$WORK/nginx" -e stderr -c "$cfg" 2>"$WORK/nginx.log" &
        GATEWAY_PID=$! ADDR=$NGINX_ADDR
        ;;
    haproxy | haproxy-splice)
        cfg=$(fill "$WORK" haproxy.cfg.in "$HAPROXY_ADDR")
        # What a user after bulk throughput turns on: splice(2) once a direction carries bulk.
        # Pipes cost it 2 fds each and it refuses to start if maxconn and maxpipes could exceed
        # the fd limit: 256 pipes, and as many fewer connections.
        if [ "$1" = haproxy-splice ]; then
            sed -i -e 's/^\( *\)mode tcp$/&\n\1option splice-auto/' \
                -e "s/^\\( *\\)maxconn $MAXCONN\$/\\1maxconn $((MAXCONN - 256))/" \
                -e 's/^\( *\)nbthread 1$/&\n\1maxpipes 256/' "$cfg"
        fi
        "${ON_GW[@]}" haproxy -db -f "$cfg" 2>"$WORK/haproxy.log" &
        GATEWAY_PID=$! ADDR=$HAPROXY_ADDR
        ;;
    floor | tokio-floor)
        # Not gateways: the least a user-space relay can do (proxy/examples/splice_floor.rs),
        # and the least a relay on tokio does (proxy/examples/tokio_floor.rs).
        local floor=$FLOOR
        [ "$1" = tokio-floor ] && floor=$TOKIO_FLOOR
        "${ON_GW[@]}" "$floor" "$FLOOR_ADDR" "$BACKEND_ADDR" 2>"$WORK/$1.log" &
        GATEWAY_PID=$! ADDR=$FLOOR_ADDR
        ;;
    direct)
        GATEWAY_PID= ADDR=$BACKEND_ADDR
        return
        ;;
    *) die "unknown target $1" ;;
    esac
    wait_port "$ADDR"
    # nginx forks its worker after binding: wait for it so its CPU and memory count.
    if [[ $1 == nginx* ]]; then
        for _ in $(seq 1 50); do pgrep -P "$GATEWAY_PID" >/dev/null && break; sleep 0.1; done
    fi
}

stop_gateway() {
    [ -n "$GATEWAY_PID" ] || return 0
    kill -TERM "$GATEWAY_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$GATEWAY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GATEWAY_PID" 2>/dev/null || true
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=
}
