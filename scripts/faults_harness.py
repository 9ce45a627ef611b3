"""The harness of scripts/faults.py: TLS echo backends (in this process or a killable one), TLS
clients through the gateway, eastwest-proxy processes with generated configs and their metrics,
and the result table's rows. Standard library only.
"""

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVICE = "faults.demo.svc.cluster.local"
SNI = f"outbound_.8000_._.{SERVICE}"
ROWS = []  # (fault, what was done, expected, measured, ok)


def row(fault, done, expected, measured, ok):
    ROWS.append((fault, done, expected, measured, "pass" if ok else "**FAIL**"))
    print(f"[faults] {fault}: {measured} -> {'pass' if ok else 'FAIL'}", file=sys.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------- certificates and TLS

class Tls:
    """A self-signed server certificate (openssl) for the backends; clients do not verify: the
    gateway never terminates TLS, so what matters is that a real ClientHello with the SNI goes
    through it and a real handshake completes end to end."""

    def __init__(self, work):
        self.cert = work / "backend.pem"
        self.key = work / "backend-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", "/CN=faults-backend",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True)

    def server(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    @staticmethod
    def client():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


async def echo_handler(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()


class Backend:
    """A TLS echo server in this process."""

    def __init__(self, tls, sock=None):
        self.tls = tls
        self.sock = sock
        self.server = None
        self.port = None

    async def start(self):
        if self.sock is not None:
            self.server = await asyncio.start_server(echo_handler, sock=self.sock, ssl=self.tls.server())
        else:
            self.server = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=self.tls.server())
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    async def stop(self):
        self.server.close()


def backend_process(tls):
    """A TLS echo server in its own process, so that it can be SIGKILLed."""
    port = free_port()
    code = (
        "import asyncio, ssl, sys\n"
        "async def h(r, w):\n"
        "    try:\n"
        "        while True:\n"
        "            d = await r.read(65536)\n"
        "            if not d: break\n"
        "            w.write(d); await w.drain()\n"
        "    except Exception: pass\n"
        "async def main():\n"
        "    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain(sys.argv[2], sys.argv[3])\n"
        "    s = await asyncio.start_server(h, '127.0.0.1', int(sys.argv[1]), ssl=c)\n"
        "    print('up', flush=True)\n"
        "    await s.serve_forever()\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port), str(tls.cert), str(tls.key)],
                            stdout=subprocess.PIPE)
    if proc.stdout.readline().strip() != b"up":
        raise RuntimeError("backend process did not start")
    return proc, f"127.0.0.1:{port}"


async def tls_open(addr, timeout=5.0, sni=SNI):
    host, port = addr.rsplit(":", 1)
    return await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=Tls.client(), server_hostname=sni,
                                ssl_handshake_timeout=timeout),
        timeout)


async def echo_once(addr, payload=b"ping\n", timeout=5.0):
    """New connection, one echo; returns seconds taken. Raises on any failure."""
    t0 = time.monotonic()
    reader, writer = await tls_open(addr, timeout)
    try:
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
        if got != payload:
            raise RuntimeError("echo mismatch")
    finally:
        writer.close()
    return time.monotonic() - t0


async def relayed(addr, n):
    """How many of `n` new connections, one after the other, echoed."""
    ok = 0
    for _ in range(n):
        try:
            await echo_once(addr)
            ok += 1
        except Exception:
            pass
    return ok


async def echo_on(reader, writer, payload, timeout=5.0):
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    if got != payload:
        raise RuntimeError("echo mismatch")


# ---------------------------------------------------------------- gateway processes

def http_get(addr, path, timeout=2.0):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (OSError, urllib.error.URLError):
        return None, ""


class Gateway:
    """An eastwest-proxy process with a generated config file."""

    def __init__(self, bin_dir, work, endpoints, extra="", upstream="", listener="",
                 args=(), prefix=(), name="gw"):
        self.bin = Path(bin_dir) / "eastwest-proxy"
        self.work = work
        self.listen = f"127.0.0.1:{free_port()}"
        self.status = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.debug = f"127.0.0.1:{free_port()}"
        self.config = work / f"{name}.yaml"
        self.log = open(work / f"{name}.log", "wb")
        self.extra, self.upstream, self.listener = extra, upstream, listener
        self.args, self.prefix = list(args), list(prefix)
        self.write(endpoints)
        self.proc = None

    def render(self, endpoints):
        eps = "\n".join(f"            - address: {e}" for e in endpoints) or "            []"
        return (
            "admin:\n"
            f"  status_address: {self.status}\n"
            f"  metrics_address: {self.metrics}\n"
            f"  debug_address: {self.debug}\n"
            f"{self.extra}"
            "upstream:\n"
            "  connect_attempts: 3\n"
            f"{self.upstream}"
            "listeners:\n"
            "  - name: passthrough\n"
            f"    address: {self.listen}\n"
            "    mode: auto-passthrough\n"
            f"{self.listener}"
            "routes:\n"
            "  services:\n"
            f"    - hostname: {SERVICE}\n"
            "      ports:\n"
            "        - port: 8000\n"
            "          endpoints:\n"
            f"{eps}\n")

    def write(self, endpoints):
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.render(endpoints))
        os.replace(tmp, self.config)

    def start(self, wait_ready=True):
        cmd = self.prefix + [str(self.bin), "--config", str(self.config)] + self.args
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"eastwest-proxy exited: see {self.log.name}")
            if http_get(self.status, "/healthz/ready")[0] == 200:
                return
            time.sleep(0.02)
        raise RuntimeError(f"eastwest-proxy not ready in {seconds}s: see {self.log.name}")

    def metric(self, name, **labels):
        """Sum of a metric's samples whose labels include `labels`."""
        status, body = http_get(self.metrics, "/metrics")
        if status != 200:
            return None
        total = 0.0
        for line in body.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            if series.split("{", 1)[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def stop_process(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def close_all(socks):
    for s in socks:
        s.close()


class Fault:
    """What one fault runs with: the binaries (`bin`), a work directory, the backends'
    certificate, the status-flood size; and whatever it starts, stopped in reverse order when the
    fault ends (`stack`: the caller's AsyncExitStack), however it ends."""

    def __init__(self, bin_dir, work, tls, flood, stack):
        self.bin, self.work, self.tls, self.flood = bin_dir, work, tls, flood
        self.stack = stack

    async def backend(self):
        """A TLS echo backend in this process."""
        backend = await Backend(self.tls).start()
        self.stack.push_async_callback(backend.stop)
        return backend

    def gateway(self, endpoints, wait_ready=True, **kwargs):
        """An eastwest-proxy process routing to `endpoints`, started (and ready, unless told
        not to wait); `kwargs` are Gateway's."""
        gw = Gateway(self.bin, self.work, endpoints, **kwargs)
        self.stack.callback(gw.stop)
        return gw.start(wait_ready=wait_ready)

    def sockets(self):
        """A list for the fault's sockets: those in it when the fault ends are closed."""
        socks = []
        self.stack.callback(close_all, socks)
        return socks

    def on_exit(self, callback, *args):
        self.stack.callback(callback, *args)
