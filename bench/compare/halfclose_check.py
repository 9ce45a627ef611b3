#!/usr/bin/env python3
"""Does a gateway pass a half-close on? Sends a real TLS ClientHello with the Istio SNI, then
shuts down its sending side; the backend answers only after it has read EOF. A gateway that
passes the half-close on delivers the answer; one that closes both directions at the first FIN
does not.

    halfclose_check.py GATEWAY_HOST:PORT BACKEND_LISTEN_PORT
(the gateway must route the SNI below to 127.0.0.1:BACKEND_LISTEN_PORT)."""

import socket
import ssl
import sys
import threading

SNI = "outbound_.8000_._.bench.svc.cluster.local"


def client_hello():
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=SNI)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def backend(listener, seen):
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        while conn.recv(65536):
            pass
        seen.append("eof")
        conn.sendall(b"answer after EOF")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", int(sys.argv[2])))
    seen = []
    t = threading.Thread(target=backend, args=(listener, seen), daemon=True)
    t.start()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(client_hello())
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError as e:
            got += f" ({e})".encode()
    t.join(timeout=10)
    ok = got == b"answer after EOF"
    print(f"{sys.argv[1]}: backend saw EOF: {bool(seen)}; client got {got!r}: "
          f"{'passes half-close' if ok else 'does NOT pass half-close'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
