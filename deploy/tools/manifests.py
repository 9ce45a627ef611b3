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

from manifests_gateway import cmd_gateway
from manifests_images import cmd_build_context, cmd_dockerfile, cmd_images
from manifests_lib import Failures, find, ident, load


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
