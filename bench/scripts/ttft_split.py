"""Where does each client's TTFT go? sglang's bench_serving and `eastwest-bench run`, one after
the other against one `eastwest-bench serve`, each under `perf trace` (kernel tracepoints, no
ptrace stops), then every request's TTFT split at its syscalls:

    pre      client's start of the request -> socket() returns   (sglang: its perf_counter st)
    connect  socket() -> connect() returns (EINPROGRESS)
    request  connect() -> the write that sends the request (headers and body, one write)
    server   request written -> the read() that returns the first token's SSE event, split
             by serve's own trace (same clock) into
               to serve   request written -> serve's read() of it returns
               in serve   that read -> serve's write of the first token returns
               to client  that write -> the client's read() of it returns
    post     that read() -> the client's TTFT stamp                 (sglang: st + ttft)

For eastwest, whose per-request start is not exported, `pre + post` is TTFT minus the wire
part (socket() -> first-token read). sglang's client leaves getpgid() marks in the trace with
its CLOCK_MONOTONIC stamps, which map its perf_counter onto the trace clock. Requests are
matched in sending order (warmup included; at these rates requests do not overtake each other
between socket() and the first token).

    python bench/scripts/ttft_split.py --bench target/release/eastwest-bench \\
        [--rate 5] [--num-prompts 100] [--ttft 20ms] [--rounds 2] [--out DIR]

Run it with the python that runs bench/scripts/sglang_bench_serving.py, as root (perf trace),
under the benchmark lock. Each round runs sglang then eastwest untraced, then both traced.
"""

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MARK = 424200  # getpgid(MARK + i): clock marks the sglang client leaves in the trace
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")
SERVE_TRACED = "accept,accept4,sendto,sendmsg,write,writev,recvfrom,recvmsg,read,close"
TRACED = "socket,connect,sendto,sendmsg,write,writev,recvfrom,recvmsg,read,close,getpgid"


def leave_marks(base):
    """getpgid(MARK + base + i) calls bracketed by CLOCK_MONOTONIC (= perf_counter) stamps."""
    pairs = []
    for i in range(20):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            os.getpgid(MARK + base + i)
        except OSError:
            pass
        pairs.append((base + i, before, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
    return pairs


def sglang_client(records_path, argv):
    """Runs bench_serving's CLI unchanged, keeping each request's own st and ttft."""
    sys.path.insert(0, HERE)
    import sglang_bench_serving

    sglang_bench_serving.install_stubs()
    import sglang.benchmark.serving as serving

    records = []

    def keep(func):
        async def timed(request_func_input, pbar=None):
            out = await func(request_func_input, pbar)
            records.append({"st": out.start_time, "ttft": out.ttft, "ok": out.success})
            return out

        return timed

    for name, func in list(serving.ASYNC_REQUEST_FUNCS.items()):
        serving.ASYNC_REQUEST_FUNCS[name] = keep(func)
    marks = leave_marks(0)
    sys.argv = ["sglang.bench_serving"] + argv
    try:
        serving.cli_main()
    finally:
        with open(records_path, "w") as f:
            json.dump({"marks": marks + leave_marks(20), "requests": records}, f)


LINE = re.compile(r"^\s*(\d+\.\d+) \(\s*([\d.]*)(?: ms)?\s*\): (\S+)/(\d+)\s+(.*)$")
CALL = re.compile(r"^(\w+)\((.*)\)\s+= (-?\d+)?")


def parse_trace(path):
    """`perf trace -T` output: per benchmark connection, the stamps (ms, perf clock) of its
    syscalls, in order of socket() or accept(); and the getpgid() clock marks.

    A benchmark connection streams a POST: dialled, its first write is a request of >= 200
    bytes answered by >= 3 reads; accepted, it reads such a request before its first write
    and writes >= 3 times. serve sends the response headers at once and the first token ttft
    later, so the headers and the first token's SSE event are the first and second read
    (write)."""
    conns, open_fd, marks, entry = [], {}, {}, {}
    with open(path, errors="replace") as f:
        lines = [m for m in map(LINE.match, f) if m]
    # perf trace prints each CPU's events in order, not all of them: an fd's close() may
    # come after the socket() that reused it. Entry stamps order them (stable sort keeps an
    # interrupted call's entry before its continuation, which repeats the entry stamp).
    lines.sort(key=lambda m: float(m.group(1)))
    for m in lines:
        ts, dur, tid, rest = float(m.group(1)), m.group(2), m.group(4), m.group(5)
        if not dur:  # entry of a call another thread's output interrupted
            c = re.match(r"^(\w+)\((.*)\)\s+\.\.\.$", rest.strip())
            if c:
                entry[tid] = c.group(2)
            continue
        continued = rest.strip().startswith("... [continued]: ")
        c = CALL.match(re.sub(r"^\.\.\. \[continued\]: ", "", rest.strip()))
        if not c:
            continue
        name, args, ret = c.group(1), c.group(2), c.group(3)
        if continued:
            args = entry.pop(tid, args)
        ret = int(ret) if ret is not None else 0
        done = ts + float(dur)
        if name == "getpgid":
            marks[int(re.search(r"pid: (\d+)", args).group(1)) - MARK] = (ts, done)
            continue
        if (name == "socket" and "STREAM" in args or name.startswith("accept")) and ret >= 0:
            open_fd[ret] = {"opened": done, "accepted": name != "socket", "events": []}
            continue
        fm = re.match(r"fd: (\d+)", args)
        if not fm or int(fm.group(1)) not in open_fd:
            continue
        fd = int(fm.group(1))
        conn = open_fd[fd]
        if name == "close":
            del open_fd[fd]
            conns.append(conn)
            continue
        conn["events"].append((name, ts, done, ret))
    conns.extend(open_fd.values())  # a process may exit without closing
    out = []
    for conn in conns:
        ev = conn["events"]
        writes = [e for e in ev if e[0] in ("sendto", "sendmsg", "write", "writev") and e[3] > 0]
        reads = [e for e in ev if e[0] in ("recvfrom", "recvmsg", "read") and e[3] > 0]
        if conn["accepted"]:
            # serve first reads 24 bytes (is it HTTP/2's preface?), then the rest.
            request = [r for r in reads if writes and r[2] <= writes[0][1]]
            if sum(r[3] for r in request) < 200 or len(writes) < 3:
                continue
            out.append({
                "opened": conn["opened"],
                "request_read": request[-1][2],
                "headers_written": writes[0][2],
                "first_token_written": writes[1][2],
            })
            continue
        connect = next((e for e in ev if e[0] == "connect"), None)
        if connect is None or not writes or writes[0][3] < 200 or len(reads) < 3:
            continue
        before_resp = [w for w in writes if w[2] <= reads[0][1]]
        out.append({
            "opened": conn["opened"],
            "connect": connect[2],
            "request_written": before_resp[-1][2],
            "request_writes": len(before_resp),
            "request_bytes": [w[3] for w in before_resp],
            "first_response_read": reads[0][2],
            "first_token_read": reads[1][2],
        })
    out.sort(key=lambda c: c["opened"])
    return out, marks


def med(xs):
    """Median (p10–p90) of seconds, in ms."""
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3
    return f"{statistics.median(xs) * 1e3:.3f} ({p(0.1):.3f}–{p(0.9):.3f})"


def one_run(args, out, tag, tool, traced, common, env, serve_pid):
    """One client run; its result and, traced, its per-request TTFT parts (seconds)."""
    jsonl = os.path.join(out, f"{tag}.jsonl")
    if os.path.exists(jsonl):
        os.remove(jsonl)
    records = os.path.join(out, f"{tag}.records.json")
    if tool == "sglang":
        cmd = [sys.executable, os.path.abspath(__file__), "--sglang-client", records]
    else:
        cmd = [args.bench, "run"]
    trace = os.path.join(out, f"{tag}.perf")
    if traced:
        cmd = ["perf", "trace", "-T", "-e", TRACED, "-o", trace, "--"] + cmd
    serve_trace = os.path.join(out, f"{tag}.serve.perf")
    tracer = None
    if traced:
        # serve's side of the same requests, on the same clock.
        tracer = subprocess.Popen(["perf", "trace", "-T", "-e", SERVE_TRACED, "-o", serve_trace,
                                   "-p", str(serve_pid)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(serve_trace) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # attaching to the threads takes a moment after the file appears
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open(os.path.join(out, f"{tag}.log"), "w") as log:
            subprocess.run(cmd + common + ["--output-file", jsonl], env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    finally:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if tracer:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
    with open(jsonl) as f:
        res = json.loads(f.readline())
    res["cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"{tag}: TTFT mean {res['mean_ttft_ms']:.3f} median {res['median_ttft_ms']:.3f} "
          f"p99 {res['p99_ttft_ms']:.3f} ms; client CPU (utime+stime, whole process) "
          f"{res['cpu']:.2f} s", flush=True)
    if not traced:
        return res, {}
    return res, split(tool, res, trace, serve_trace, records)


def split(tool, res, trace, serve_trace, records):
    """Per-request TTFT parts (seconds) of one traced run."""
    conns, marks = parse_trace(trace)
    served, _ = parse_trace(serve_trace)
    ttfts = res["ttfts"]
    # warmup first, then the benchmark requests in sending order
    conns = conns[len(conns) - len(ttfts):]
    served = served[len(served) - len(ttfts):]
    assert len(conns) == len(ttfts) == len(served), (len(conns), len(ttfts), len(served))
    print(f"  {len(conns)} POSTs, {len({c['opened'] for c in conns})} sockets; request "
          f"writes before the response: {sorted({c['request_writes'] for c in conns})} "
          f"(bytes e.g. {conns[0]['request_bytes']})")
    ms = 1e-3
    parts = {k: [] for k in ("pre", "connect", "request", "server", "to serve", "in serve",
                             "to client", "post", "pre+post")}
    reqs, offset = None, None
    if tool == "sglang":
        with open(records) as f:
            rec = json.load(f)
        # trace clock (ms) - CLOCK_MONOTONIC (ns), from the tightest mark at each end
        offs = []
        for half in (rec["marks"][:20], rec["marks"][20:]):
            i, a, b = min(half, key=lambda m: m[2] - m[1])
            entry, done = marks[i]
            offs.append(((entry + done) / 2 - (a + b) / 2e6) * ms)
        print(f"  trace clock vs perf_counter: drift over the run {(offs[1] - offs[0]) * 1e6:.1f} us")
        offset = offs[0]
        reqs = sorted(rec["requests"], key=lambda r: r["st"])[-len(ttfts):]
        for r, t in zip(reqs, ttfts):
            assert abs(r["ttft"] - t) < 1e-9
    for i, (c, t) in enumerate(zip(conns, ttfts)):
        parts["connect"].append((c["connect"] - c["opened"]) * ms)
        parts["request"].append((c["request_written"] - c["connect"]) * ms)
        parts["server"].append((c["first_token_read"] - c["request_written"]) * ms)
        v = served[i]
        parts["to serve"].append((v["request_read"] - c["request_written"]) * ms)
        parts["in serve"].append((v["first_token_written"] - v["request_read"]) * ms)
        parts["to client"].append((c["first_token_read"] - v["first_token_written"]) * ms)
        parts["pre+post"].append(t - (c["first_token_read"] - c["opened"]) * ms)
        if reqs is not None:
            st = reqs[i]["st"] + offset
            parts["pre"].append(c["opened"] * ms - st)
            parts["post"].append(st + t - c["first_token_read"] * ms)
    print("  ms, median (p10–p90): TTFT " + med(ttfts) + "; " + "; ".join(
        f"{k} {med(v)}" for k, v in parts.items() if v), flush=True)
    return {k: v for k, v in parts.items() if v}


def main():
    if sys.argv[1:2] == ["--sglang-client"]:
        # bench_serving's own arguments follow untouched (ours share names with them).
        return sglang_client(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench")
    ap.add_argument("--rate", default="5")
    ap.add_argument("--num-prompts", default="100")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttft", default="20ms")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ttft-split-")
    os.makedirs(out, exist_ok=True)
    serve = subprocess.Popen(
        [args.bench, "serve", "--listen", "127.0.0.1:0", "--model", "demo-model",
         "--ttft", args.ttft, "--itl", "7ms", "--seed", "0"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = serve.stdout.readline().strip().rsplit(" ", 1)[-1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        common = [
            "--backend", "sglang-oai", "--base-url", url, "--model", "demo-model",
            "--tokenizer", TOKENIZER, "--dataset-name", "random-ids",
            "--num-prompts", args.num_prompts, "--random-input-len", "64",
            "--random-output-len", "32", "--random-range-ratio", "0.5",
            "--request-rate", args.rate, "--seed", "42", "--disable-tqdm", "--output-details",
        ]
        rows = {}
        for rnd in range(args.rounds):
            for traced in (False, True):
                for tool in ("sglang", "eastwest"):
                    tag = f"{tool}_{'traced' if traced else 'plain'}_{rnd}"
                    res, parts = one_run(args, out, tag, tool, traced, common, env, serve.pid)
                    key = (tool, traced)
                    rows.setdefault(key, {"ttft": [], "cpu": [], "parts": {}})
                    rows[key]["ttft"].extend(res["ttfts"])
                    rows[key]["cpu"].append(res["cpu"])
                    for k, v in parts.items():
                        rows[key]["parts"].setdefault(k, []).extend(v)
        print("\nall rounds, ms, median (p10–p90) over requests:")
        for (tool, traced), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"{tool:8} {'traced' if traced else 'plain ':6} TTFT {med(row['ttft'])}; "
                  f"CPU per run {', '.join(f'{c:.2f}' for c in row['cpu'])} s")
            for k, v in row["parts"].items():
                print(f"    {k:10} {med(v)}")
    finally:
        serve.terminate()
        serve.wait()
    print(f"(logs, traces and JSON in {out})")


if __name__ == "__main__":
    main()
