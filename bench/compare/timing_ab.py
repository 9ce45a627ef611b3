#!/usr/bin/env python3
"""Token timing's CPU cost from a bench/compare/run.sh results file (OUT=...md writes the
.jsonl beside it): the gateway with token timing against the same build without it
(`eastwest-notiming`, `telemetry.token_timing: false`), rounds interleaved.

  bench/compare/timing_ab.py RESULTS.jsonl [OFF_TARGET [ON_TARGET ...]]
  (default: eastwest-notiming against eastwest; add eastwest-base for an older build)

A target listed twice in TARGETS (A B B A, to cancel the order within a round) is averaged
within its round. Per phase: the gateway's CPU (utime+stime from /proc) per request (latency,
keepalive, stream) or per MB (bulk, large), median and range over the rounds, and each ON
target's cost: the median over rounds of (on / off - 1), paired by round, with its range.
"""
import json
import statistics
import sys

PER_REQUEST = {"latency", "keepalive", "stream", "connect"}


def unit(r):
    cpu = r.get("gw_cpu_s")
    if cpu is None:
        return None
    if r["phase"] in PER_REQUEST:
        return cpu * 1e6 / r["requests"] if r.get("requests") else None
    mb = r.get("bytes", 0) / 1e6
    return cpu * 1e6 / mb if mb else None


def fmt(v):
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def main():
    path = sys.argv[1]
    off = sys.argv[2] if len(sys.argv) > 2 else "eastwest-notiming"
    ons = sys.argv[3:] or ["eastwest"]
    # {phase: {target: {round: [unit, ...]}}}
    by = {}
    rates = {}
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["phase"] == "idle" or unit(r) is None:
            continue
        by.setdefault(r["phase"], {}).setdefault(r["target"], {}).setdefault(r["round"], []).append(unit(r))
        key = "requests_per_sec" if r["phase"] in PER_REQUEST else "mb_per_sec"
        rates.setdefault((r["phase"], r["target"]), []).append(r.get(key, 0))
    print("| phase | unit | target | CPU median (range) | rounds | cost vs "
          f"{off}: median (range) of on/off − 1 | throughput median |")
    print("|---|---|---|---|---|---|---|")
    for phase, targets in by.items():
        name = "µs/request" if phase in PER_REQUEST else "µs/MB"
        per = "/s" if phase in PER_REQUEST else " MB/s"
        base = {rnd: statistics.mean(v) for rnd, v in targets.get(off, {}).items()}
        for target in [off] + ons:
            runs = {rnd: statistics.mean(v) for rnd, v in targets.get(target, {}).items()}
            if not runs:
                continue
            xs = list(runs.values())
            cost = ""
            if target != off:
                ratios = [runs[i] / base[i] - 1 for i in sorted(set(runs) & set(base))]
                if ratios:
                    cost = (f"**{statistics.median(ratios) * 100:+.1f} %** "
                            f"({min(ratios) * 100:+.1f} … {max(ratios) * 100:+.1f} %)")
            rate = statistics.median(rates[(phase, target)])
            print(f"| {phase} | {name} | {target} | {fmt(statistics.median(xs))} "
                  f"({fmt(min(xs))}–{fmt(max(xs))}) | {len(xs)} | {cost} | {rate:,.0f}{per} |")


if __name__ == "__main__":
    main()
