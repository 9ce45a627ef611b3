//! What control keeps of each Pod and Namespace: the labels subsets select on, whether ambient
//! mode captured the Pod (its endpoints then take HBONE on 15008), and the workload Istio's
//! telemetry names it by. Reduced at once from the watched objects, so 100 000 Pods stay small.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use eastwest_routes::Workload;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher;
use kube::ResourceExt;

use crate::model::ObjKey;
use crate::waypoints::UseWaypoint;

/// Port on which a node's ztunnel accepts HBONE for the ambient Pods it captured.
pub const HBONE_PORT: u16 = 15008;
/// Namespace or Pod label enrolling Pods in ambient mode (`ambient`) or opting a Pod out (any
/// other value, `none` by convention).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod annotation istio-cni writes: `enabled` once it redirected the Pod's traffic to ztunnel.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Pod annotation the sidecar injector writes; ambient never captures a Pod with a sidecar.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What ambient capture a Pod's own metadata says; the namespace label decides the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// istio-cni wrote `ambient.istio.io/redirection: enabled`: captured, whatever the labels
    /// (istiod gives such a workload the HBONE tunnel protocol from this annotation alone).
    Redirected,
    /// Never captured: a sidecar, host networking, a `disabled` redirection annotation, or a
    /// `istio.io/dataplane-mode` label other than `ambient` (`none`) on the Pod.
    Never,
    /// The Pod's own label enrols it.
    PodEnrolled,
    /// Captured if its namespace is labelled `istio.io/dataplane-mode=ambient`.
    IfNamespace,
}

/// A Pod, as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDef {
    /// The kept (`--subset-labels`) labels, shared by the Pods that have the same ones.
    pub subset_labels: Option<Arc<BTreeMap<String, String>>>,
    pub capture: Capture,
    /// Shared by every endpoint of the Pod.
    pub workload: Arc<Workload>,
}

impl PodDef {
    /// Whether the Pod is captured by ambient mode, given its namespace's label.
    pub fn ambient(&self, namespace_ambient: bool) -> bool {
        match self.capture {
            Capture::Redirected | Capture::PodEnrolled => true,
            Capture::Never => false,
            Capture::IfNamespace => namespace_ambient,
        }
    }
}

/// The rules istio-cni applies (`PodRedirectionEnabled`), except the namespace label, which
/// [`PodDef::ambient`] checks, so a namespace relabel needs no Pod relist.
pub fn capture(pod: &Pod) -> Capture {
    let annotations = pod.annotations();
    match annotations.get(REDIRECTION_ANNOTATION).map(String::as_str) {
        Some("enabled") => return Capture::Redirected,
        Some("disabled") => return Capture::Never,
        _ => {}
    }
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network || annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Capture::Never;
    }
    match pod.labels().get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(DATAPLANE_MODE_AMBIENT) => Capture::PodEnrolled,
        Some(_) => Capture::Never,
        None => Capture::IfNamespace,
    }
}

/// The workload name Istio derives from a Pod (`GetDeployMetaFromPod`): for a generated name,
/// its controller, with a ReplicaSet's `-<pod-template-hash>` stripped (its Deployment) and a
/// Job's `-<8 to 10 digit schedule time>` stripped (its CronJob); else the Pod's own name.
pub fn workload_name(pod: &Pod) -> String {
    let generated = pod
        .metadata
        .generate_name
        .as_deref()
        .is_some_and(|g| !g.is_empty());
    let controller = pod
        .owner_references()
        .iter()
        .find(|r| r.controller == Some(true));
    let (Some(owner), true) = (controller, generated) else {
        return pod.name_any();
    };
    if owner.name.is_empty() {
        return pod.name_any();
    }
    match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(hash) = pod
                .labels()
                .get("pod-template-hash")
                .filter(|h| !h.is_empty())
            {
                if let Some(deployment) = owner
                    .name
                    .strip_suffix(hash.as_str())
                    .and_then(|n| n.strip_suffix('-'))
                {
                    return deployment.to_string();
                }
            }
            owner.name.clone()
        }
        "ReplicationController" => pod
            .labels()
            .get("deploymentconfig")
            .filter(|d| !d.is_empty())
            .cloned()
            .unwrap_or_else(|| owner.name.clone()),
        "Job" => cron_job_name(&owner.name)
            .unwrap_or(&owner.name)
            .to_string(),
        _ => owner.name.clone(),
    }
}

/// `<cronjob>-<8..10 digits>` (the Job a CronJob creates) -> `<cronjob>`.
fn cron_job_name(job: &str) -> Option<&str> {
    let (name, digits) = job.rsplit_once('-')?;
    let all_digits = digits.bytes().all(|b| b.is_ascii_digit());
    (!name.is_empty() && all_digits && (8..=10).contains(&digits.len())).then_some(name)
}

/// The first non-empty label among `keys`.
fn first_label(pod: &Pod, keys: &[&str]) -> Option<String> {
    let labels = pod.labels();
    keys.iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
        .cloned()
}

/// The Pod's workload, as Istio's standard metrics label it: `destination_app` and
/// `destination_version` come from `app.kubernetes.io/name`|`app` and
/// `app.kubernetes.io/version`|`version` (the canonical-service labels feed the separate
/// `destination_canonical_*` labels, which the shared type does not carry).
pub fn workload(pod: &Pod, cluster: &str) -> Workload {
    Workload {
        name: workload_name(pod),
        namespace: pod.namespace().unwrap_or_default(),
        app: first_label(pod, &["app.kubernetes.io/name", "app"]),
        version: first_label(pod, &["app.kubernetes.io/version", "version"]),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty()),
        cluster: Some(cluster.to_string()),
    }
}

/// namespace -> pod name -> what routing keeps of it.
pub type PodsByNamespace = HashMap<String, HashMap<String, Arc<PodDef>>>;

/// A cluster's Pods, following the watcher's event protocol.
#[derive(Debug, Default)]
pub struct Pods {
    pub by_namespace: PodsByNamespace,
    pending: Option<PodsByNamespace>,
    /// Distinct kept-label sets (bounded by the combinations of `--subset-labels` values).
    interned: HashSet<Arc<BTreeMap<String, String>>>,
    pub synced: bool,
}

impl Pods {
    pub fn get(&self, ns: &str, pod: &str) -> Option<&Arc<PodDef>> {
        self.by_namespace.get(ns)?.get(pod)
    }

    pub fn count(&self) -> usize {
        self.by_namespace.values().map(HashMap::len).sum()
    }

    fn convert(&mut self, pod: &Pod, keep: &[String], cluster: &str) -> Arc<PodDef> {
        // Most Pods share their kept labels (e.g. version=v1): store each distinct set once.
        let labels: BTreeMap<String, String> = pod
            .labels()
            .iter()
            .filter(|(k, _)| keep.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let subset_labels = (!labels.is_empty()).then(|| match self.interned.get(&labels) {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(labels);
                self.interned.insert(l.clone());
                l
            }
        });
        Arc::new(PodDef {
            subset_labels,
            capture: capture(pod),
            workload: Arc::new(workload(pod, cluster)),
        })
    }

    /// Applies one watcher event; returns the Pods whose routing facts changed.
    pub fn apply(
        &mut self,
        event: watcher::Event<Pod>,
        keep: &[String],
        cluster: &str,
    ) -> HashSet<ObjKey> {
        let mut changed = HashSet::new();
        match event {
            watcher::Event::Init => self.pending = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                let def = self.convert(&o, keep, cluster);
                if let Some(pending) = self.pending.as_mut() {
                    pending
                        .entry(o.namespace().unwrap_or_default())
                        .or_default()
                        .insert(o.name_any(), def);
                }
            }
            watcher::Event::InitDone => {
                let fresh = self.pending.take().unwrap_or_default();
                for (a, b) in [(&self.by_namespace, &fresh), (&fresh, &self.by_namespace)] {
                    for (ns, pods) in a {
                        for (name, def) in pods {
                            if b.get(ns).and_then(|p| p.get(name)) != Some(def) {
                                changed.insert((ns.clone(), name.clone()));
                            }
                        }
                    }
                }
                self.by_namespace = fresh;
                self.synced = true;
            }
            watcher::Event::Apply(o) => {
                let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
                let def = self.convert(&o, keep, cluster);
                if self.get(&ns, &name) != Some(&def) {
                    self.by_namespace
                        .entry(ns.clone())
                        .or_default()
                        .insert(name.clone(), def);
                    changed.insert((ns, name));
                }
            }
            watcher::Event::Delete(o) => {
                let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
                if let Some(pods) = self.by_namespace.get_mut(&ns) {
                    if pods.remove(&name).is_some() {
                        changed.insert((ns.clone(), name));
                    }
                    if pods.is_empty() {
                        self.by_namespace.remove(&ns);
                    }
                }
            }
        }
        changed
    }
}

/// The namespaces labelled `istio.io/dataplane-mode=ambient`, and those labelled
/// `istio.io/use-waypoint`, following the watcher's events.
#[derive(Debug, Default)]
pub struct AmbientNamespaces {
    pub ambient: HashSet<String>,
    /// Namespace -> the waypoint its Services use unless they say otherwise.
    pub waypoints: HashMap<String, UseWaypoint>,
    pending: Option<(HashSet<String>, HashMap<String, UseWaypoint>)>,
    pub synced: bool,
}

fn is_ambient(ns: &Namespace) -> bool {
    ns.labels().get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_AMBIENT)
}

impl AmbientNamespaces {
    pub fn contains(&self, ns: &str) -> bool {
        self.ambient.contains(ns)
    }

    /// Applies one watcher event; returns the namespaces that entered or left ambient mode or
    /// changed waypoint.
    pub fn apply(&mut self, event: watcher::Event<Namespace>) -> HashSet<String> {
        let mut changed = HashSet::new();
        match event {
            watcher::Event::Init => self.pending = Some(Default::default()),
            watcher::Event::InitApply(o) => {
                if let Some((ambient, waypoints)) = self.pending.as_mut() {
                    if is_ambient(&o) {
                        ambient.insert(o.name_any());
                    }
                    if let Some(w) = UseWaypoint::from_labels(o.labels()) {
                        waypoints.insert(o.name_any(), w);
                    }
                }
            }
            watcher::Event::InitDone => {
                let (fresh, waypoints) = self.pending.take().unwrap_or_default();
                changed.extend(self.ambient.symmetric_difference(&fresh).cloned());
                for ns in self.waypoints.keys().chain(waypoints.keys()) {
                    if self.waypoints.get(ns) != waypoints.get(ns) {
                        changed.insert(ns.clone());
                    }
                }
                self.ambient = fresh;
                self.waypoints = waypoints;
                self.synced = true;
            }
            watcher::Event::Apply(o) => {
                let name = o.name_any();
                let waypoint = UseWaypoint::from_labels(o.labels());
                if self.waypoints.get(&name) != waypoint.as_ref() {
                    match waypoint {
                        Some(w) => self.waypoints.insert(name.clone(), w),
                        None => self.waypoints.remove(&name),
                    };
                    changed.insert(name.clone());
                }
                let was = if is_ambient(&o) {
                    !self.ambient.insert(name.clone())
                } else {
                    self.ambient.remove(&name)
                };
                if was != is_ambient(&o) {
                    changed.insert(name);
                }
            }
            watcher::Event::Delete(o) => {
                let name = o.name_any();
                if self.waypoints.remove(&name).is_some() {
                    changed.insert(name.clone());
                }
                if self.ambient.remove(&name) {
                    changed.insert(name);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(
        name: &str,
        generate: bool,
        owner: Option<(&str, &str)>,
        labels: &[(&str, &str)],
    ) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("demo".into());
        if generate {
            p.metadata.generate_name = Some(format!("{name}-"));
        }
        p.metadata.owner_references = owner.map(|(kind, name)| {
            vec![OwnerReference {
                kind: kind.into(),
                name: name.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn workload_names_as_istio_derives_them() {
        let rs = pod(
            "reviews-v1-7f9c-abcde",
            true,
            Some(("ReplicaSet", "reviews-v1-7f9c")),
            &[("pod-template-hash", "7f9c")],
        );
        assert_eq!(workload_name(&rs), "reviews-v1");
        let bare_rs = pod("x-abcde", true, Some(("ReplicaSet", "standalone")), &[]);
        assert_eq!(workload_name(&bare_rs), "standalone");
        let sts = pod("db-0", true, Some(("StatefulSet", "db")), &[]);
        assert_eq!(workload_name(&sts), "db");
        let cron = pod(
            "backup-28860000-xyz",
            true,
            Some(("Job", "backup-28860000")),
            &[],
        );
        assert_eq!(workload_name(&cron), "backup");
        let job = pod("once-xyz", true, Some(("Job", "once")), &[]);
        assert_eq!(workload_name(&job), "once");
        assert_eq!(workload_name(&pod("bare", false, None, &[])), "bare");
        // A Pod with a fixed name keeps it even when owned (Istio looks only at generated names).
        let named = pod("fixed", false, Some(("StatefulSet", "db")), &[]);
        assert_eq!(workload_name(&named), "fixed");
    }

    #[test]
    fn capture_rules() {
        let mut p = pod("a", false, None, &[]);
        assert_eq!(capture(&p), Capture::IfNamespace);
        p.metadata.labels = Some([(DATAPLANE_MODE_LABEL.into(), "none".into())].into());
        assert_eq!(capture(&p), Capture::Never);
        p.metadata.annotations = Some([(REDIRECTION_ANNOTATION.into(), "enabled".into())].into());
        assert_eq!(capture(&p), Capture::Redirected);
        let mut s = pod("s", false, None, &[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert_eq!(capture(&s), Capture::PodEnrolled);
        s.metadata.annotations = Some([(SIDECAR_STATUS_ANNOTATION.into(), "{}".into())].into());
        assert_eq!(capture(&s), Capture::Never);
    }
}
