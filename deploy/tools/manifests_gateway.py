"""`manifests.py gateway`: the rendered gateway overlay keeps the promises deploy/README.md makes
(labels, ports, probes, OCI load balancer, route cache, remote reader, ...)."""

import re

import yaml

from manifests_lib import Failures, find, load


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
