#!/usr/bin/env python3
"""The gateway hop as Kiali sees it, for deploy/test.sh.

  kiali_edge.py stream GATEWAY_PORT BACKEND_PORT SNI SECONDS
      an sglang-like backend on 127.0.0.1:BACKEND_PORT that streams small "token" chunks, and
      a client that sends a real TLS ClientHello (from Python's ssl) with SNI through the
      gateway and reads the stream; runs SECONDS, or until killed.

  kiali_edge.py hello GATEWAY_PORT SNI
      sends one ClientHello with SNI to the gateway and reads until it closes (for a route
      whose endpoints are down: the gateway's failure series).

  kiali_edge.py check PROMETHEUS_URL NAMESPACE SOURCE_WORKLOAD DEST_SERVICE [AT WINDOW]
      runs Kiali's TCP-edge queries for NAMESPACE against Prometheus' HTTP API; succeeds when
      an edge SOURCE_WORKLOAD -> DEST_SERVICE with a non-zero byte rate is among the results,
      carrying every label Kiali needs (Kiali skips series missing one). With AT (Unix time)
      and WINDOW (whole seconds) the queries cover the WINDOW seconds up to AT, as Kiali's
      graph does for queryTime=AT and duration=WINDOWs; otherwise the last 60 s.

  kiali_edge.py windows RESULTS_JSON
      one line per scenario of an `eastwest-bench demo` results.json:
      `<cross_region 0|1> <AT> <WINDOW> <name>`, the window lying inside the scenario (AT its
      end, WINDOW its length rounded down), so traffic of a neighbouring scenario never counts.
"""
import json
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request

# Kiali's graph queries for TCP traffic, from kiali/kiali graph/telemetry/istio/istio.go
# (buildNamespaceTrafficMap, "Section for TCP services"), commit
# 00d47bbb0e623b5952473e96a03e60cc99ce728a. The metric, group-by list and label filters are
# Kiali's; {ns} is the namespace graphed and {dur} Kiali's range in seconds.
TCP_GROUP_BY = (
    "source_workload_namespace,source_workload,source_canonical_service,"
    "source_canonical_revision,destination_service_namespace,destination_service,"
    "destination_service_name,destination_workload_namespace,destination_workload,"
    "destination_canonical_service,destination_canonical_revision,response_flags"
)
KIALI_TCP_QUERIES = [
    # 1) traffic from "unknown" (reported by the destination)
    'sum(rate(istio_tcp_sent_bytes_total{{reporter="destination",source_workload="unknown",'
    'destination_workload_namespace="{ns}"}} [{dur}s])) by ({group})',
    # 2) traffic from a workload outside the namespace
    'sum(rate(istio_tcp_sent_bytes_total{{reporter="source",source_workload_namespace!="{ns}",'
    'source_workload!="unknown",destination_service_namespace="{ns}"}} [{dur}s])) by ({group})',
    # 3) traffic from a workload inside the namespace
    'sum(rate(istio_tcp_sent_bytes_total{{reporter="source",source_workload_namespace="{ns}"}} '
    "[{dur}s])) by ({group})",
]
KIALI_DURATION_S = 60


def client_hello(sni):
    """The first flight of a real TLS client (Python's ssl) for `sni`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def hello(gateway_port, sni):
    client = socket.create_connection(("127.0.0.1", gateway_port), timeout=10)
    client.sendall(client_hello(sni))
    while client.recv(65536):
        pass
    return 0


def stream(gateway_port, backend_port, sni, seconds):
    deadline = time.monotonic() + seconds
    server = socket.create_server(("127.0.0.1", backend_port))

    def serve():
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.recv(65536)  # the ClientHello the gateway forwarded
            try:
                while time.monotonic() < deadline:
                    conn.sendall(b"data: {\"token\": \"x\"}\n\n")
                    time.sleep(0.05)  # the model's inter-token gap, not synchronisation
            except OSError:
                pass
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client = socket.create_connection(("127.0.0.1", gateway_port), timeout=10)
    client.sendall(client_hello(sni))
    received = 0
    while time.monotonic() < deadline:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += len(chunk)
    print(f"streamed {received} bytes through the gateway", flush=True)
    return 0 if received else 1


def check(prometheus, namespace, source_workload, dest_service, at=None, window=None):
    needed = TCP_GROUP_BY.split(",")
    duration = int(window) if window is not None else KIALI_DURATION_S
    edges = []
    for template in KIALI_TCP_QUERIES:
        query = template.format(ns=namespace, dur=duration, group=TCP_GROUP_BY)
        params = {"query": query}
        if at is not None:
            params["time"] = at
        url = prometheus + "/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        if body.get("status") != "success":
            print(f"query failed: {query}: {body}", file=sys.stderr)
            return 2
        for s in body["data"]["result"]:
            m = s["metric"]
            if all(k in m for k in needed):
                edges.append((m, float(s["value"][1])))
    for m, rate in edges:
        if (
            m["source_workload"] == source_workload
            and m["destination_service"] == dest_service
            and rate > 0
        ):
            print(
                f"{m['source_workload']}.{m['source_workload_namespace']} -> "
                f"{m['destination_service']} (workload {m['destination_workload']}."
                f"{m['destination_workload_namespace']}): {rate:.0f} B/s"
                + (f" over {duration} s = {rate * duration:.0f} B" if window else "")
            )
            return 0
    print(f"no edge {source_workload} -> {dest_service} yet; edges: {edges}", file=sys.stderr)
    return 1


def windows(results_json):
    with open(results_json, encoding="utf-8") as f:
        results = json.load(f)
    for sc in results["scenarios"]:
        start, end = sc["started_unix_s"], sc["finished_unix_s"]
        cross = 1 if sc["settings"].get("cross_region") else 0
        print(f"{cross} {end:.3f} {int(end - start)} {sc['name']}")
    return 0


def main(argv):
    if len(argv) == 6 and argv[1] == "stream":
        return stream(int(argv[2]), int(argv[3]), argv[4], float(argv[5]))
    if len(argv) == 4 and argv[1] == "hello":
        return hello(int(argv[2]), argv[3])
    if len(argv) in (6, 8) and argv[1] == "check":
        return check(*argv[2:])
    if len(argv) == 3 and argv[1] == "windows":
        return windows(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
