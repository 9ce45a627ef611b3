//! Istio DestinationRules (`networking.istio.io`), reduced to what the gateway routes on: the
//! host a rule applies to and its named subsets (label selectors). Sidecars send
//! `outbound_.<port>_.<subset>_.<fqdn>` whenever a VirtualService routes to a subset, so every
//! subset a rule defines for a Service must reach that Service's entry in the route table.
//!
//! A Service gets the subsets of every rule whose host matches it, in any namespace and any
//! cluster: a sidecar sends a subset SNI whenever some rule it sees defines the subset, whichever
//! rule its own lookup picks, so a mesh-wide `*.local` default in `istio-system` must not hide a
//! client namespace's subsets. Where two rules define the same subset name, Istio's lookup for a
//! gateway in the root namespace decides which definition counts: the Service's own namespace,
//! then the root namespace (`istio-system`), then any other; an exact host before the most
//! specific wildcard; then the oldest rule. `exportTo` is not consulted: the clients a rule is
//! visible to are the ones that send its subset SNI, and the gateway should route what they send.

use std::collections::{BTreeMap, HashMap, HashSet};

use eastwest_routes::{is_subset_name, Subset};
use kube::api::DynamicObject;
use kube::runtime::watcher;
use kube::ResourceExt;
use serde::Deserialize;
use tracing::warn;

use crate::model::{Affected, Model, ObjKey};

pub mod watch;

/// Istio's root configuration namespace: rules there apply mesh-wide as a fallback.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A DestinationRule, as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDef {
    pub host: Host,
    pub subsets: Vec<Subset>,
    /// Has a `workloadSelector`: meant for some clients only, so it yields to rules for all
    /// when both define a subset.
    pub scoped: bool,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as text): older rules win merges.
    pub created: String,
}

/// `spec.host`, resolved the way Istio does it (relative to the rule's namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Exact(String),
    /// `*.suffix` keeps `.suffix`; `*` keeps the empty string (matches every host).
    Wildcard(String),
}

impl Host {
    /// Istio's `ResolveShortnameToFQDN`: a name without a dot is a Service of the rule's
    /// namespace; anything with a dot (`reviews.bookinfo` included) is taken as written.
    pub fn resolve(host: &str, ns: &str, cluster_domain: &str) -> Host {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host == "*" {
            return Host::Wildcard(String::new());
        }
        if let Some(suffix) = host.strip_prefix('*') {
            return Host::Wildcard(suffix.to_string());
        }
        if host.contains('.') {
            Host::Exact(host)
        } else {
            Host::Exact(format!("{host}.{ns}.svc.{cluster_domain}"))
        }
    }

    /// How specifically this host matches `hostname`: None when it does not; an exact match
    /// beats any wildcard, a longer wildcard a shorter one.
    fn specificity(&self, hostname: &str) -> Option<usize> {
        match self {
            Host::Exact(h) => (h == hostname).then_some(usize::MAX),
            Host::Wildcard(suffix) => (hostname.len() > suffix.len()
                && hostname.ends_with(suffix.as_str()))
            .then_some(suffix.len()),
        }
    }

    /// The Service a host names, when it is `<name>.<ns>.svc.<cluster_domain>`.
    pub fn service_key(&self, cluster_domain: &str) -> Option<ObjKey> {
        let Host::Exact(h) = self else { return None };
        let rest = h.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
        let (name, ns) = rest.split_once('.')?;
        (!ns.contains('.')).then(|| (ns.to_string(), name.to_string()))
    }
}

#[derive(Deserialize)]
struct Spec {
    host: String,
    #[serde(default)]
    subsets: Vec<SpecSubset>,
    #[serde(default, rename = "workloadSelector")]
    workload_selector: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct SpecSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A rule and what is wrong with it (each problem names the field and what to do).
pub fn convert(
    obj: &DynamicObject,
    cluster_domain: &str,
    kept_labels: &[String],
) -> (Option<RuleDef>, Vec<String>) {
    let ns = obj.namespace().unwrap_or_default();
    let mut problems = Vec::new();
    let spec = match Spec::deserialize(&obj.data["spec"]) {
        Ok(spec) => spec,
        Err(e) => return (None, vec![format!("spec: {e}; rule ignored")]),
    };
    if spec.host.trim().is_empty() {
        return (None, vec!["spec.host is empty; rule ignored".to_string()]);
    }
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.into_iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if !is_subset_name(&s.name) {
            problems.push(format!(
                "{at}.name {:?}: subset names are lowercase letters, digits and '-'; subset ignored",
                s.name
            ));
            continue;
        }
        if subsets.iter().any(|d| d.name == s.name) {
            problems.push(format!(
                "{at}.name: subset {} is defined twice; the first definition is used",
                s.name
            ));
            continue;
        }
        if s.labels.is_empty() {
            problems.push(format!(
                "{at}: subset {} has no labels; the gateway routes only subsets that select \
                 endpoints by label, subset ignored",
                s.name
            ));
            continue;
        }
        for key in s.labels.keys().filter(|k| !kept_labels.contains(k)) {
            problems.push(format!(
                "{at}.labels: subset {} selects on label {key:?}, which is not copied onto \
                 endpoints, so it matches no endpoint: add {key} to --subset-labels",
                s.name
            ));
        }
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
        });
    }
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let host = Host::resolve(&spec.host, &ns, cluster_domain);
    (
        Some(RuleDef {
            host,
            subsets,
            scoped: spec.workload_selector.is_some(),
            created,
        }),
        problems,
    )
}

impl Affected {
    fn add(&mut self, host: &Host, cluster_domain: &str) {
        match host {
            Host::Wildcard(_) => self.all = true,
            Host::Exact(_) => self.services.extend(host.service_key(cluster_domain)),
        }
    }
}

/// One cluster's DestinationRules, following the watcher's event protocol (`Init`..`InitDone`
/// replaces them atomically).
#[derive(Debug, Default)]
pub struct DestinationRules {
    pub objects: HashMap<ObjKey, RuleDef>,
    /// Exact host -> rules; wildcard rules are few and scanned.
    by_host: HashMap<String, Vec<ObjKey>>,
    wildcards: Vec<ObjKey>,
    pending: Option<HashMap<ObjKey, RuleDef>>,
    /// Every rule of the list in progress, the ones ignored included.
    pending_seen: HashSet<ObjKey>,
    /// The problems last logged per rule, so a relist or an unrelated change does not repeat them.
    warned: HashMap<ObjKey, Vec<String>>,
    pub synced: bool,
    /// Why the cluster serves no rules (CRD not installed, access denied), while it is so.
    pub unavailable: Option<String>,
}

impl DestinationRules {
    /// Applies one watcher event of `cluster`; returns what it affects.
    pub fn apply(
        &mut self,
        cluster: &str,
        event: watcher::Event<DynamicObject>,
        cluster_domain: &str,
        kept_labels: &[String],
    ) -> Affected {
        let key = |o: &DynamicObject| (o.namespace().unwrap_or_default(), o.name_any());
        let mut affected = Affected::default();
        match event {
            watcher::Event::Init => {
                self.pending = Some(HashMap::new());
                self.pending_seen.clear();
            }
            watcher::Event::InitApply(o) => {
                let k = key(&o);
                let (def, problems) = convert(&o, cluster_domain, kept_labels);
                self.warn(cluster, &k, problems);
                self.pending_seen.insert(k.clone());
                if let (Some(pending), Some(def)) = (self.pending.as_mut(), def) {
                    pending.insert(k, def);
                }
            }
            watcher::Event::InitDone => {
                let fresh = self.pending.take().unwrap_or_default();
                // Rules ignored as a whole are listed too: their warning stands.
                let seen = std::mem::take(&mut self.pending_seen);
                self.warned.retain(|k, _| seen.contains(k));
                affected = self.replace(fresh, cluster_domain);
            }
            watcher::Event::Apply(o) => {
                let k = key(&o);
                let (def, problems) = convert(&o, cluster_domain, kept_labels);
                self.warn(cluster, &k, problems);
                if self.objects.get(&k) != def.as_ref() {
                    if let Some(old) = self.remove(&k) {
                        affected.add(&old.host, cluster_domain);
                    }
                    if let Some(def) = def {
                        affected.add(&def.host, cluster_domain);
                        self.insert(k, def);
                    }
                }
            }
            watcher::Event::Delete(o) => {
                let k = key(&o);
                self.warned.remove(&k);
                if let Some(old) = self.remove(&k) {
                    affected.add(&old.host, cluster_domain);
                }
            }
        }
        affected
    }

    /// The cluster serves no rules: forget them all, like a relist finding none, except that
    /// the problems already logged stay logged (the rules come back as they were).
    pub fn set_unavailable(&mut self, why: String, cluster_domain: &str) -> Affected {
        self.pending = None;
        self.pending_seen.clear();
        let affected = self.replace(HashMap::new(), cluster_domain);
        self.unavailable = Some(why);
        affected
    }

    /// Replaces every rule with `fresh`; what that affects.
    fn replace(&mut self, fresh: HashMap<ObjKey, RuleDef>, cluster_domain: &str) -> Affected {
        let mut affected = Affected::default();
        for (k, v) in &self.objects {
            if fresh.get(k) != Some(v) {
                affected.add(&v.host, cluster_domain);
            }
        }
        for (k, v) in &fresh {
            if self.objects.get(k) != Some(v) {
                affected.add(&v.host, cluster_domain);
            }
        }
        self.objects = fresh;
        self.synced = true;
        self.reindex();
        affected
    }

    fn warn(&mut self, cluster: &str, k: &ObjKey, problems: Vec<String>) {
        if problems.is_empty() {
            self.warned.remove(k);
            return;
        }
        if self.warned.get(k) == Some(&problems) {
            return;
        }
        for p in &problems {
            warn!(%cluster, destination_rule = %format!("{}/{}", k.0, k.1), "{p}");
        }
        self.warned.insert(k.clone(), problems);
    }

    /// Forgets every rule as deleting each would (their logged problems too), but leaves a
    /// list in progress alone; returns whether there were any.
    pub fn forget_objects(&mut self) -> bool {
        let had = !self.objects.is_empty();
        for k in self.objects.keys() {
            self.warned.remove(k);
        }
        self.objects.clear();
        self.by_host.clear();
        self.wildcards.clear();
        had
    }

    /// One rule in, indexed by its host (an event changes the index in place).
    fn insert(&mut self, k: ObjKey, def: RuleDef) {
        match &def.host {
            Host::Exact(h) => self.by_host.entry(h.clone()).or_default().push(k.clone()),
            Host::Wildcard(_) => self.wildcards.push(k.clone()),
        }
        self.objects.insert(k, def);
    }

    fn remove(&mut self, k: &ObjKey) -> Option<RuleDef> {
        let old = self.objects.remove(k)?;
        match &old.host {
            Host::Exact(h) => {
                if let Some(keys) = self.by_host.get_mut(h) {
                    keys.retain(|x| x != k);
                    if keys.is_empty() {
                        self.by_host.remove(h);
                    }
                }
            }
            Host::Wildcard(_) => self.wildcards.retain(|x| x != k),
        }
        Some(old)
    }

    /// The whole index again, after `objects` was replaced.
    fn reindex(&mut self) {
        self.by_host.clear();
        self.wildcards.clear();
        for (k, v) in &self.objects {
            match &v.host {
                Host::Exact(h) => self.by_host.entry(h.clone()).or_default().push(k.clone()),
                Host::Wildcard(_) => self.wildcards.push(k.clone()),
            }
        }
    }

    /// Rules whose host matches `hostname`, with how specifically.
    fn matching<'a>(
        &'a self,
        hostname: &'a str,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a RuleDef, usize)> + 'a {
        self.by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .chain(self.wildcards.iter())
            .filter_map(move |k| {
                let def = self.objects.get(k)?;
                Some((k, def, def.host.specificity(hostname)?))
            })
    }
}

/// The subsets of Service `key` (hostname `hostname`) for gateways of `network`, from the rules
/// of every cluster (rules of clusters in `network` first when two define the same subset).
pub fn subsets(model: &Model, network: &str, key: &ObjKey, hostname: &str) -> Vec<Subset> {
    let mut clusters: Vec<(bool, &str, &DestinationRules)> = model
        .clusters
        .iter()
        .filter(|(_, c)| c.network.is_some() && !c.destination_rules.objects.is_empty())
        .map(|(name, c)| {
            let elsewhere = c.network.as_deref() != Some(network);
            (elsewhere, name.as_str(), &c.destination_rules)
        })
        .collect();
    if clusters.is_empty() {
        return Vec::new();
    }
    clusters.sort_by_key(|(elsewhere, name, _)| (*elsewhere, *name));
    let rank = |ns: &str| {
        if ns == key.0 {
            0
        } else if ns == ROOT_NAMESPACE {
            1
        } else {
            2
        }
    };
    let mut candidates: Vec<(usize, &ObjKey, &RuleDef, usize)> = clusters
        .iter()
        .enumerate()
        .flat_map(|(order, (_, _, rules))| {
            rules
                .matching(hostname)
                .map(move |(k, def, spec)| (order, k, def, spec))
        })
        .collect();
    // Every rule that applies contributes its subsets; where two define the same name, Istio's
    // precedence decides: the Service's namespace, the root namespace, any other; an exact host
    // before wildcards, the most specific first; clusters of this network first, rules for all
    // clients, the oldest; namespace and name to settle the rest.
    candidates.sort_by_key(|&(cluster, k, def, spec)| {
        let by_name = (k.0.as_str(), k.1.as_str());
        let created = def.created.as_str();
        (
            rank(&k.0),
            std::cmp::Reverse(spec),
            cluster,
            def.scoped,
            created,
            by_name,
        )
    });
    let mut out: Vec<Subset> = Vec::new();
    for (_, _, def, _) in candidates {
        for s in &def.subsets {
            if !out.iter().any(|o| o.name == s.name) {
                out.push(s.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
