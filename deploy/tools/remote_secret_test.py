#!/usr/bin/env python3
"""Runs deploy/create-remote-secret.sh with a real kubectl against a local HTTP server that
speaks the Kubernetes API's wire protocol (discovery plus GET of one Secret), and checks the
Secret it prints: istioctl create-remote-secret's shape, with a kubeconfig carrying the
served token, CA and server address.

The served token Secret starts empty (as right after `kubectl apply`) and is filled in on the
third read, so the script's bounded wait for the token controller is exercised too.

  remote_secret_test.py --kubectl KUBECTL --script SCRIPT --out FILE
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

NAMESPACE = "istio-system"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl"
CA_PEM = b"-----BEGIN CERTIFICATE-----\nTUlJQ2Vhc3R3ZXN0LXRlc3QtY2E=\n-----END CERTIFICATE-----\n"
FILL_ON_READ = 3


class ApiServer(BaseHTTPRequestHandler):
    secret_reads = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/api":
            self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                             "serverAddress": "127.0.0.1"}]})
        elif path == "/apis":
            self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif path == "/api/v1":
            self.reply(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}]})
        elif path == f"/api/v1/namespaces/{NAMESPACE}/secrets/eastwest-reader-token":
            with ApiServer.lock:
                ApiServer.secret_reads += 1
                reads = ApiServer.secret_reads
            secret = {"apiVersion": "v1", "kind": "Secret",
                      "type": "kubernetes.io/service-account-token",
                      "metadata": {"name": "eastwest-reader-token", "namespace": NAMESPACE,
                                   "annotations": {"kubernetes.io/service-account.name": "eastwest-reader"}}}
            if reads >= FILL_ON_READ:
                secret["data"] = {"token": base64.b64encode(TOKEN.encode()).decode(),
                                  "ca.crt": base64.b64encode(CA_PEM).decode(),
                                  "namespace": base64.b64encode(NAMESPACE.encode()).decode()}
            self.reply(200, secret)
        else:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": f"{path} not found"})


def check(cond, what):
    if not cond:
        raise SystemExit(f"remote secret: {what}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kubectl", required=True)
    p.add_argument("--script", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = os.path.join(tmp, "config")
            with open(kubeconfig, "w", encoding="utf-8") as f:
                yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                                "clusters": [{"name": "ash", "cluster": {"server": url}}],
                                "users": [{"name": "admin", "user": {"token": "admin-token"}}],
                                "contexts": [{"name": "ash", "context": {"cluster": "ash", "user": "admin"}}],
                                "current-context": "ash"}, f)
            env = dict(os.environ, KUBECONFIG=kubeconfig, KUBECTL=args.kubectl,
                       TOKEN_WAIT_SECONDS="20", HOME=tmp)
            run = subprocess.run(["bash", args.script, "--context", "ash", "--name", "ash"],
                                 env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"remote secret: script exited {run.returncode}")

    secret = yaml.safe_load(run.stdout)
    check(secret["kind"] == "Secret", "not a Secret")
    meta = secret["metadata"]
    check(meta["name"] == "istio-remote-secret-ash", f"name {meta['name']}")
    check(meta["namespace"] == NAMESPACE, f"namespace {meta['namespace']}")
    check(meta["labels"] == {"istio/multiCluster": "true"}, f"labels {meta['labels']}")
    check(meta["annotations"].get("networking.istio.io/cluster") == "ash", "cluster annotation")
    kubeconfig = yaml.safe_load(secret["stringData"]["ash"])
    cluster = kubeconfig["clusters"][0]["cluster"]
    check(cluster["server"] == url, f"server {cluster['server']} != {url}")
    check(base64.b64decode(cluster["certificate-authority-data"]) == CA_PEM, "CA differs")
    check(kubeconfig["users"][0]["user"]["token"] == TOKEN, "token differs")
    check(kubeconfig["current-context"] == "ash", "current-context")
    check(ApiServer.secret_reads == FILL_ON_READ, f"{ApiServer.secret_reads} polls, expected {FILL_ON_READ}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(run.stdout)
    print(f"remote secret ok: token read on poll {ApiServer.secret_reads}; kubeconfig for {url}")


if __name__ == "__main__":
    main()
