//! Hot reload: on SIGHUP or when the config file changes, validate and swap; a bad file keeps
//! the old config, logs why and counts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::metrics as m;
use crate::Proxy;

/// Watches `path` (through its directory, because Kubernetes swaps ConfigMap files by
/// replacing a symlink) and SIGHUP, reloading `proxy` on either. Runs until the process ends.
pub fn watch_config_file(proxy: Proxy, path: PathBuf) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_tx = tx.clone();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if concerns(&event, file_name.as_deref()) {
            // A full channel already holds a pending reload; that one will read the new file.
            let _ = file_tx.try_send(());
        }
    })
    .context("cannot start the config file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;

    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading config");
                let _ = tx.send(()).await;
            }
        });
    }

    tokio::spawn(async move {
        // The watcher stops when dropped; keep it for the life of this task.
        let _watcher = watcher;
        // The bytes last applied. Unknown at first: the file may have changed between the load
        // at startup and now, so the first event always reloads.
        let mut applied: Option<Vec<u8>> = None;
        while rx.recv().await.is_some() {
            // Editors and ConfigMap updates write in several steps; let them settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let current = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(err) => {
                    // Mid-swap the file can be briefly missing; the next event retries.
                    tracing::debug!(file = %path.display(), %err, "config file not readable");
                    continue;
                }
            };
            if applied.as_deref() == Some(&current[..]) {
                continue;
            }
            // A refused file is not remembered: the next event or SIGHUP tries it again (say,
            // once the port that made it fail is free).
            applied = reload(&proxy, &path).await.then_some(current);
        }
    });
    Ok(())
}

/// True for changes to the config file itself, or to Kubernetes' `..data` symlink through
/// which a mounted ConfigMap is swapped. Our own reads (access events) and other files in
/// the directory (a route cache, say) are not changes.
fn concerns(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let writes = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Any
            | EventKind::Other
    );
    writes
        && event.paths.iter().any(|p| {
            let name = p.file_name();
            name == file_name || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
        })
}

/// Loads and applies the file; true if it is now in force.
async fn reload(proxy: &Proxy, path: &Path) -> bool {
    let result = match eastwest_routes::load_proxy_config(path) {
        Ok(config) => match proxy.apply_config(config).await {
            Err(crate::ApplyError::Draining) => {
                tracing::info!(file = %path.display(), "config change ignored while draining");
                return false;
            }
            applied => applied.map_err(|e| format!("{}: {e}", path.display())),
        },
        Err(err) => Err(err.to_string()),
    };
    match result {
        Ok(()) => {
            metrics::counter!(m::CONFIG_RELOADS).increment(1);
            tracing::info!(file = %path.display(), "config reloaded");
            true
        }
        Err(why) => {
            metrics::counter!(m::CONFIG_RELOAD_FAILURES).increment(1);
            tracing::error!("config reload refused, keeping the old config:\n{why}");
            false
        }
    }
}
