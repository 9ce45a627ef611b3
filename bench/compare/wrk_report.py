#!/usr/bin/env python3
"""Renders bench/compare/wrk.sh results (one JSON object per target, phase and round) as Markdown:
medians with [min–max] over rounds, throughput paired with direct round by round, and eastwest's
gateway CPU paired with each peer's round by round."""

import json
import statistics
import sys

ORDER = ["direct", "eastwest", "eastwest-nosplice", "eastwest-base", "nginx", "nginx-halfclose", "haproxy",
         "haproxy-splice", "tokio-floor", "floor"]
# phase: (rate label, rate unit per request, CPU label, CPU scale per request)
PHASES = {
    "ka": ("keep-alive req/s", "req", "µs/req"),
    "conn": ("new TLS conn/s", "req", "µs/conn"),
    "large": ("wrk 1 MiB MB/s", "mb", "µs/MB"),
    "h2large": ("h2load 1 MiB MB/s", "mb", "µs/MB"),
}


def units(r):
    """Requests, or MB (10^6 bytes) of response bodies."""
    return r["requests"] * r["size"] / 1e6 if PHASES[r["phase"]][1] == "mb" else r["requests"]


def rate(r):
    return units(r) / r["secs"] if r["secs"] else None


def cpu_per(r):
    if r.get("gw_cpu_s") is None or not units(r):
        return None
    return r["gw_cpu_s"] * 1e6 / units(r)


def split_per(r, key):
    """Microseconds of user (`gw_user_s`) or system (`gw_sys_s`) CPU per unit."""
    if r.get(key) is None or not units(r):
        return None
    return r[key] * 1e6 / units(r)


def summary(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{min(values):,.{digits}f}–{max(values):,.{digits}f}]"


def main(path):
    runs = {}  # (target, phase) -> {round: record}
    loads = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                runs.setdefault((r["target"], r["phase"]), {})[r["round"]] = r
                loads.append(r.get("load"))
    targets = [t for t in ORDER if any(k[0] == t for k in runs)]
    targets += sorted({k[0] for k in runs} - set(targets))
    phases = [p for p in PHASES if any(k[1] == p for k in runs)]
    loads = [l for l in loads if l is not None]

    rows_per_target(
        None, [c for p in phases for c in (PHASES[p][0], "gateway CPU " + PHASES[p][2])], targets, (),
        lambda t: [cell for p in phases for cell in (
            summary([rate(r) for r in runs.get((t, p), {}).values()], 0),
            summary([cpu_per(r) for r in runs.get((t, p), {}).values()], 1))])

    if any(k[0] == "direct" for k in runs):
        def vs_direct(t, p):
            rs, ds = runs.get((t, p), {}), runs.get(("direct", p), {})
            return summary([rate(rs[k]) / rate(ds[k]) for k in rs if k in ds and rate(ds[k])], 2)

        rows_per_target(
            "Throughput ÷ direct, paired by round (median [min–max]):",
            [PHASES[p][0].replace(" MB/s", "").replace(" req/s", "").replace(" conn/s", "") for p in phases],
            targets, ("direct",), lambda t: [vs_direct(t, p) for p in phases])

    if any(k[0] == "eastwest" for k in runs):
        def vs_peer(t, p):
            es, ps = runs.get(("eastwest", p), {}), runs.get((t, p), {})
            return summary([
                cpu_per(es[k]) / cpu_per(ps[k])
                for k in es
                if k in ps and cpu_per(es[k]) is not None and cpu_per(ps[k])
            ], 2)

        rows_per_target(
            "eastwest gateway CPU ÷ peer's, paired by round (median [min–max]; below 1: eastwest cheaper):",
            [PHASES[p][2] + " (" + p + ")" for p in phases], targets, ("direct", "eastwest"),
            lambda t: [vs_peer(t, p) for p in phases], label="vs {}")
    split_table(runs, targets, phases)
    neighbours_table(runs, targets, phases)
    perf_table(runs, targets, phases)
    errors = sum(r["errors"] for rs in runs.values() for r in rs.values())
    if loads:
        print(f"Load average (1 min) during phases: {min(loads):.2f}–{max(loads):.2f}. Client errors: {errors}.")


def split_table(runs, targets, phases):
    """The gateway CPU above, split: user space (the gateway's own code) and system (the kernel)."""
    if not any(r.get("gw_user_s") is not None for rs in runs.values() for r in rs.values()):
        return
    rows_per_target(
        "Gateway CPU per unit split into user space and kernel (µs; median [min–max]):",
        [c for p in phases for c in (f"user {PHASES[p][2]}", f"system {PHASES[p][2]}")], targets, ("direct",),
        lambda t: [summary([split_per(r, k) for r in runs.get((t, p), {}).values()], 1)
                   for p in phases for k in ("gw_user_s", "gw_sys_s")])


def rows_per_target(title, columns, targets, skip, cells, label="{}"):
    """A table with a row per target (but those in `skip`): `cells(target)` in `columns`."""
    if title:
        print(title)
        print()
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for t in targets:
        if t not in skip:
            print(f"| {label.format(t)} | " + " | ".join(cells(t)) + " |")
    print()


def neighbours_table(runs, targets, phases):
    """What each relay costs the client and backend: their core busy per unit, the backend
    alone, and how often the gateway slept (a wake-up its sender pays for on the other core)."""

    def cells(rs):
        out = [summary([r[k] * 1e6 / units(r) for r in rs], 1) for k in ("lg_core_s", "backend_cpu_s")]
        return out + [summary([r["gw_sleeps"] / units(r) for r in rs if r.get("gw_sleeps") is not None], 2)]

    rows_per_phase(
        runs, targets, phases, lambda r: r.get("lg_core_s") is not None,
        "The client+backend core per unit (µs busy, the backend's share of it), and the gateway's\n"
        "sleeps per unit (voluntary context switches); median [min–max]:",
        ["client+backend core", "backend", "gateway sleeps"], cells)


def perf_table(runs, targets, phases):
    """With PERF_STAT set: `perf stat` on the gateway, per unit of each phase (request, or MB)."""

    def cells(rs):
        out = [
            summary([r["task_clock_s"] * 1e6 / units(r) for r in rs], 1),
            summary([r["cs"] / units(r) for r in rs], 2),
        ]
        # Only with PERF_STAT=syscalls; "—" otherwise.
        return out + [summary([r[k] / units(r) for r in rs if k in r], 2) for k in ("syscalls", "epoll_waits")]

    rows_per_phase(
        runs, targets, phases, lambda r: "task_clock_s" in r,
        "`perf stat` on the gateway, per unit (request or MB); median [min–max]:",
        ["task-clock µs", "context switches", "syscalls", "epoll_wait"], cells)


def rows_per_phase(runs, targets, phases, has, title, columns, cells):
    """A table with a row per target and phase, of the records that `has` what it shows; none if
    no record has it."""
    if not any(has(r) for rs in runs.values() for r in rs.values()):
        return
    print(title)
    print()
    print("| target | phase | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for t in targets:
        for p in phases:
            rs = [r for r in runs.get((t, p), {}).values() if has(r) and units(r)]
            if rs:
                print(f"| {t} | {p} | " + " | ".join(cells(rs)) + " |")
    print()


if __name__ == "__main__":
    main(sys.argv[1])
