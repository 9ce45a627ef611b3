# Helpers for the loopback checks, sourced by deploy/test.sh and deploy/tools/demo_kiali.sh.
# Needs $PY (a python3); stop_pids reads the array PIDS.

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# GET a URL on loopback; prints the body, fails on anything but 200.
http_get() {
  "$PY" - "$1" 2>/dev/null <<'PYEOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.stdout.write(r.read().decode())
PYEOF
}

# Polls `$@` every 0.2 s until it succeeds, $1 seconds pass or process $2 exits.
wait_for() {
  local deadline=$((SECONDS + $1)) pid=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    sleep 0.2
  done
}

# Stops every process in PIDS and waits for them (an EXIT trap's job).
stop_pids() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
