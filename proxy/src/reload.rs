//! Hot reload: on SIGHUP or when the config file changes, validate and swap; a bad file keeps
//! the old config, logs why and counts it once per content (not per event or SIGHUP); a file
//! that does not parse is read again after a settle delay first, since it may be mid-write;
//! a removed file is a warning and changes nothing.

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
    let (tx, mut rx) = mpsc::channel::<Trigger>(4);
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
            let _ = file_tx.try_send(Trigger::FileChanged);
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
                let _ = tx.send(Trigger::Hangup).await;
            }
        });
    }

    tokio::spawn(async move {
        // The watcher stops when dropped; keep it for the life of this task.
        let _watcher = watcher;
        let mut state = FileState::default();
        while let Some(first) = rx.recv().await {
            // Editors and ConfigMap updates write in several steps; let them settle.
            tokio::time::sleep(SETTLE).await;
            let mut trigger = first;
            while let Ok(more) = rx.try_recv() {
                trigger = trigger.max(more);
            }
            state.on(&proxy, &path, trigger).await;
        }
    });
    Ok(())
}

/// Waited after a change before reading the file, and again before reporting a file that
/// does not parse: an editor or a copy may still be writing it.
const SETTLE: Duration = Duration::from_millis(100);
const SETTLE_BEFORE_REPORTING: Duration = Duration::from_millis(500);
/// Re-reads of a file that keeps changing while it does not parse, before it is reported.
const MAX_SETTLE_ROUNDS: usize = 5;

/// What asked for a reload. A SIGHUP is an operator asking explicitly: it retries a file
/// that was refused for something outside it (a port in use), which a file event does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Trigger {
    FileChanged,
    Hangup,
}

/// What the watcher knows of the file between reloads.
#[derive(Default)]
struct FileState {
    /// The bytes last applied. Unknown at first: the file may have changed between the load
    /// at startup and now, so the first event always reloads.
    applied: Option<Vec<u8>>,
    /// The bytes last refused and why: the same content is reported once, not per event.
    refused: Option<(Vec<u8>, String)>,
    /// Set while the file is missing, so its removal is reported once.
    missing: bool,
}

impl FileState {
    async fn on(&mut self, proxy: &Proxy, path: &Path, trigger: Trigger) {
        let mut current = match self.read(path).await {
            Some(bytes) => bytes,
            None => return,
        };
        if self.applied.as_deref() == Some(&current[..]) {
            return;
        }
        let refused_before = |refused: &Option<(Vec<u8>, String)>, bytes: &[u8]| {
            refused.as_ref().is_some_and(|(b, _)| b == bytes)
        };
        if trigger == Trigger::FileChanged && refused_before(&self.refused, &current) {
            return;
        }
        let mut config = parse(path, &current);
        // A file that does not parse may be caught mid-write (truncated): read it again once
        // the writer had time to finish, and only report what stays broken.
        for _ in 0..MAX_SETTLE_ROUNDS {
            if config.is_ok() || refused_before(&self.refused, &current) {
                break;
            }
            tokio::time::sleep(SETTLE_BEFORE_REPORTING).await;
            let Some(again) = self.read(path).await else {
                return;
            };
            if again == current {
                break;
            }
            current = again;
            if self.applied.as_deref() == Some(&current[..]) {
                return;
            }
            config = parse(path, &current);
        }
        let result = match config {
            Ok(config) => match proxy.apply_config(config).await {
                Err(crate::ApplyError::Draining) => {
                    tracing::info!(file = %path.display(), "config change ignored while draining");
                    return;
                }
                applied => applied.map_err(|e| format!("{}: {e}", path.display())),
            },
            Err(why) => Err(why),
        };
        match result {
            Ok(()) => {
                metrics::counter!(m::CONFIG_RELOADS).increment(1);
                tracing::info!(file = %path.display(), "config reloaded");
                proxy.record_reload(Ok(()));
                self.applied = Some(current);
                self.refused = None;
            }
            Err(why) => {
                let repeated = self
                    .refused
                    .as_ref()
                    .is_some_and(|(b, w)| *b == current && *w == why);
                if repeated {
                    tracing::debug!(file = %path.display(), "config still refused for the same reason");
                } else {
                    metrics::counter!(m::CONFIG_RELOAD_FAILURES).increment(1);
                    tracing::error!("config reload refused, keeping the old config:\n{why}");
                    proxy.record_reload(Err(why.clone()));
                }
                // Not `applied`: a SIGHUP tries it again (say, once the port that made it
                // fail is free).
                self.refused = Some((current, why));
            }
        }
    }

    /// The file's bytes; `None` (reported once) while it cannot be read.
    async fn read(&mut self, path: &Path) -> Option<Vec<u8>> {
        let mut read = tokio::fs::read(path).await;
        if read.is_err() && !self.missing {
            // Mid-swap the file can be briefly missing: look again before saying so.
            tokio::time::sleep(SETTLE_BEFORE_REPORTING).await;
            read = tokio::fs::read(path).await;
        }
        match read {
            Ok(bytes) => {
                if std::mem::take(&mut self.missing) {
                    tracing::info!(file = %path.display(), "config file is back");
                }
                Some(bytes)
            }
            Err(err) => {
                // Removed (or unreadable): nothing in force changes; the file's return is a
                // change like any other.
                if !std::mem::replace(&mut self.missing, true) {
                    tracing::warn!(file = %path.display(), %err,
                        "config file removed or unreadable; keeping the config in force");
                }
                None
            }
        }
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<eastwest_routes::ProxyConfig, String> {
    let file = path.display().to_string();
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{file}: not UTF-8: {e}"))?;
    eastwest_routes::parse_proxy_config(text, &file).map_err(|e| e.to_string())
}

/// True for changes to the config file itself, or to Kubernetes' `..data` symlink through
/// which a mounted ConfigMap is swapped. Our own reads (access events) and other files in
/// the directory (a route cache, say) are not changes.
fn concerns(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    is_write(&event.kind)
        && event.paths.iter().any(|p| {
            let name = p.file_name();
            name == file_name || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
        })
}

/// True for events that may change a watched file's content (not our own reads). Shared by
/// the config reload and the identity files' watch.
pub(crate) fn is_write(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Any
            | EventKind::Other
    )
}
