//! The NDJSON lines of the route stream, assembled from per-Service JSON fragments serialised
//! once: a full [`RouteTable`](eastwest_routes::RouteTable) line, and a
//! [`RouteUpdate::Delta`](eastwest_routes::RouteUpdate) line holding only the Services that
//! changed. Both are byte for byte what serde would write for the same values.

use std::sync::Arc;

use eastwest_routes::NetworkGateway;
use tracing::error;

use crate::compute::Entry;

/// One Service's part of a table, serialised once and reused until the Service changes.
#[derive(Debug, PartialEq, Eq)]
pub struct Fragment {
    pub hostname: String,
    pub service: Option<Vec<u8>>,
    pub remote: Vec<Vec<u8>>,
}

impl Fragment {
    /// `None` when the Service contributes nothing to the table.
    pub fn of(hostname: String, entry: Entry) -> Option<Fragment> {
        if entry.service.is_none() && entry.remote.is_empty() {
            return None;
        }
        Some(Fragment {
            hostname,
            service: entry.service.and_then(|s| serde_json::to_vec(&s).ok()),
            remote: entry
                .remote
                .iter()
                .filter_map(|r| serde_json::to_vec(r).ok())
                .collect(),
        })
    }
}

/// A network's table at one version: its fragments in hostname order, and its gateways.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub fragments: Vec<Arc<Fragment>>,
    pub gateways: Vec<NetworkGateway>,
    /// Some cluster had not synced: see [`RouteTable::partial`](eastwest_routes::RouteTable).
    pub partial: bool,
}

impl Snapshot {
    fn get(&self, hostname: &str) -> Option<&Fragment> {
        self.fragments
            .binary_search_by(|f| f.hostname.as_str().cmp(hostname))
            .ok()
            .map(|i| &*self.fragments[i])
    }
}

/// The full table as one line.
pub fn table_line(version: u64, snapshot: &Snapshot) -> Vec<u8> {
    let size: usize = snapshot
        .fragments
        .iter()
        .map(|f| {
            f.service.as_ref().map_or(0, Vec::len)
                + f.remote.iter().map(Vec::len).sum::<usize>()
                + 2
        })
        .sum();
    let mut line = Vec::with_capacity(size + 4096);
    line.extend_from_slice(format!("{{\"version\":{version},\"services\":[").as_bytes());
    let services = snapshot
        .fragments
        .iter()
        .filter_map(|f| f.service.as_deref());
    join(&mut line, services);
    line.extend_from_slice(b"],\"remote_services\":[");
    let remote = snapshot
        .fragments
        .iter()
        .flat_map(|f| f.remote.iter().map(Vec::as_slice));
    join(&mut line, remote);
    line.extend_from_slice(b"],\"network_gateways\":");
    gateways(&mut line, &snapshot.gateways);
    partial(&mut line, snapshot.partial);
    line.extend_from_slice(b"}\n");
    line
}

/// The delta from `base` to `version`: the current state (in `snapshot`) of every hostname in
/// `changed` (sorted, no duplicates). A hostname without a service is listed as removed, and
/// likewise for remote services; removing what the proxy does not have is harmless.
pub fn delta_line(
    version: u64,
    base: u64,
    snapshot: &Snapshot,
    changed: &[&str],
    gateways_changed: bool,
) -> Vec<u8> {
    let current: Vec<(&str, Option<&Fragment>)> =
        changed.iter().map(|h| (*h, snapshot.get(h))).collect();
    let mut line = Vec::with_capacity(4096);
    line.extend_from_slice(
        format!("{{\"delta\":{{\"version\":{version},\"base\":{base},\"services\":[").as_bytes(),
    );
    let services = current
        .iter()
        .filter_map(|(_, f)| f.and_then(|f| f.service.as_deref()));
    join(&mut line, services);
    line.extend_from_slice(b"],\"removed_services\":[");
    let removed = current
        .iter()
        .filter(|(_, f)| f.is_none_or(|f| f.service.is_none()));
    join_quoted(&mut line, removed.map(|(h, _)| *h));
    line.extend_from_slice(b"],\"remote_services\":[");
    let remote = current
        .iter()
        .flat_map(|(_, f)| f.iter().flat_map(|f| f.remote.iter().map(Vec::as_slice)));
    join(&mut line, remote);
    line.extend_from_slice(b"],\"removed_remote_services\":[");
    let removed = current
        .iter()
        .filter(|(_, f)| f.is_none_or(|f| f.remote.is_empty()));
    join_quoted(&mut line, removed.map(|(h, _)| *h));
    line.push(b']');
    if gateways_changed {
        line.extend_from_slice(b",\"network_gateways\":");
        gateways(&mut line, &snapshot.gateways);
    }
    partial(&mut line, snapshot.partial);
    line.extend_from_slice(b"}}\n");
    line
}

/// `names` as JSON strings, comma-separated.
fn join_quoted<'a>(out: &mut Vec<u8>, names: impl Iterator<Item = &'a str>) {
    join_with(out, names, |out, name| {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(out, name);
    });
}

fn gateways(line: &mut Vec<u8>, gateways: &[NetworkGateway]) {
    match serde_json::to_vec(gateways) {
        Ok(g) => line.extend_from_slice(&g),
        Err(e) => {
            error!(error = %e, "serialising network gateways failed");
            line.extend_from_slice(b"[]");
        }
    }
}

/// The `partial` field, written (like serde's `skip_serializing_if`) only when set.
fn partial(line: &mut Vec<u8>, partial: bool) {
    if partial {
        line.extend_from_slice(b",\"partial\":true");
    }
}

fn join<'a>(out: &mut Vec<u8>, parts: impl Iterator<Item = &'a [u8]>) {
    join_with(out, parts, |out, part| out.extend_from_slice(part));
}

fn join_with<T>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
}
