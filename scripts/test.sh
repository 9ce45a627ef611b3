#!/usr/bin/env bash
# Runs every check eastwest has, on a fresh Debian machine with only the Rust toolchain:
#
#   bash scripts/test.sh
#
# 1. installs what the tests need beyond cargo (Debian: prometheus for promtool and the server,
#    openssl, python3-venv; PyPI into a cached venv: the OpenAI client and sglang's
#    bench_serving for the wire-compatibility tests);
# 2. cargo fmt --check and cargo clippy -D warnings over the whole workspace;
# 3. cargo test over the whole workspace (unit, integration, fuzz-corpus replay, CLI tests);
# 4. deploy/test.sh: kustomize render, Kubernetes schema validation, Prometheus scraping a
#    real eastwest-proxy (Kiali's TCP-edge queries, dashboard and alert checks), and the demo
#    run while Prometheus scrapes its gateway (Kiali's edges per scenario).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n=== %s\n' "$*"; }

say "tools"
# rustup's minimal profile leaves these out; the default profile has them.
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev) # ring's C and assembly parts
# promtool, and the prometheus server deploy/test.sh runs for Kiali's queries.
{ command -v promtool && command -v prometheus; } >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
VENV="${EASTWEST_TEST_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/eastwest-test-venv}"
# (sglang itself is only looked up: importing it needs the torch stub of its wrapper script.)
if ! "$VENV/bin/python" -c 'import openai, transformers, aiohttp, importlib.util as u
assert u.find_spec("sglang")' 2>/dev/null; then
  echo "creating $VENV with the OpenAI Python client and sglang's bench_serving (no torch)"
  python3 -m venv "$VENV"
  # sglang --no-deps: its full dependency set is torch and CUDA (gigabytes); bench_serving's
  # client path needs only these (bench/scripts/sglang_bench_serving.py stubs torch).
  "$VENV/bin/pip" install -q --disable-pip-version-check openai numpy aiohttp msgspec orjson \
    requests tqdm transformers psutil pybase64 pillow starlette pyzmq ipython datasets \
    sentencepiece gguf
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps sglang==0.5.23
fi
export EASTWEST_PYTHON="$VENV/bin/python"

# A first build gains nothing from incremental compilation, which would cost ~0.8 GB of disk
# and ~15 s; a tree that already has incremental state keeps using it.
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${CARGO_INCREMENTAL:-}" ] && [ ! -d "$target/debug/incremental" ]; then
  export CARGO_INCREMENTAL=0
fi
# A fresh build takes about 2 GB; say so up front rather than fail in the linker.
mkdir -p "$target"
free_mb=$(df -Pm "$target" | awk 'NR == 2 {print $4}')
if [ "${free_mb:-0}" -lt 2500 ]; then
  echo "warning: only ${free_mb} MB free for $target; a fresh build needs about 2000 MB" >&2
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cargo test --workspace"
cargo test --workspace --locked

say "deploy/test.sh"
EASTWEST_BIN=target/debug bash deploy/test.sh

say "all checks passed"
