#!/usr/bin/env python3
"""Renders bench/compare/run.sh results (one JSON object per target and phase) as Markdown."""

import json
import statistics
import sys

ORDER = [
    "direct",
    "eastwest",
    "eastwest-nosplice",
    "eastwest-notiming",
    "eastwest-base",
    "nginx",
    "nginx-halfclose",
    "haproxy",
    "haproxy-splice",
    "tokio-floor",
    "floor",
]


def load(path):
    """{target: {round: {phase: record}}}; the idle phase (round 1 only) joins every round."""
    by = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rounds = by.setdefault(r["target"], {})
                rounds.setdefault(r.get("round", 1), {})[r["phase"]] = r
    for rounds in by.values():
        idle = next((p["idle"] for p in rounds.values() if "idle" in p), None)
        for phases in rounds.values():
            if idle is not None:
                phases.setdefault("idle", idle)
    return by


def per(cpu_s, count, scale):
    if cpu_s is None or not count:
        return None
    return cpu_s * scale / count


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def round_figures(phases):
    ka = phases.get("keepalive", {})
    co = phases.get("connect", {})
    bu = phases.get("bulk", {})
    la = phases.get("latency", {})
    lg = phases.get("large", {})
    idle = phases.get("idle", {})
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
        "lg_mbps": lg.get("mb_per_sec"),
        "lg_us_mb": per(lg.get("gw_cpu_s"), (lg.get("bytes") or 0) / 1e6, 1e6),
        "ka_p50": ka.get("p50_us"),
        "ka_p99": ka.get("p99_us"),
        "co_p50": co.get("p50_us"),
        "co_p99": co.get("p99_us"),
        "errors": sum((r.get("errors") or 0) for p, r in phases.items() if p != "idle"),
    }


def median_figures(rounds):
    """Per figure, the median over rounds (and the range, for the noise table)."""
    per_round = [round_figures(p) for p in rounds.values()]
    out, spread = {}, {}
    for k in per_round[0]:
        vals = [r[k] for r in per_round if r[k] is not None]
        if k == "errors":
            out[k] = sum(vals)
        else:
            out[k] = statistics.median(vals) if vals else None
            spread[k] = (min(vals), max(vals)) if vals else None
    return out, spread, len(per_round)


def main():
    by = load(sys.argv[1])
    targets = [t for t in ORDER if t in by] + [t for t in by if t not in ORDER]
    med = {t: median_figures(by[t]) for t in targets}
    f = {t: med[t][0] for t in targets}
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
    out.append("")
    out.append("Range (min–max) over rounds, to judge the noise:")
    out.append("")
    out.append("| | rounds | keep-alive req/s | new TLS conn/s | bulk MB/s | p99 µs "
               "| CPU µs/req | µs/conn | µs/MB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        _, sp, n = med[t]

        def rng(k, d=0):
            return "—" if sp.get(k) is None else f"{fmt(sp[k][0], d)}–{fmt(sp[k][1], d)}"

        out.append(
            f"| {t} | {n} | {rng('ka')} | {rng('cps')} | {rng('mbps')} | {rng('p99')} "
            f"| {rng('us_req', 1)} | {rng('us_conn', 1)} | {rng('us_mb', 1)} |"
        )
    if any(f[t]["lg_mbps"] for t in targets):
        out.append("")
        out.append(
            "Large responses (the `large` phase: request/response on a few kept-alive "
            "connections), median and range over rounds:"
        )
        out.append("")
        out.append("| | MB/s | ratio to direct | MB/s range | gateway CPU µs/MB | µs/MB range |")
        out.append("|---|---:|---:|---:|---:|---:|")
        d = f.get("direct", {}).get("lg_mbps")
        for t in targets:
            x, sp = f[t], med[t][1]

            def rng(k, d=0):
                return "—" if sp.get(k) is None else f"{fmt(sp[k][0], d)}–{fmt(sp[k][1], d)}"

            ratio = f"{x['lg_mbps'] / d:.2f}" if x["lg_mbps"] and d else "—"
            out.append(
                f"| {t} | {fmt(x['lg_mbps'])} | {ratio} | {rng('lg_mbps')} "
                f"| {fmt(x['lg_us_mb'], 1)} | {rng('lg_us_mb', 1)} |"
            )
    out.extend(paired(by, targets))
    print("\n".join(out))


# Figure, label, and whether higher is better.
PAIRED = [
    ("ka", "keep-alive req/s", True),
    ("cps", "new TLS conn/s", True),
    ("mbps", "bulk MB/s", True),
    ("p50", "p50 µs", False),
    ("p99", "p99 µs", False),
    ("us_req", "CPU µs/req", False),
    ("us_conn", "CPU µs/conn", False),
    ("us_mb", "CPU µs/MB", False),
    ("lg_mbps", "large MB/s", True),
    ("lg_us_mb", "large CPU µs/MB", False),
]


def paired(by, targets, subject="eastwest"):
    """Per figure, eastwest against each peer round by round (the rounds interleave the targets,
    so a round's figures share the machine's load of the moment): the median of the per-round
    ratios, and in how many rounds eastwest was at least as good."""
    peers = [t for t in targets if t not in ("direct", subject)]
    if subject not in by or not peers:
        return []
    mine = {r: round_figures(p) for r, p in by[subject].items()}
    out = [
        "",
        f"Paired by round: {subject} ÷ peer, median of the per-round ratios (> 1 is better for "
        "throughput, < 1 for latency and CPU), and the rounds where "
        f"{subject} was at least as good:",
        "",
        "| | " + " | ".join(label for _, label, _ in PAIRED) + " |",
        "|---|" + "---:|" * len(PAIRED),
    ]
    for peer in peers:
        theirs = {r: round_figures(p) for r, p in by[peer].items()}
        cells = []
        for key, _, higher in PAIRED:
            pairs = [
                (mine[r][key], theirs[r][key])
                for r in mine
                if r in theirs and mine[r][key] and theirs[r][key]
            ]
            if not pairs:
                cells.append("—")
                continue
            ratio = statistics.median(a / b for a, b in pairs)
            wins = sum(1 for a, b in pairs if (a >= b if higher else a <= b))
            cells.append(f"{ratio:.3f} ({wins}/{len(pairs)})")
        out.append(f"| vs {peer} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    main()
