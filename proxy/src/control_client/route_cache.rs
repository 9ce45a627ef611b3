//! `--route-cache`: the last complete table from control, on disk, so a restarted gateway
//! routes while control is unreachable.

use std::path::{Path, PathBuf};

use anyhow::Context;
use eastwest_routes::RouteTable;
use tokio::sync::watch;
use tracing::warn;

/// Loads the cached table at startup: `None` if the file does not exist, an error naming the
/// file (and line/column) if it is unreadable or corrupt.
pub fn load_route_cache(path: &Path) -> anyhow::Result<Option<RouteTable>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading route cache {}", path.display())),
    };
    let table = serde_json::from_slice(&data)
        .with_context(|| format!("route cache {} is corrupt", path.display()))?;
    Ok(Some(table))
}

/// Writes the newest applied table to `path` (serialised on a blocking thread, then temp file +
/// rename, so a crash never leaves a torn cache). Coalesces: a burst of tables costs one write
/// of the last.
pub(super) fn spawn_cache_writer(path: PathBuf) -> watch::Sender<Option<RouteTable>> {
    let (tx, mut rx) = watch::channel::<Option<RouteTable>>(None);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(table) = rx.borrow_and_update().clone() else {
                continue;
            };
            let path = path.clone();
            let result = tokio::task::spawn_blocking(move || {
                let json = serde_json::to_vec(&table).context("serialising the route table")?;
                write_atomically(&path, &json)
            })
            .await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = format!("{e:#}"), "writing the route cache failed"),
                Err(e) => warn!(error = %e, "route cache writer panicked"),
            }
        }
    });
    tx
}

/// A temp file of its own (random name, same directory) per write: the cache may be a node's
/// hostPath that two gateway pods write at once during a rollout, and a shared temp name would
/// let one rename the other's half-written file or fail its rename.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".routes-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the temp file to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DaemonSet keeps the cache on the node (hostPath), so during a rollout two gateway
    /// pods on one node write the same file: neither write may fail or leave a torn file.
    #[test]
    fn two_writers_of_one_route_cache_never_tear_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        let tables = [vec![b'a'; 64 * 1024], vec![b'b'; 16]];
        std::thread::scope(|s| {
            for data in &tables {
                let path = &path;
                s.spawn(move || {
                    for i in 0..300 {
                        write_atomically(path, data)
                            .unwrap_or_else(|e| panic!("write {i} failed: {e:#}"));
                    }
                });
            }
        });
        let left = std::fs::read(&path).unwrap();
        assert!(tables.contains(&left), "torn cache: {} bytes", left.len());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["routes.json"], "temp files left behind");
    }
}
