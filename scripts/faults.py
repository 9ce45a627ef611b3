#!/usr/bin/env python3
"""eastwest fault suite: real eastwest-proxy / eastwest-control processes on loopback, one fault
at a time, each with the figure an operator would look at. Prints a Markdown table.

    python3 scripts/faults.py --bin target/release [--only drain,slowloris] [--out FILE]

Standard library only. Every loop is bounded in count and time; every server binds 127.0.0.1.
scripts/faults.sh builds the release binaries and runs this; faults_harness.py has the parts
every fault uses (backends, clients, gateway processes).
"""

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from faults_harness import (
    ROWS, SERVICE, Fault, Tls, backend_process, echo_on, echo_once, free_port, http_get, ms, pct, relayed,
    row, stop_process, tls_open,
)


# ---------------------------------------------------------------- the faults

async def dead_endpoint(ctx):
    live = await ctx.backend()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connect is refused
    gw = ctx.gateway([dead, live.addr], name="dead")
    ok = await relayed(gw.listen, 200)
    tries = gw.metric("eastwest_upstream_connect_failures_total")
    ejections = gw.metric("eastwest_endpoint_ejections_total")
    row("dead endpoint", "1 refused + 1 live endpoint, 200 new connections",
        "200 relayed; ≤ 2 tried the dead one",
        f"{ok}/200 relayed; dead endpoint tried {tries:.0f}×; ejections {ejections}",
        ok == 200 and tries is not None and tries <= 2)


async def blackholed_endpoint(ctx):
    live = await ctx.backend()
    # A listener whose accept queue is full and never drained drops further SYNs: connects to
    # it hang until the gateway's connect_timeout, like a blackholed pod IP.
    fillers = ctx.sockets()
    hole = socket.socket()
    fillers.append(hole)
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    hole_addr = f"127.0.0.1:{hole.getsockname()[1]}"
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(hole.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    timeout = 1.0
    gw = ctx.gateway([hole_addr, live.addr], name="blackhole",
                     upstream=f"  connect_timeout: {int(timeout * 1000)}ms\n")
    times, failed = [], 0
    for _ in range(100):
        try:
            times.append(await echo_once(gw.listen, timeout=10))
        except Exception:
            failed += 1
    slow = [t for t in times if t >= timeout * 0.9]
    first_slow = next((i for i, t in enumerate(times) if t >= timeout * 0.9), None)
    later_slow = [t for t in times[(first_slow or 0) + 1:] if t >= timeout * 0.9]
    row("blackholed endpoint", f"1 blackholed + 1 live endpoint, connect_timeout {timeout:.0f}s, 100 new connections",
        "after the first timeout no connection waits for it",
        f"{len(times)}/100 relayed; {len(slow)} waited ≥ connect_timeout "
        f"(connection #{first_slow}); p50 {ms(pct(times, 50))}, max {ms(max(times or [0]))}",
        failed == 0 and len(later_slow) == 0)


async def backend_killed(ctx):
    proc_a, addr_a = backend_process(ctx.tls)
    ctx.on_exit(stop_process, proc_a)
    live = await ctx.backend()
    gw = ctx.gateway([addr_a], name="killed")
    streams = []
    for _ in range(50):
        streams.append(await tls_open(gw.listen))
    for r, w in streams:
        await echo_on(r, w, b"before\n")
    gw.write([addr_a, live.addr])
    # The reload must not touch the 50 established streams.
    deadline = time.monotonic() + 10
    while gw.metric("eastwest_config_reloads_total") in (None, 0.0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    proc_a.kill()
    proc_a.wait()

    async def ended(r):
        try:
            return await asyncio.wait_for(r.read(1), 5) == b""
        except (ConnectionError, ssl.SSLError, OSError):
            return True
        except asyncio.TimeoutError:
            return False

    results = await asyncio.gather(*(ended(r) for r, _ in streams))
    took = time.monotonic() - t0
    for _, w in streams:
        w.close()
    ok_after = await relayed(gw.listen, 20)
    ready = http_get(gw.status, "/healthz/ready")[0]
    row("backend killed under streams", "SIGKILL the backend of 50 open streams; a second endpoint stays",
        "all 50 closed promptly; gateway up; new connections relayed",
        f"{sum(results)}/50 closed in {ms(took)}; gateway ready={ready}; {ok_after}/20 new relayed",
        all(results) and ready == 200 and ok_after == 20 and gw.proc.poll() is None)


async def reload_under_load(ctx):
    live = await ctx.backend()
    spare = await ctx.backend()
    gw = ctx.gateway([live.addr], name="reload")
    size, chunk = 256 * 1024, 4096
    async def stream(i):
        r, w = await tls_open(gw.listen)
        sent = bytearray()
        got = bytearray()
        try:
            while len(sent) < size:
                piece = bytes([(i + len(sent) // chunk) % 251]) * chunk
                w.write(piece)
                sent += piece
                await w.drain()
                got += await asyncio.wait_for(r.readexactly(chunk), 10)
                await asyncio.sleep(0.005)
        finally:
            w.close()
        return got == sent

    async def reloads():
        for n in range(20):
            gw.write([live.addr] if n % 2 else [live.addr, spare.addr])
            await asyncio.sleep(0.1)

    before = gw.metric("eastwest_config_reloads_total") or 0
    results, _ = await asyncio.gather(
        asyncio.gather(*(stream(i) for i in range(100)), return_exceptions=True), reloads())
    exact = sum(1 for r in results if r is True)
    reloads_done = (gw.metric("eastwest_config_reloads_total") or 0) - before
    row("reload under load", "100 streams × 256 KiB echoed while the config is rewritten 20× in 2 s",
        "100/100 byte-exact; reloads applied",
        f"{exact}/100 byte-exact; {reloads_done:.0f} reloads applied",
        exact == 100 and reloads_done >= 1)


async def drain(ctx):
    live = await ctx.backend()
    accept, period = 3.0, 6.0
    gw = ctx.gateway([live.addr], name="drain",
                     extra=f"drain_accept_period: {int(accept)}s\ndrain_period: {int(period)}s\n")
    r0, w0 = await tls_open(gw.listen)
    await echo_on(r0, w0, b"open\n")
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    not_ready_at = None
    while time.monotonic() - t0 < 1:
        if http_get(gw.status, "/healthz/ready", timeout=0.5)[0] != 200:
            not_ready_at = time.monotonic() - t0
            break
        await asyncio.sleep(0.005)
    routed = []
    for at in (0.05, 1.0, accept - 0.5):
        await asyncio.sleep(max(0, t0 + at - time.monotonic()))
        try:
            await echo_once(gw.listen, timeout=2)
            routed.append(f"{at:g}s ok")
        except Exception as err:
            routed.append(f"{at:g}s {type(err).__name__}")
    await asyncio.sleep(max(0, t0 + accept + 0.5 - time.monotonic()))
    try:
        await echo_once(gw.listen, timeout=2)
        late = "routed"
    except ConnectionRefusedError:
        late = "refused"
    except Exception as err:
        late = type(err).__name__
    # drain_period counts from the listeners' close, at the end of the accept period.
    await asyncio.sleep(max(0, t0 + accept + period - 1.0 - time.monotonic()))
    try:
        await echo_on(r0, w0, b"still\n", timeout=2)
        survived = True
    except Exception:
        survived = False
    deadline = time.monotonic() + accept + period + 5
    while gw.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    exited = time.monotonic() - t0 if gw.proc.poll() is not None else None
    w0.close()
    ok = (not_ready_at is not None and all(r.endswith("ok") for r in routed)
          and late == "refused" and survived and exited is not None and exited < accept + period + 1.5)
    row("SIGTERM drain", f"drain_accept_period {accept:g}s, drain_period {period:g}s; one open stream",
        "not ready at once; routed until the accept period ends; refused after; stream lives on; exit when drain_period ends",
        f"not ready after {ms(not_ready_at or float('nan'))}; {', '.join(routed)}; "
        f"{accept + 0.5:g}s {late}; stream alive at {accept + period - 1:g}s: {survived}; "
        f"exited at {exited if exited is None else f'{exited:.2f}s'}", ok)


async def fd_limit(ctx):
    live = await ctx.backend()
    limit = 512
    gw = ctx.gateway([live.addr], name="fdlimit",
                     listener="    hello_timeout: 30s\n",
                     prefix=["prlimit", f"--nofile={limit}:{limit}"])
    socks = ctx.sockets()
    loop = asyncio.get_running_loop()
    host, port = gw.listen.rsplit(":", 1)
    for _ in range(limit + 200):
        s = socket.socket()
        s.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(s, (host, int(port))), 5)
        s.send(b"\x16")  # the start of a hello: the gateway holds it until hello_timeout
        socks.append(s)
    # Connections beyond what the gateway can hold must be closed at once, not left queued.
    await asyncio.sleep(1.0)
    closed = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    t = time.monotonic()
    status = http_get(gw.status, "/healthz/ready", timeout=2)[0]
    probe = time.monotonic() - t
    overloaded = gw.metric("eastwest_connections_refused_total")
    held = len(socks) - closed
    for s in socks:
        s.close()
    socks.clear()
    # Once they are gone the gateway serves again.
    deadline = time.monotonic() + 10
    recovered = False
    while time.monotonic() < deadline and not recovered:
        try:
            await echo_once(gw.listen, timeout=2)
            recovered = True
        except Exception:
            await asyncio.sleep(0.1)
    row("idle connections to the fd limit", f"RLIMIT_NOFILE {limit}; {limit + 200} connections each holding half a hello",
        "over-limit connections closed at once, none hanging; status port answers; serves again after",
        f"{held} held, {closed} closed at once (refused counter {overloaded}); status {status} in {ms(probe)}; "
        f"serving again: {recovered}",
        closed > 0 and status == 200 and recovered and held <= limit)


async def slowloris(ctx):
    live = await ctx.backend()
    hello_timeout = 3.0
    gw = ctx.gateway([live.addr], name="slowloris",
                     listener=f"    hello_timeout: {int(hello_timeout)}s\n")
    n = 2000
    base = [await echo_once(gw.listen) for _ in range(100)]
    loop = asyncio.get_running_loop()
    host, port = gw.listen.rsplit(":", 1)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
    closed_at = []

    async def slow():
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (host, int(port)))
            t0 = time.monotonic()
            for i in range(len(hello)):
                try:
                    await loop.sock_sendall(s, hello[i:i + 1])
                except OSError:
                    break
                try:
                    data = await asyncio.wait_for(loop.sock_recv(s, 1), 0.5)
                    if data == b"":
                        break
                except asyncio.TimeoutError:
                    pass
                except OSError:
                    break
                if time.monotonic() - t0 > hello_timeout + 5:
                    break
            closed_at.append(time.monotonic() - t0)
        finally:
            s.close()

    attack = asyncio.gather(*(slow() for _ in range(n)))
    await asyncio.sleep(0.5)
    during = [await echo_once(gw.listen) for _ in range(100)]
    await attack
    timeouts = gw.metric("eastwest_connections_closed_total", result="hello_timeout")
    row("slowloris", f"{n} connections trickling a hello 1 byte / 0.5 s; hello_timeout {hello_timeout:g}s; 100 normal connections meanwhile",
        f"each closed at hello_timeout; normal traffic unaffected",
        f"closed after p50 {pct(closed_at, 50):.2f}s / max {max(closed_at):.2f}s; hello_timeout count {timeouts:.0f}; "
        f"normal p50 {ms(pct(base, 50))} → {ms(pct(during, 50))}, p99 {ms(pct(base, 99))} → {ms(pct(during, 99))}, 100/100 ok",
        len(closed_at) == n and max(closed_at) < hello_timeout + 1.5 and timeouts >= n)


async def status_flood(ctx):
    live = await ctx.backend()
    gw = ctx.gateway([live.addr], name="flood")
    n = ctx.flood
    socks = ctx.sockets()
    loop = asyncio.get_running_loop()
    host, port = gw.status.rsplit(":", 1)
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (host, int(port))), 2)
        except (OSError, asyncio.TimeoutError):
            s.close()
            continue
        if i % 2:
            s.send(b"GET /healthz/ready HTTP/1.1\r\n")  # a slow request head
        socks.append(s)
    times, codes = [], []
    for _ in range(50):
        t = time.monotonic()
        codes.append(await asyncio.to_thread(lambda: http_get(gw.status, "/healthz/ready", timeout=2)[0]))
        times.append(time.monotonic() - t)
    row("status-port flood", f"{len(socks)} idle or half-sent connections held on the status port, then 50 probes",
        "every probe answers within 100 ms",
        f"{codes.count(200)}/50 answered 200; p50 {ms(pct(times, 50))}, max {ms(max(times))}",
        codes.count(200) == 50 and max(times) < 0.1)


async def control_unreachable(ctx):
    live = await ctx.backend()
    kubeconfig = ctx.work / "unreachable.kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c1\n"
        f"clusters: [{{name: c1, cluster: {{server: 'http://127.0.0.1:{free_port()}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c1, context: {cluster: c1, user: u}}]\n")
    listen = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    clog = open(ctx.work / "control.log", "wb")
    ctx.on_exit(clog.close)
    control = subprocess.Popen(
        [str(Path(ctx.bin) / "eastwest-control"), "--cluster", "c1", "--network", "network2",
         "--kubeconfig", str(kubeconfig), "--secret-namespace", "", "--listen", listen,
         "--admin", admin, "--plaintext", "--sync-timeout", "2s"],
        stdout=clog, stderr=subprocess.STDOUT)
    ctx.on_exit(stop_process, control)
    # A route cache as a previous, fully synced control left it.
    cache = ctx.work / "routes.json"
    table = {"version": 7, "services": [{"hostname": SERVICE, "ports": [
        {"port": 8000, "endpoints": [{"address": live.addr}]}]}]}
    cache.write_text(json.dumps(table))
    before = cache.read_bytes()
    gw = ctx.gateway([], name="control", wait_ready=False,
                     args=["--control", f"http://{listen}", "--cluster", "c1", "--network", "network2",
                           "--route-cache", str(cache)])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and http_get(gw.status, "/healthz/ready")[0] != 200:
        await asyncio.sleep(0.05)
    # Past control's sync timeout (2 s) and a few publication rounds.
    await asyncio.sleep(4)
    ok = await relayed(gw.listen, 20)
    ready = http_get(gw.status, "/healthz/ready")[0]
    unchanged = cache.read_bytes() == before
    row("control with an unreachable API server", "valid route cache; control's only API server never answers; 4 s past its sync timeout",
        "gateway routes from its cache, stays ready, cache unchanged",
        f"{ok}/20 relayed; ready={ready}; cache unchanged: {unchanged}",
        ok == 20 and ready == 200 and unchanged)


FAULTS = {
    "dead": dead_endpoint,
    "blackhole": blackholed_endpoint,
    "killed": backend_killed,
    "reload": reload_under_load,
    "drain": drain,
    "fdlimit": fd_limit,
    "slowloris": slowloris,
    "flood": status_flood,
    "control": control_unreachable,
}


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release", help="directory with eastwest-proxy and eastwest-control")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(FAULTS)}")
    ap.add_argument("--flood", type=int, default=10000, help="connections held against the status port")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flood = min(args.flood, hard - 1000)
    with tempfile.TemporaryDirectory(prefix="eastwest-faults.") as work:
        work = Path(work)
        tls = Tls(work)
        names = [n for n in args.only.split(",") if n] or list(FAULTS)
        for name in names:
            try:
                # Whatever the fault started is stopped when it ends, however it ends.
                async with contextlib.AsyncExitStack() as stack:
                    ctx = Fault(args.bin, work, tls, flood, stack)
                    await asyncio.wait_for(FAULTS[name](ctx), 120)
            except Exception as err:  # one broken fault must not hide the others
                row(name, "—", "—", f"harness error: {type(err).__name__}: {err}", False)
    table = ["| fault | what was done | expected | measured | result |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in ROWS]
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(r[4] == "pass" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
