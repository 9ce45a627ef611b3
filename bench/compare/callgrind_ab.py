#!/usr/bin/env python3
"""Instructions the gateway spends on a fixed TLS workload, under callgrind: deterministic on a
loaded machine, so two builds can be compared (A/B) to a fraction of a percent.

  bench/compare/callgrind_ab.py OLD_BINARY NEW_BINARY [--requests 500] [--records 20] [--mib 32]

Phases, each a fresh gateway under `valgrind --tool=callgrind` (splice off, so every byte
passes the copy path, where token timing follows records):
  idle      start, one connection with one tiny exchange, stop (the fixed cost subtracted)
  requests  one kept-alive TLS 1.3 connection: N requests, each answered by R records
  bulk      one connection: M MiB server -> client, then M MiB client -> server
  connections  C new TLS connections one after another, each one request, then closed
Counts the whole process; the idle phase (startup, readiness polls, one short exchange) is
subtracted, and its run-to-run spread is the noise floor. Also prints, for the new build, the
inclusive instructions of token timing's record follower (RecordFollower::feed, which in a
release build holds the inlined classification, clock read and metric updates): its share
of the workload is the cost of token timing without A/B noise. Prints instructions per request and per MiB for both binaries and the difference.
"""
import argparse, os, socket, ssl, subprocess, sys, tempfile, threading, time, re, signal

SNI = "outbound_.8000_._.bench.svc.cluster.local"
REQ = b"R" * 200          # one request record
REC = b"t" * 100          # one streamed token record
CHUNK = 16384


def backend(ctx, listener, args):
    while True:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(ctx, raw, args), daemon=True).start()


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(min(n - len(buf), 1 << 20))
        if not got:
            raise EOFError(f"closed after {len(buf)} of {n}")
        buf += got
    return bytes(buf)


def serve(ctx, raw, args):
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s = ctx.wrap_socket(raw, server_side=True)
        while True:
            kind = s.recv(1)
            if not kind:
                return
            if kind == b"q":              # request: 199 more bytes, answer R records
                recv_exact(s, len(REQ) - 1)
                for _ in range(args.records):
                    s.sendall(REC)
            elif kind == b"d":            # download M MiB
                block = b"d" * CHUNK
                for _ in range(args.mib * 1024 * 1024 // CHUNK):
                    s.sendall(block)
            elif kind == b"u":            # upload M MiB, then one record
                recv_exact(s, args.mib * 1024 * 1024)
                s.sendall(REC)
    except (OSError, EOFError, ssl.SSLError):
        return


def client(addr, phase, args):
    if phase == "connections":
        for _ in range(args.connections):
            client(addr, "idle", args)
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(addr)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname=SNI)
    if phase == "idle":
        s.sendall(b"q" + REQ[1:])
        recv_exact(s, len(REC) * args.records)
    elif phase == "requests":
        for _ in range(args.requests):
            s.sendall(b"q" + REQ[1:])
            recv_exact(s, len(REC) * args.records)
    elif phase == "bulk":
        s.sendall(b"d")
        recv_exact(s, args.mib * 1024 * 1024)
        s.sendall(b"u")
        block = b"u" * CHUNK
        for _ in range(args.mib * 1024 * 1024 // CHUNK):
            s.sendall(block)
        recv_exact(s, len(REC))
    s.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(binary, phase, args, tmp, backend_addr):
    listen, status = free_port(), free_port()
    cfg = os.path.join(tmp, "gw.yaml")
    with open(cfg, "w") as f:
        f.write(f"""admin:
  status_address: 127.0.0.1:{status}
  metrics_address: 127.0.0.1:0
  debug_address: 127.0.0.1:0
drain_accept_period: 0s
drain_period: 1s
access_log: false
upstream:
  splice: off
listeners:
  - name: bench
    address: 127.0.0.1:{listen}
    mode: auto-passthrough
routes:
  services:
    - hostname: bench.svc.cluster.local
      ports:
        - port: 8000
          endpoints:
            - address: {backend_addr[0]}:{backend_addr[1]}
""")
    out = os.path.join(tmp, f"cg.{phase}.{os.path.basename(binary)}")
    gw = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                           binary, "--config", cfg, "--worker-threads", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", status), timeout=2) as s:
                s.sendall(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if b" 200 " in s.recv(100):
                    break
        except OSError:
            pass
        if time.time() > deadline or gw.poll() is not None:
            gw.kill()
            sys.exit(f"{binary} not ready")
        time.sleep(0.2)
    client(("127.0.0.1", listen), phase, args)
    gw.send_signal(signal.SIGTERM)
    gw.wait(timeout=120)
    total = None
    with open(out) as f:
        for line in f:
            if line.startswith("totals:"):
                total = int(line.split()[1])
    if total is None:
        sys.exit(f"no totals in {out}")
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
                         capture_output=True, text=True).stdout
    feed = 0
    for line in ann.splitlines():
        if "RecordFollower::feed" in line:
            feed = max(feed, int(line.split()[0].replace(",", "")))
    return total, feed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--records", type=int, default=20)
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--phases", default="idle,requests,bulk,connections",
                   help="comma-separated; idle is always run (it is subtracted)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cg-ab-")
    key, crt = os.path.join(tmp, "k.pem"), os.path.join(tmp, "c.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=bench"],
                   check=True, capture_output=True)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    threading.Thread(target=backend, args=(sctx, lst, args), daemon=True).start()
    res = {}
    phases = ["idle"] + [p for p in args.phases.split(",") if p and p != "idle"]
    for phase in phases:
        for name, binary in (("old", args.old), ("new", args.new)):
            res[(name, phase)], feed = run(binary, phase, args, tmp, lst.getsockname())
            res[(name, phase, "feed")] = feed
            print(f"{name:3} {phase:8} {res[(name, phase)]:>14,} instructions, "
                  f"{feed:>10,} in RecordFollower::feed", flush=True)
    for name in ("old", "new"):
        idle = res[(name, "idle")]
        if "requests" in phases:
            res[(name, "per_req")] = (res[(name, "requests")] - idle) / args.requests
        if "bulk" in phases:
            res[(name, "per_mib")] = (res[(name, "bulk")] - idle) / (2 * args.mib)
        if "connections" in phases:
            # The idle phase had one connection of the same kind: N - 1 more here.
            res[(name, "per_conn")] = (res[(name, "connections")] - idle) / (args.connections - 1)
    for what, unit in (("per_req", f"request ({args.records} response records)"), ("per_mib", "MiB (copy path)"),
                       ("per_conn", "new connection (one request each)")):
        if ("old", what) not in res:
            continue
        o, n = res[("old", what)], res[("new", what)]
        print(f"instructions per {unit}: old {o:,.0f}  new {n:,.0f}  change {100 * (n - o) / o:+.2f} %")
    print(f"callgrind outputs kept in {tmp} (callgrind_annotate cg.PHASE.BINARY)")
    for phase, per in (("requests", args.requests), ("bulk", 2 * args.mib)):
        if phase not in phases:
            continue
        feed = res[("new", phase, "feed")] - res[("new", "idle", "feed")]
        work = res[("new", phase)] - res[("new", "idle")]
        print(f"token timing in {phase}: {feed / per:,.0f} instructions per "
              f"{'request' if phase == 'requests' else 'MiB'}, {100 * feed / work:.2f} % of the gateway's")


if __name__ == "__main__":
    main()
