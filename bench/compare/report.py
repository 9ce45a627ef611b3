#!/usr/bin/env python3
"""Renders bench/compare/run.sh results (one JSON object per target and phase) as Markdown."""

import json
import sys

ORDER = ["direct", "eastwest", "nginx", "haproxy"]


def load(path):
    by = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by.setdefault(r["target"], {})[r["phase"]] = r
    return by


def get(by, target, phase, key):
    return by.get(target, {}).get(phase, {}).get(key)


def per(cpu_s, count, scale):
    if cpu_s is None or not count:
        return None
    return cpu_s * scale / count


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def figures(by, t):
    ka = by.get(t, {}).get("keepalive", {})
    co = by.get(t, {}).get("connect", {})
    bu = by.get(t, {}).get("bulk", {})
    la = by.get(t, {}).get("latency", {})
    idle = by.get(t, {}).get("idle", {})
    rss = idle.get("rss_kib")
    rss0 = idle.get("rss_before_kib")
    conns = idle.get("connections")
    return {
        "ka": ka.get("requests_per_sec"),
        "cps": co.get("connects_per_sec"),
        "mbps": bu.get("mb_per_sec"),
        "p50": la.get("p50_us"),
        "p99": la.get("p99_us"),
        "rss": rss / 1024 if rss is not None else None,
        "kib_per_conn": (rss - rss0) / conns if rss is not None and conns else None,
        "idle_conns": conns,
        "us_req": per(ka.get("gw_cpu_s"), ka.get("requests"), 1e6),
        "us_req1": per(la.get("gw_cpu_s"), la.get("requests"), 1e6),
        "us_conn": per(co.get("gw_cpu_s"), co.get("connects"), 1e6),
        "us_mb": per(bu.get("gw_cpu_s"), (bu.get("bytes") or 0) / 1e6, 1e6),
        "ka_p50": ka.get("p50_us"),
        "ka_p99": ka.get("p99_us"),
        "co_p50": co.get("p50_us"),
        "co_p99": co.get("p99_us"),
        "errors": sum((by.get(t, {}).get(p, {}).get("errors") or 0) for p in by.get(t, {})),
    }


def main():
    by = load(sys.argv[1])
    targets = [t for t in ORDER if t in by] + [t for t in by if t not in ORDER]
    f = {t: figures(by, t) for t in targets}
    idle_n = next((f[t]["idle_conns"] for t in targets if f[t]["idle_conns"]), None)
    out = []
    out.append(
        "| | keep-alive req/s | new TLS conn/s | bulk MB/s | p50 µs | p99 µs "
        f"| RSS MiB @{fmt(idle_n)} idle | KiB/idle conn "
        "| gateway CPU µs/req | µs/conn | µs/MB (= ms/GB) |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        x = f[t]
        out.append(
            f"| {t} | {fmt(x['ka'])} | {fmt(x['cps'])} | {fmt(x['mbps'])} | {fmt(x['p50'])} "
            f"| {fmt(x['p99'])} | {fmt(x['rss'], 1)} | {fmt(x['kib_per_conn'], 2)} "
            f"| {fmt(x['us_req'], 1)} | {fmt(x['us_conn'], 1)} | {fmt(x['us_mb'], 1)} |"
        )
    out.append("")
    if "direct" in f:
        d = f["direct"]
        out.append("Ratios to direct (throughput: higher is better; latency: lower is better):")
        out.append("")
        out.append("| | keep-alive req/s | new TLS conn/s | bulk MB/s | p50 | p99 |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for t in targets:
            if t == "direct":
                continue
            cells = []
            for k in ["ka", "cps", "mbps", "p50", "p99"]:
                a, b = f[t][k], d[k]
                cells.append(f"{a / b:.2f}" if a is not None and b else "—")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "Details: latency under keep-alive load and per new connection (µs), gateway CPU per "
        "request at concurrency 1, errors:"
    )
    out.append("")
    out.append(
        "| | keep-alive p50 | keep-alive p99 | connect p50 | connect p99 "
        "| CPU µs/req @1 conn | errors |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        x = f[t]
        out.append(
            f"| {t} | {fmt(x['ka_p50'])} | {fmt(x['ka_p99'])} | {fmt(x['co_p50'])} "
            f"| {fmt(x['co_p99'])} | {fmt(x['us_req1'], 1)} | {x['errors']} |"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
