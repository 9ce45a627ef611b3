//! JSON builders for the Kubernetes objects the tests put into the in-process API server.
#![allow(dead_code)]

use serde_json::{json, Value};

/// A ClusterIP Service with `(name, port)` ports.
pub fn service(ns: &str, name: &str, ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"type": "ClusterIP", "ports": ports}})
}

/// The east-west gateway Service with a load-balancer ingress IP.
pub fn gateway_service(ns: &str, name: &str, lb_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": {"istio": "eastwestgateway"}},
           "spec": {"type": "LoadBalancer", "ports": [{"name": "tls", "port": 15443}]},
           "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}})
}

pub struct Ep<'a> {
    pub ip: &'a str,
    pub ready: bool,
    pub terminating: bool,
    pub pod: Option<&'a str>,
}

pub fn ready(ip: &str) -> Ep<'_> {
    Ep {
        ip,
        ready: true,
        terminating: false,
        pod: None,
    }
}

pub fn not_ready(ip: &str) -> Ep<'_> {
    Ep {
        ip,
        ready: false,
        terminating: false,
        pod: None,
    }
}

/// An EndpointSlice of `svc` with `(port name, target port)` ports.
pub fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, u16)], eps: &[Ep]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| {
            let mut v = json!({"addresses": [e.ip], "conditions": {
                "ready": e.ready && !e.terminating, "serving": e.ready, "terminating": e.terminating},
                "zone": "zone-a", "nodeName": "node-1"});
            if let Some(pod) = e.pod {
                v["targetRef"] = json!({"kind": "Pod", "namespace": ns, "name": pod});
            }
            v
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

/// A namespace carrying Istio's network label.
pub fn namespace(name: &str, network: Option<&str>) -> Value {
    let mut v = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    if let Some(n) = network {
        v["metadata"]["labels"] = json!({"topology.istio.io/network": n});
    }
    v
}

/// A remote secret exactly as `istioctl create-remote-secret` writes it.
pub fn remote_secret(ns: &str, cluster: &str, kubeconfig: &str) -> Value {
    use base64_lite::encode;
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": format!("istio-remote-secret-{cluster}"), "namespace": ns,
                        "labels": {"istio/multiCluster": "true"},
                        "annotations": {"networking.istio.io/cluster": cluster}},
           "type": "Opaque",
           "data": {cluster: encode(kubeconfig.as_bytes())}})
}

mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// A Pod with labels (control reads only its metadata).
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "app"}]}})
}

/// An Istio DestinationRule (networking.istio.io/v1) for `host` with `(subset, version label)`
/// subsets.
pub fn destination_rule(ns: &str, name: &str, host: &str, subsets: &[(&str, &str)]) -> Value {
    let subsets: Vec<Value> = subsets
        .iter()
        .map(|(n, v)| json!({"name": n, "labels": {"version": v}}))
        .collect();
    json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"host": host, "subsets": subsets}})
}

/// A Pod as the API server returns it: `labels`, `annotations`, a controller owner
/// `(kind, name)` (the name then generated, as controllers do), and a service account.
pub fn owned_pod(
    ns: &str,
    name: &str,
    owner: Option<(&str, &str)>,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    service_account: &str,
) -> Value {
    let map = |kv: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        kv.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()
    };
    let mut v = json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": map(labels),
                        "annotations": map(annotations)},
           "spec": {"serviceAccountName": service_account,
                    "containers": [{"name": "app", "image": "app"}]}});
    if let Some((kind, owner)) = owner {
        v["metadata"]["generateName"] = json!(format!("{owner}-"));
        v["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
            "name": owner, "uid": format!("uid-{owner}"), "controller": true}]);
    }
    v
}

/// A namespace with `labels`.
pub fn labeled_namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}
