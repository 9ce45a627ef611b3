//! `telemetry:` in the proxy config: the gateway's own workload, for Istio's `source_*` labels,
//! and whether token timing follows relayed connections.

use serde::{Deserialize, Serialize};

/// The gateway's own workload as Istio's telemetry names it. Each field left out comes from
/// the environment the pod spec sets (see [`TelemetryConfig::with_env`]); what is still
/// unknown is reported as `unknown`, as Istio writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `source_workload`: the gateway's Deployment or DaemonSet name (`istio-eastwestgateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// `source_workload_namespace` (`istio-system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `source_cluster`: the Istio cluster ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// `source_app` and `source_canonical_service` (default: the workload name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// `source_version` and `source_canonical_revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Token timing (`eastwest_stream_*`, docs/token-timing.md): follow the TLS record
    /// headers of relayed connections. On by default; `false` leaves the histograms empty and
    /// the relay does nothing per record. Read per connection, so a reload applies it to new
    /// connections.
    #[serde(default = "on", skip_serializing_if = "is_on")]
    pub token_timing: bool,
}

fn on() -> bool {
    true
}

fn is_on(v: &bool) -> bool {
    *v
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            workload: None,
            namespace: None,
            cluster: None,
            app: None,
            version: None,
            token_timing: true,
        }
    }
}

impl TelemetryConfig {
    pub fn is_empty(&self) -> bool {
        *self == TelemetryConfig::default()
    }

    /// The fields not set, filled from the variables an Istio gateway pod has (`env` looks one
    /// up): `ISTIO_META_WORKLOAD_NAME`, else `POD_NAME` without the suffixes a DaemonSet
    /// (`-<5 chars>`) or Deployment (`-<hash>-<5 chars>`) adds; `POD_NAMESPACE`;
    /// `ISTIO_META_CLUSTER_ID`, else `EASTWEST_CLUSTER` (the proxy's `--cluster`);
    /// `POD_LABEL_APP` and `POD_LABEL_VERSION` (the pod's `app` and `version` labels).
    pub fn with_env(&self, env: impl Fn(&str) -> Option<String>) -> TelemetryConfig {
        let set = |v: Option<String>| v.filter(|v| !v.is_empty());
        TelemetryConfig {
            workload: self.workload.clone().or_else(|| {
                set(env("ISTIO_META_WORKLOAD_NAME"))
                    .or_else(|| set(env("POD_NAME")).map(|pod| workload_of_pod(&pod)))
            }),
            namespace: self.namespace.clone().or_else(|| set(env("POD_NAMESPACE"))),
            cluster: self.cluster.clone().or_else(|| {
                set(env("ISTIO_META_CLUSTER_ID")).or_else(|| set(env("EASTWEST_CLUSTER")))
            }),
            // Istio takes these from the pod's `app` and `version` labels; the DaemonSet passes
            // them in through the downward API.
            app: self.app.clone().or_else(|| set(env("POD_LABEL_APP"))),
            version: self
                .version
                .clone()
                .or_else(|| set(env("POD_LABEL_VERSION"))),
            token_timing: self.token_timing,
        }
    }
}

/// A pod's workload name, as Istio derives it when it has no owner information: the pod
/// name without the generated suffixes (`<ds>-<5>` or `<deploy>-<pod-template-hash>-<5>`).
fn workload_of_pod(pod: &str) -> String {
    let generated = |part: &str| {
        (5..=10).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    let parts: Vec<&str> = pod.split('-').collect();
    let mut keep = parts.len();
    // Pod suffix (5 chars), then possibly a ReplicaSet hash (up to 10 chars).
    if keep > 1 && parts[keep - 1].len() == 5 && generated(parts[keep - 1]) {
        keep -= 1;
        if keep > 1
            && generated(parts[keep - 1])
            && parts[keep - 1].bytes().any(|b| b.is_ascii_digit())
        {
            keep -= 1;
        }
    }
    parts[..keep].join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_fields_left_out_come_from_the_gateway_pods_environment() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("istio-eastwestgateway-7d9f8b6c5d-x2k9p".to_string()),
            "POD_NAMESPACE" => Some("istio-system".to_string()),
            "EASTWEST_CLUSTER" => Some("ash".to_string()),
            "POD_LABEL_APP" => Some("istio-eastwestgateway".to_string()),
            "POD_LABEL_VERSION" => Some(String::new()),
            _ => None,
        };
        let filled = TelemetryConfig::default().with_env(env);
        assert_eq!(filled.app.as_deref(), Some("istio-eastwestgateway"));
        // An empty label value is as good as none: `unknown`, as Istio writes it.
        assert_eq!(filled.version, None);
        assert_eq!(filled.workload.as_deref(), Some("istio-eastwestgateway"));
        assert_eq!(filled.namespace.as_deref(), Some("istio-system"));
        assert_eq!(filled.cluster.as_deref(), Some("ash"));
        let set = TelemetryConfig {
            workload: Some("gw".into()),
            cluster: Some("fra".into()),
            ..TelemetryConfig::default()
        };
        let filled = set.with_env(env);
        assert_eq!(filled.workload.as_deref(), Some("gw"));
        assert_eq!(filled.cluster.as_deref(), Some("fra"));
        assert_eq!(
            workload_of_pod("istio-eastwestgateway-x2k9p"),
            "istio-eastwestgateway"
        );
        assert_eq!(workload_of_pod("sglang"), "sglang");
        assert!(TelemetryConfig::default().with_env(|_| None).is_empty());
    }

    #[test]
    fn token_timing_is_on_unless_turned_off() {
        let parse = |yaml: &str| serde_yaml::from_str::<TelemetryConfig>(yaml);
        assert!(parse("workload: gw").unwrap().token_timing);
        let off = parse("token_timing: false").unwrap();
        assert!(!off.token_timing);
        assert!(!off.is_empty(), "written back out when off");
        assert!(!off.with_env(|_| None).token_timing);
        let err = parse("token_timing: sometimes").unwrap_err().to_string();
        assert!(err.contains("token_timing"), "{err}");
    }
}
