#!/usr/bin/env python3
"""Offline checks on rendered eastwest manifests (run by deploy/test.sh).

  validate --kubernetes-version V FILE...  every object against Kubernetes' OpenAPI schemas
                                           (strict: unknown fields are errors); ServiceMonitors
                                           against the Prometheus Operator's API models
  gateway FILE                             the rendered gateway overlay keeps the promises
                                           deploy/README.md makes (labels, ports, probes, OCI
                                           load balancer, route cache, remote reader, ...)
  images --component DIR FILE...           every container runs the image deploy/images names
                                           for its binary; other images carry a fixed tag
  dockerfile FILE                          one binary per image target, stripped, base images
                                           as pinnable build arguments
  build-context --dockerignore F --readme F...
                                           the READMEs' eastwest-certs --out paths are outside
                                           the build context, and key files are ignored
  args --binary NAME=PATH... FILE...       every --flag a container passes to an eastwest
                                           binary is listed by that binary's --help
  argv FILE KIND NAME [--flag F=V] [--replace OLD=NEW]
                                           the container's command line, env-expanded
  extract-proxy-config FILE OUT            writes the eastwest-proxy ConfigMap's config.yaml
  prometheus-test-config SNIPPET OUT JOB=HOST:PORT...
                                           the snippet's jobs with static targets instead of
                                           DNS discovery, as a complete prometheus.yml

Every failure is printed as `FILE: Kind/name: what`; the exit code is 1 if there was any.
"""

import argparse
import os
import re
import sys

import yaml


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(obj):
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind', '?')}/{ns + '/' if ns else ''}{name}"


class Failures:
    def __init__(self):
        self.items = []

    def add(self, path, obj, msg):
        self.items.append(f"{path}: {ident(obj) if obj else '-'}: {msg}")

    def finish(self, ok_line):
        for line in self.items:
            print(f"FAIL {line}")
        if self.items:
            print(f"{len(self.items)} problem(s)")
            return 1
        print(ok_line)
        return 0


# ---------------------------------------------------------------------------------------------
# validate


def strip_nones(value):
    if isinstance(value, dict):
        return {k: strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nones(v) for v in value]
    return value


def lost_fields(given, kept, at=""):
    """Paths present in `given` but not in `kept`."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for k, v in given.items():
            out += lost_fields(v, kept[k], f"{at}.{k}") if k in kept else [f"{at}.{k}"]
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [p for i, (g, k) in enumerate(zip(given, kept)) for p in lost_fields(g, k, f"{at}[{i}]")]
    return [] if given == kept else [f"{at} (value changed)"]


def validate_servicemonitor(obj):
    """The Prometheus Operator's model of the object's kind (ServiceMonitor, PrometheusRule).
    The model ignores unknown fields, so a round trip that loses any field means the manifest
    has one the CRD does not know."""
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    kind = obj.get("kind", "")
    model = getattr(monitoring, kind, None)
    if model is None:
        raise ValueError(f"no monitoring.coreos.com/v1 model for kind {kind!r}")
    parsed = model.model_validate(obj)
    back = strip_nones(parsed.model_dump(by_alias=True, exclude_none=True, mode="json"))
    lost = lost_fields(obj, back)
    if lost:
        raise ValueError(f"unknown to monitoring.coreos.com/v1 {kind}: {', '.join(lost)}")


def cmd_validate(args):
    import kubernetes_validate

    fails = Failures()
    count = 0
    for path in args.files:
        for obj in load(path):
            count += 1
            try:
                if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                    validate_servicemonitor(obj)
                else:
                    kubernetes_validate.validate(obj, args.kubernetes_version, strict=True)
            except Exception as e:  # every kind of validation error is reported the same way
                lines = [l.strip() for l in str(e).splitlines() if l.strip()]
                fails.add(path, obj, " | ".join(lines[:3]) or type(e).__name__)
    return fails.finish(f"{count} objects valid against Kubernetes {args.kubernetes_version} "
                        f"(strict), 0 errors")


# ---------------------------------------------------------------------------------------------
# gateway

GATEWAY = "istio-eastwestgateway"
GATEWAY_LABELS = {"istio": "eastwestgateway", "app": "istio-eastwestgateway"}
NETWORK = "topology.istio.io/network"
NSG = "oci.oraclecloud.com/oci-network-security-groups"
OCI_LB = "service.beta.kubernetes.io/oci-load-balancer-"
ROUTE_CACHE_DIR = "/var/lib/eastwest"
GATEWAY_PORTS = {"status-port": 15021, "tls": 15443, "tls-istiod": 15012, "tls-webhook": 15017,
                 "tls-hbone": 15008}
HBONE_PORT = 15008
# What fra's load balancer publishes besides: eastwest-control's route stream, mTLS end to end
# (control authenticates every gateway by its mesh certificate), for ash's gateways.
CONTROL_PORT = {"tls-control": 15010}
STATUS_PORT, METRICS_PORT = 15021, 15020


def duration_seconds(text):
    """humantime-style durations as the proxy config uses them (`30s`, `1m 30s`, `500ms`)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    parts = re.findall(r"(\d+)\s*([a-z]+)", str(text))
    if not parts or re.sub(r"[\d\sa-z]", "", str(text)):
        raise ValueError(f"cannot read duration {text!r}")
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit {unit!r} in {text!r}")
        total += int(number) * units[unit]
    return total


def find(objs, kind, name):
    return next((o for o in objs if o.get("kind") == kind
                 and o.get("metadata", {}).get("name") == name), None)


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_hardened(path, obj, pod, fails):
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        fails.add(path, obj, "pod securityContext.runAsNonRoot must be true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fails.add(path, obj, "pod seccompProfile must be RuntimeDefault")
    for c in pod.get("containers", []):
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            fails.add(path, obj, f"container {c['name']}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            fails.add(path, obj, f"container {c['name']}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            fails.add(path, obj, f"container {c['name']}: capabilities must drop ALL")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind, {})):
                fails.add(path, obj, f"container {c['name']}: resources.{kind} needs cpu and memory")


def check_proxy(path, objs, fails):
    ds = find(objs, "DaemonSet", GATEWAY)
    svc = find(objs, "Service", GATEWAY)
    cm = find(objs, "ConfigMap", "eastwest-proxy-config")
    if not (ds and svc and cm):
        fails.add(path, None, "needs DaemonSet, Service and ConfigMap eastwest-proxy-config")
        return
    for o in (ds, svc, cm):
        if o["metadata"].get("namespace") != "istio-system":
            fails.add(path, o, "must be in istio-system")
    tmpl = ds["spec"]["template"]
    labels = tmpl["metadata"].get("labels", {})
    network = labels.get(NETWORK, "")
    if not matches(GATEWAY_LABELS, labels) or not network or "CHANGE" in network:
        fails.add(path, ds, f"pods need labels {GATEWAY_LABELS} and a real {NETWORK}")
    if svc["metadata"].get("labels", {}).get(NETWORK) != network:
        fails.add(path, svc, f"{NETWORK} label must equal the pods' ({network!r})")
    if svc["spec"].get("type") != "LoadBalancer":
        fails.add(path, svc, "must be type LoadBalancer")
    check_oci_load_balancer(path, svc, fails)
    if not matches(svc["spec"].get("selector"), labels):
        fails.add(path, svc, "selector does not select the gateway pods")
    ports = {p.get("name"): p.get("port") for p in svc["spec"].get("ports", [])}
    for name, port in GATEWAY_PORTS.items():
        if ports.get(name) != port:
            fails.add(path, svc, f"port {name} must be {port} (Istio's name), found {ports.get(name)}")
    # The load balancer publishes the status port and the mTLS ports, nothing else: never
    # metrics (15020), the debug server (15000) or anything that answers without a client
    # certificate.
    published = dict(GATEWAY_PORTS, **(CONTROL_PORT if network == "network1" else {}))
    extra = {n: p for n, p in ports.items() if published.get(n) != p}
    if extra:
        fails.add(path, svc, f"publishes {extra} beyond {published}")
    for o in objs:
        if o.get("kind") == "Service" and o is not svc and \
                o["spec"].get("type", "ClusterIP") != "ClusterIP":
            fails.add(path, o, "only the gateway's Service may be reachable from outside the cluster")
    # A drain never evicts DaemonSet pods (kubectl drain --ignore-daemonsets, the autoscaler
    # skips them): a PDB over them protects nothing and only suggests it does.
    for pdb in objs:
        if pdb.get("kind") == "PodDisruptionBudget" and \
                matches(pdb["spec"].get("selector", {}).get("matchLabels"), labels):
            fails.add(path, pdb, "a PodDisruptionBudget over DaemonSet pods protects nothing")
    rolling = ds["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
    if rolling.get("maxUnavailable") != 0 or rolling.get("maxSurge") in (None, 0, "0%"):
        fails.add(path, ds, "rollouts must surge (maxSurge >= 1, maxUnavailable: 0): a new "
                            "gateway is ready on the node before the old one drains")
    pod = tmpl["spec"]
    annotations = tmpl["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or \
            annotations.get("prometheus.io/port") != str(METRICS_PORT):
        fails.add(path, ds, f"pods need prometheus.io/scrape=true and prometheus.io/port={METRICS_PORT}")
    check_hardened(path, ds, pod, fails)
    proxy = pod["containers"][0]
    check_route_cache(path, ds, pod, proxy, fails)
    container_ports = {p.get("containerPort") for p in proxy.get("ports", [])}
    if not {STATUS_PORT, METRICS_PORT} <= container_ports:
        fails.add(path, ds, f"containerPorts need {STATUS_PORT} and {METRICS_PORT}")
    probe = proxy.get("readinessProbe", {})
    if probe.get("httpGet", {}).get("path") != "/healthz/ready" or \
            probe.get("httpGet", {}).get("port") != STATUS_PORT:
        fails.add(path, ds, f"readinessProbe must GET :{STATUS_PORT}/healthz/ready")
    liveness = proxy.get("livenessProbe", {})
    if (liveness.get("httpGet") or liveness.get("tcpSocket") or {}).get("port") != STATUS_PORT:
        fails.add(path, ds, f"livenessProbe must use the status port {STATUS_PORT}")
    metrics_svc = find(objs, "Service", "eastwest-proxy-metrics")
    if not metrics_svc or {p.get("targetPort") for p in metrics_svc["spec"]["ports"]} != {METRICS_PORT}:
        fails.add(path, metrics_svc or ds, f"eastwest-proxy-metrics must target {METRICS_PORT}")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    admin = config.get("admin", {})
    want = {"status_address": f"0.0.0.0:{STATUS_PORT}", "metrics_address": f"0.0.0.0:{METRICS_PORT}"}
    for key, address in want.items():
        if admin.get(key, address) != address:
            fails.add(path, cm, f"admin.{key} must be {address} (probes, Services and scrapes use it)")
    if not str(admin.get("debug_address", "127.0.0.1:15000")).startswith("127.0.0.1:"):
        fails.add(path, cm, "admin.debug_address must stay on loopback (/config_dump shows pod IPs)")
    if "address" in admin:
        fails.add(path, cm, "admin.address is the old single port; use status/metrics/debug_address")
    accept = duration_seconds(config.get("drain_accept_period", "5s"))
    drain = duration_seconds(config.get("drain_period", "30s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= accept + drain:
        fails.add(path, ds, f"terminationGracePeriodSeconds {grace} must exceed drain_accept_period "
                            f"+ drain_period ({accept:g}s + {drain:g}s)")
    # Accepting must outlast the readiness probe's noticing the drain, or kube-proxy still
    # sends connections to a closed port.
    noticed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    if accept < noticed:
        fails.add(path, ds, f"drain_accept_period {accept:g}s must cover the readiness probe's "
                            f"periodSeconds x failureThreshold ({noticed}s)")
    # The config must arrive as a whole-directory ConfigMap mount: subPath mounts never update.
    config_volumes = {v["name"] for v in pod.get("volumes", [])
                      if v.get("configMap", {}).get("name") == "eastwest-proxy-config"}
    mounts = [m for m in proxy.get("volumeMounts", []) if m["name"] in config_volumes]
    config_arg = next((a.split("=", 1)[1] for a in proxy.get("args", [])
                       if a.startswith("--config=")), "")
    if not mounts or any("subPath" in m for m in mounts):
        fails.add(path, ds, "eastwest-proxy-config must be mounted as a directory, without subPath")
    elif not any(config_arg == m["mountPath"].rstrip("/") + "/config.yaml" for m in mounts):
        fails.add(path, ds, f"--config={config_arg} is not config.yaml in the ConfigMap mount")
    if cm["metadata"]["name"] != "eastwest-proxy-config":
        fails.add(path, cm, "the proxy ConfigMap needs a fixed name so updates reload in place")
    listeners = {l["address"].rsplit(":", 1)[1] for l in config.get("listeners", [])}
    targets = {str(p.get("targetPort")) for p in svc["spec"]["ports"] if p.get("name") != "status-port"}
    if network == "network1":
        missing = {"15443", "15012", "15017", "15010"} - listeners
        if missing:
            fails.add(path, cm, f"fra's gateway must listen on {sorted(missing)} (istiod, control)")
        if "15010" not in targets:
            fails.add(path, svc, "fra's gateway Service must expose 15010 for eastwest-control")
    elif "15443" not in listeners:
        fails.add(path, cm, "the gateway must listen on 15443")
    check_hbone(path, ds, pod, proxy, cm, config, fails)


def check_hbone(path, ds, pod, proxy, cm, config, fails):
    """Ambient: an hbone listener on 15008, the container port for it, and an identity whose
    files come from a mounted Secret (what `eastwest-certs gateway` wrote)."""
    hbone = [l for l in config.get("listeners", []) if l.get("mode") == "hbone"]
    if [l["address"].rsplit(":", 1)[1] for l in hbone] != [str(HBONE_PORT)]:
        fails.add(path, cm, f"needs one listener with mode: hbone on {HBONE_PORT} (ambient)")
    if HBONE_PORT not in {p.get("containerPort") for p in proxy.get("ports", [])}:
        fails.add(path, ds, f"containerPorts need {HBONE_PORT} (hbone)")
    files = (config.get("identity") or {}).get("files") or {}
    if set(files) != {"cert_chain", "key", "roots"}:
        fails.add(path, cm, "identity.files needs cert_chain, key and roots (the hbone certificate)")
        return
    secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    mounts = [m["mountPath"].rstrip("/") + "/" for m in proxy.get("volumeMounts", [])
              if m["name"] in secret_volumes]
    for key, file in files.items():
        if not any(str(file).startswith(m) for m in mounts):
            fails.add(path, cm, f"identity.files.{key} {file} is not in a mounted Secret")


def check_oci_load_balancer(path, svc, fails):
    """The annotations deploy/oci sets (flexible shape, security lists left alone) and the
    overlay's NSG, with values OKE's cloud controller manager accepts."""
    ann = svc["metadata"].get("annotations", {})
    if not str(ann.get(NSG, "")).startswith("ocid1.networksecuritygroup."):
        fails.add(path, svc, f"annotation {NSG} must hold an NSG OCID, found {ann.get(NSG)!r}")
    if ann.get(OCI_LB + "shape") != "flexible":
        fails.add(path, svc, f"{OCI_LB}shape must be \"flexible\", found {ann.get(OCI_LB + 'shape')!r}")
    try:
        low, high = int(ann[OCI_LB + "shape-flex-min"]), int(ann[OCI_LB + "shape-flex-max"])
        if not 10 <= low <= high <= 8000:
            raise ValueError(f"{low}..{high}")
    except (KeyError, ValueError) as e:
        fails.add(path, svc, f"{OCI_LB}shape-flex-min/max must be Mbps with 10 <= min <= max <= 8000 ({e})")
    mode = ann.get(OCI_LB + "security-list-management-mode")
    if mode != "None":
        fails.add(path, svc, f"{OCI_LB}security-list-management-mode must be \"None\" "
                             f"(the NSG admits traffic; OCI's default All edits security lists), found {mode!r}")


def check_route_cache(path, ds, pod, proxy, fails):
    """--route-cache lives on the node (hostPath under /var/lib/eastwest), so a re-created pod
    finds it, and an init container hands the kubelet-created (root-owned) directory to the
    proxy's user."""
    cache = next((a.split("=", 1)[1] for a in proxy.get("args", []) if a.startswith("--route-cache=")), "")
    mount = next((m for m in proxy.get("volumeMounts", [])
                  if cache.startswith(m["mountPath"].rstrip("/") + "/")), None)
    volume = next((v for v in pod.get("volumes", []) if mount and v["name"] == mount["name"]), {})
    host = volume.get("hostPath", {})
    if not cache or not host.get("path", "").startswith(ROUTE_CACHE_DIR) \
            or host.get("type") != "DirectoryOrCreate":
        fails.add(path, ds, f"--route-cache ({cache or 'missing'}) must be on a hostPath volume under "
                            f"{ROUTE_CACHE_DIR} of type DirectoryOrCreate, found {volume or 'no volume'}")
        return
    user = proxy.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    group = proxy.get("securityContext", {}).get("runAsGroup", pod.get("securityContext", {}).get("runAsGroup"))
    owners = [c for c in pod.get("initContainers", [])
              if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))
              and f"chown {user}:{group} " in " ".join(c.get("command", []) + c.get("args", []))]
    if not owners:
        fails.add(path, ds, f"no init container chowns the route cache to {user}:{group}")
    for c in owners:
        sc = c.get("securityContext", {})
        added = set(sc.get("capabilities", {}).get("add", []))
        if ("ALL" not in sc.get("capabilities", {}).get("drop", []) or not added <= {"CHOWN", "FOWNER"}
                or sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True):
            fails.add(path, ds, f"init container {c['name']}: must drop ALL, add at most CHOWN and FOWNER, "
                                "no privilege escalation, read-only root")
        if not {"cpu", "memory"} <= set(c.get("resources", {}).get("limits", {})):
            fails.add(path, ds, f"init container {c['name']}: resources.limits needs cpu and memory")


# Istio 1.24's istio-reader-clusterrole with istiodRemote.enabled (the seed's `profile: remote`;
# istio/istio 1.24.6, manifests/charts/istio-control/istio-discovery/templates/
# reader-clusterrole.yaml): what istiod in the primary does in the remote through the remote
# secret. (apiGroup, resource) -> verbs.
ISTIO_REMOTE_READER = {
    **{(g, "*"): {"get", "list", "watch"} for g in (
        "config.istio.io", "security.istio.io", "networking.istio.io", "authentication.istio.io",
        "rbac.istio.io", "telemetry.istio.io", "extensions.istio.io")},
    **{("", r): {"get", "list", "watch"} for r in (
        "endpoints", "pods", "services", "nodes", "replicationcontrollers", "namespaces", "secrets")},
    ("networking.istio.io", "workloadentries"): {"get", "list", "watch"},
    ("networking.x-k8s.io", "gateways"): {"get", "list", "watch"},
    ("gateway.networking.k8s.io", "gateways"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("multicluster.x-k8s.io", "serviceexports"): {"get", "list", "watch", "create", "delete"},
    ("multicluster.x-k8s.io", "serviceimports"): {"get", "list", "watch"},
    ("apps", "replicasets"): {"get", "list", "watch"},
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    ("", "configmaps"): {"create", "get", "list", "watch", "update"},
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): {"get", "list", "watch", "update", "patch"},
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"): {"get", "list", "watch", "update"},
}
READER = "eastwest-reader"


def check_reader(path, objs, fails):
    """The remote cluster's eastwest-reader (behind create-remote-secret.sh's Secret) may do at
    least what Istio's reader role lets istiod in the primary do there."""
    sa = find(objs, "ServiceAccount", READER)
    if not sa:
        fails.add(path, None, f"a remote cluster's overlay needs ServiceAccount {READER}")
        return
    granted = {}
    for binding in objs:
        if binding.get("kind") != "ClusterRoleBinding" or not any(
                s.get("kind") == "ServiceAccount" and s.get("name") == READER for s in binding.get("subjects", [])):
            continue
        role = find(objs, "ClusterRole", binding["roleRef"]["name"]) or {}
        for rule in role.get("rules", []):
            for group in rule.get("apiGroups", []):
                for res in rule.get("resources", []):
                    granted.setdefault((group, res), set()).update(rule.get("verbs", []))
    for (group, res), verbs in sorted(ISTIO_REMOTE_READER.items()):
        have = granted.get((group, res), set()) | granted.get((group, "*"), set())
        missing = verbs - have
        if missing:
            fails.add(path, sa, f"does not grant {sorted(missing)} on {group or 'core'}/{res}, which "
                                "Istio's reader role gives istiod in a remote with an external istiod")


def check_rules(path, obj, allowed, fails):
    """`allowed` maps (apiGroup, resource) to the verbs allowed, or to (verbs, resourceNames)
    when the rule must be limited to those names. Every allowed verb must also be granted:
    eastwest-control uses each of them."""
    granted = {}
    for rule in obj.get("rules", []):
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                grant = allowed.get((group, res), set())
                verbs, names = grant if isinstance(grant, tuple) else (grant, None)
                granted.setdefault((group, res), set()).update(rule.get("verbs", []))
                extra = set(rule.get("verbs", [])) - set(verbs)
                if extra:
                    fails.add(path, obj, f"grants {sorted(extra)} on {group or 'core'}/{res}")
                if names is not None and not set(rule.get("resourceNames") or ["*"]) <= names:
                    fails.add(path, obj, f"{group or 'core'}/{res} must be limited to {sorted(names)}")
    for (group, res), grant in allowed.items():
        verbs = grant[0] if isinstance(grant, tuple) else grant
        missing = set(verbs) - granted.get((group, res), set())
        if missing:
            fails.add(path, obj, f"does not grant {sorted(missing)} on {group or 'core'}/{res}, "
                                 "which eastwest-control needs")


def check_control(path, objs, fails):
    dep = find(objs, "Deployment", "eastwest-control")
    if not dep:
        return
    pod = dep["spec"]["template"]["spec"]
    check_hardened(path, dep, pod, fails)
    sa = pod.get("serviceAccountName")
    if not find(objs, "ServiceAccount", sa):
        fails.add(path, dep, f"ServiceAccount {sa} is not in the render")
    watch = {"list", "watch"}
    cluster = {("", "services"): watch, ("", "pods"): watch,
               ("discovery.k8s.io", "endpointslices"): watch,
               ("networking.istio.io", "destinationrules"): watch,
               # list/watch: the istio.io/dataplane-mode=ambient label of every namespace;
               # get: istio-system's network label (that rule may stay limited to it).
               ("", "namespaces"): {"get", "list", "watch"}}
    bound = set()
    for obj in objs:
        if obj.get("kind") in ("ClusterRoleBinding", "RoleBinding") and any(
                s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in obj.get("subjects", [])):
            role = find(objs, obj["roleRef"]["kind"], obj["roleRef"]["name"])
            if not role:
                fails.add(path, obj, f"roleRef {obj['roleRef']['name']} is not in the render")
                continue
            bound.add(role["kind"])
            if role["kind"] == "ClusterRole":
                check_rules(path, role, cluster, fails)
            else:
                check_rules(path, role, {("", "secrets"): watch}, fails)
                if role["metadata"].get("namespace") != dep["metadata"].get("namespace"):
                    fails.add(path, role, "Secrets access must stay in eastwest-control's namespace")
    if bound != {"ClusterRole", "Role"}:
        fails.add(path, dep, f"expected a ClusterRole and a Role bound to {sa}, found {sorted(bound)}")


def cmd_gateway(args):
    fails = Failures()
    objs = load(args.file)
    check_proxy(args.file, objs, fails)
    check_control(args.file, objs, fails)
    # A cluster without eastwest-control is a remote: the primary reads it through the reader.
    if not find(objs, "Deployment", "eastwest-control"):
        check_reader(args.file, objs, fails)
    return fails.finish(f"{args.file}: gateway checks passed")


# ---------------------------------------------------------------------------------------------
# args


def cmd_args(args):
    """Every --flag a rendered container passes to an eastwest binary is one that binary's
    --help lists (for its subcommand, if the args start with one)."""
    import subprocess

    binaries = dict(b.split("=", 1) for b in args.binary)
    fails = Failures()
    checked = 0
    for path in args.files:
        for obj in load(path):
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                name = os.path.basename((c.get("command") or [""])[0])
                if name not in binaries:
                    continue
                argv = c.get("args", [])
                sub = []
                while len(sub) < len(argv) and not argv[len(sub)].startswith("-"):
                    sub.append(argv[len(sub)])
                if not os.access(binaries[name], os.X_OK):
                    fails.add(path, obj, f"no executable {name} at {binaries[name]}")
                    continue
                run = subprocess.run([binaries[name], *sub, "--help"], capture_output=True,
                                     text=True, timeout=30)
                if run.returncode != 0:
                    fails.add(path, obj, f"{' '.join([name, *sub])} --help failed: {run.stderr.strip()}")
                    continue
                for arg in argv[len(sub):]:
                    if not arg.startswith("--"):
                        continue
                    flag = arg.split("=", 1)[0]
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", run.stdout):
                        fails.add(path, obj, f"container {c['name']}: {' '.join([name, *sub])} has no {flag}")
                checked += 1
    return fails.finish(f"{checked} containers: every flag is one the binary accepts")


def cmd_argv(args):
    """The command line Kubernetes would run for KIND/NAME's first container, one argument a
    line: $(VAR) expanded from the container's env (literal values, ConfigMap keys from the
    same render, the pod's namespace), then --flag NAME=VALUE overrides and --replace OLD=NEW
    substitutions (so a test can move addresses to loopback and mounts to temp dirs)."""
    objs = load(args.file)
    obj = find(objs, args.kind, args.name)
    if not obj:
        print(f"{args.file}: no {args.kind}/{args.name}", file=sys.stderr)
        return 1
    container = obj["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[e["name"]] = find(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = obj["metadata"]["namespace"]
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in container.get("command", []) + container.get("args", [])]
    for override in args.flag:
        flag, value = override.split("=", 1)
        hits = [i for i, a in enumerate(argv) if a.startswith(f"--{flag}=")]
        if not hits:
            print(f"{ident(obj)}: no --{flag}= to override", file=sys.stderr)
            return 1
        for i in hits:
            argv[i] = f"--{flag}={value}"
    for pair in args.replace:
        old, new = pair.split("=", 1)
        argv = [a.replace(old, new) for a in argv]
    print("\n".join(argv))
    return 0


# ---------------------------------------------------------------------------------------------
# images, Dockerfile, build context

EASTWEST_BINARIES = ("eastwest-proxy", "eastwest-control", "eastwest-bench", "eastwest-certs")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def image_ref(entry):
    """The reference kustomize renders for an `images:` entry."""
    ref = entry.get("newName", entry["name"])
    if entry.get("newTag"):
        ref += f":{entry['newTag']}"
    return f"{ref}@{entry['digest']}" if entry.get("digest") else ref


def pod_containers(obj):
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def cmd_images(args):
    """Every container that runs an eastwest binary has the image deploy/images names for that
    binary (so one edit there moves every overlay), every other image has a tag other than
    latest or a digest, and the component's own entries are well-formed."""
    fails = Failures()
    component = os.path.join(args.component, "kustomization.yaml")
    entries = {e["name"]: e for e in load(component)[0].get("images", [])}
    for name, entry in entries.items():
        if not (entry.get("newTag") or entry.get("digest")):
            fails.add(component, None, f"image {name}: needs newTag or digest")
        if entry.get("digest") and not DIGEST.match(entry["digest"]):
            fails.add(component, None, f"image {name}: digest {entry['digest']!r} is not sha256:<64 hex>")
    wanted = {b: image_ref(entries[b]) for b in EASTWEST_BINARIES if b in entries}
    used = set()
    checked = 0
    for path in args.files:
        for obj in load(path):
            for c in pod_containers(obj):
                checked += 1
                image = c.get("image", "")
                binary = os.path.basename((c.get("command") or [""])[0])
                if binary in EASTWEST_BINARIES:
                    used.add(binary)
                    if image != wanted.get(binary):
                        fails.add(path, obj, f"container {c['name']} runs {binary} from image {image!r}, "
                                             f"not {wanted.get(binary)!r} (deploy/images)")
                    continue
                last = image.rsplit("/", 1)[-1]
                if "@" in last:
                    if not DIGEST.match(last.split("@", 1)[1]):
                        fails.add(path, obj, f"container {c['name']}: bad digest in {image!r}")
                elif ":" not in last or last.endswith(":latest"):
                    fails.add(path, obj, f"container {c['name']}: image {image!r} needs a fixed tag")
    for binary in sorted(set(wanted) - used - {"eastwest-certs"}):
        fails.add(component, None, f"image {binary} is named but no rendered container runs {binary}")
    return fails.finish(f"{checked} containers: every image is the one deploy/images names, or pinned")


def dockerfile_stages(path):
    """(global ARG defaults, [(stage name, base, [instructions])]) of a Dockerfile; continuation
    lines joined, comments dropped."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", "".join(l for l in f if not l.lstrip().startswith("#")))
    global_args, stages = {}, []
    for line in (l.strip() for l in text.splitlines() if l.strip()):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append((m.group(2) or "", m.group(1), []))
        elif word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif stages:
            stages[-1][2].append((word, rest))
    return global_args, stages


def cmd_dockerfile(args):
    fails = Failures()
    global_args, stages = dockerfile_stages(args.file)
    names = [n for n, _, _ in stages]
    for name, base, _ in stages:
        m = re.fullmatch(r"\$\{?(\w+)\}?", base)
        if base not in names and not (m and m.group(1) in global_args):
            fails.add(args.file, None, f"stage {name or '?'}: FROM {base} is neither an earlier stage "
                                       "nor a build argument (so it cannot be pinned by digest)")
    for arg, default in global_args.items():
        ref, _, digest = default.partition("@")
        if ":" not in ref.rsplit("/", 1)[-1]:
            fails.add(args.file, None, f"ARG {arg}={default}: needs a tag")
        if digest and not DIGEST.match(digest):
            fails.add(args.file, None, f"ARG {arg}: digest {digest!r} is not sha256:<64 hex>")
    build_env = " ".join(rest for n, _, ins in stages for word, rest in ins if word in ("ENV", "RUN") and n == "build")
    if "CARGO_PROFILE_RELEASE_STRIP=symbols" not in build_env:
        fails.add(args.file, None, "the build stage must strip the binaries (CARGO_PROFILE_RELEASE_STRIP=symbols)")
    if not names or names[-1] != "eastwest-proxy":
        fails.add(args.file, None, "the last stage (the default target) must be eastwest-proxy")
    for binary in ("eastwest-proxy", "eastwest-control", "eastwest-bench"):
        stage = next((ins for n, _, ins in stages if n == binary), None)
        if stage is None:
            fails.add(args.file, None, f"no target {binary}")
            continue
        copied = [os.path.basename(src) for word, rest in stage if word == "COPY"
                  for src in rest.split()[:-1] if not src.startswith("--")]
        if copied != [binary]:
            fails.add(args.file, None, f"target {binary} must copy only {binary}, copies {copied}")
        entry = [rest for word, rest in stage if word == "ENTRYPOINT"]
        if not entry or binary not in entry[-1]:
            fails.add(args.file, None, f"target {binary}: ENTRYPOINT must run {binary}")
        if not any(word == "USER" and not rest.startswith("0") for word, rest in stage):
            fails.add(args.file, None, f"target {binary}: needs a non-root USER")
    return fails.finish(f"{args.file}: {len(stages)} stages, one binary per image, stripped, pinnable bases")


def cmd_build_context(args):
    """eastwest-certs writes root keys; the READMEs must not have users write them inside the
    repository (the Docker build context), and .dockerignore keeps key files out anyway."""
    fails = Failures()
    with open(args.dockerignore, encoding="utf-8") as f:
        ignored = {l.strip() for l in f if l.strip() and not l.startswith("#")}
    for pattern in ("**/*.pem", "**/*.key"):
        if pattern not in ignored:
            fails.add(args.dockerignore, None, f"must ignore {pattern}")
    outs = 0
    for readme in args.readme:
        with open(readme, encoding="utf-8") as f:
            text = re.sub(r"\\\n", " ", f.read())
        dirs = {m.group(1): m.group(2).strip("\"'") for m in re.finditer(r"export (\w+)=(\S+)", text)}
        for line in text.splitlines():
            if "eastwest-certs " not in line:
                continue
            for out in re.findall(r"--out[= ](\S+)", line):
                outs += 1
                var = re.match(r"[\"']?\$\{?(\w+)", out)
                root = dirs.get(var.group(1), "") if var else out
                if not (root.startswith(("$HOME", "~", "/")) and not root.startswith(("/work", "/src"))):
                    fails.add(readme, None, f"eastwest-certs --out {out}: must be outside the repository "
                                            f"(an absolute or $HOME path, or a variable exported as one)")
    return fails.finish(f"{outs} eastwest-certs --out paths outside the build context; key files ignored")


# ---------------------------------------------------------------------------------------------
# helpers for the Prometheus part of the test


def cmd_extract_proxy_config(args):
    cm = find(load(args.file), "ConfigMap", "eastwest-proxy-config")
    if not cm:
        print(f"{args.file}: no ConfigMap eastwest-proxy-config", file=sys.stderr)
        return 1
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(cm["data"]["config.yaml"])
    return 0


def cmd_prometheus_test_config(args):
    with open(args.snippet, encoding="utf-8") as f:
        snippet = yaml.safe_load(f)
    jobs = {j.get("job_name"): j for j in snippet.get("scrape_configs", [])}
    scrape_configs = []
    for pair in args.targets:
        name, target = pair.split("=", 1)
        job = jobs.get(name)
        if job is None:
            print(f"{args.snippet}: no job {name}", file=sys.stderr)
            return 1
        # Only discovery (static, for the test) and the interval (fast, for a short test)
        # change; path, scheme and relabelling stay as users get them.
        for key in [k for k in job if k.endswith("_sd_configs")]:
            del job[key]
        job["static_configs"] = [{"targets": [target]}]
        job["scrape_interval"] = "1s"
        scrape_configs.append(job)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": scrape_configs}
    with open(args.out, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--kubernetes-version", required=True)
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)
    g = sub.add_parser("gateway")
    g.add_argument("file")
    g.set_defaults(func=cmd_gateway)
    a = sub.add_parser("args")
    a.add_argument("--binary", action="append", default=[], help="NAME=PATH")
    a.add_argument("files", nargs="+")
    a.set_defaults(func=cmd_args)
    c = sub.add_parser("argv")
    c.add_argument("file")
    c.add_argument("kind")
    c.add_argument("name")
    c.add_argument("--flag", action="append", default=[], help="NAME=VALUE")
    c.add_argument("--replace", action="append", default=[], help="OLD=NEW")
    c.set_defaults(func=cmd_argv)
    i = sub.add_parser("images")
    i.add_argument("--component", required=True, help="deploy/images")
    i.add_argument("files", nargs="+")
    i.set_defaults(func=cmd_images)
    d = sub.add_parser("dockerfile")
    d.add_argument("file")
    d.set_defaults(func=cmd_dockerfile)
    b = sub.add_parser("build-context")
    b.add_argument("--dockerignore", required=True)
    b.add_argument("--readme", action="append", default=[])
    b.set_defaults(func=cmd_build_context)
    e = sub.add_parser("extract-proxy-config")
    e.add_argument("file")
    e.add_argument("out")
    e.set_defaults(func=cmd_extract_proxy_config)
    t = sub.add_parser("prometheus-test-config")
    t.add_argument("snippet")
    t.add_argument("out")
    t.add_argument("targets", nargs="+", metavar="JOB=HOST:PORT")
    t.set_defaults(func=cmd_prometheus_test_config)
    args = p.parse_args()
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
