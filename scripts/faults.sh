#!/usr/bin/env bash
# The fault suite: real eastwest-proxy and eastwest-control processes on loopback, one fault at
# a time (dead and blackholed endpoints, a backend killed under streams, reload under load, the
# SIGTERM drain timeline, idle connections to the fd limit, slowloris, a status-port flood,
# control with an unreachable API server). Prints a Markdown table; exits non-zero if any fault
# did not behave. See docs/faults.md.
#
#   bash scripts/faults.sh                      # builds release binaries, ~2 minutes
#   ONLY=drain,slowloris bash scripts/faults.sh # a subset
#   OUT=docs/faults-latest.md bash scripts/faults.sh
#
# Needs python3 (standard library only), openssl and prlimit (util-linux).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="${CARGO_TARGET_DIR:-target}"
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --locked -p eastwest-proxy -p eastwest-control
fi
args=(--bin "$target/release")
[ -n "${ONLY:-}" ] && args+=(--only "$ONLY")
[ -n "${OUT:-}" ] && args+=(--out "$OUT")
[ -n "${FLOOD:-}" ] && args+=(--flood "$FLOOD")
exec python3 scripts/faults.py "${args[@]}"
