//! Identity from PEM files (`eastwest-certs gateway`, or a mounted Secret): checked at start,
//! re-read when any of them changes. A new set that does not check out (say, caught
//! half-written) is read again after a settle delay; one that stays bad keeps the old
//! certificate and is reported once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use eastwest_routes::IdentityFiles;
use notify::{RecursiveMode, Watcher};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{pem_certs, CertProblem, Certified, IdentityHandle, Policy, Publisher};

/// After a change, before reading: a writer (or Kubernetes' symlink swap) may be mid-way.
const SETTLE: Duration = Duration::from_millis(100);
/// Before reading a set that did not check out again.
const SETTLE_BEFORE_REPORTING: Duration = Duration::from_millis(500);
/// Re-reads of a set that keeps changing while it does not check out, before reporting it.
const MAX_SETTLE_ROUNDS: usize = 5;

/// The three files' bytes, as last read.
type Contents = [Vec<u8>; 3];

pub(super) async fn start(
    files: &IdentityFiles,
    policy: Policy,
    shutdown: CancellationToken,
) -> anyhow::Result<IdentityHandle> {
    let contents = read(files).await?;
    let first = check(files, &contents, &policy)?;
    let (publisher, handle) = Publisher::new("files", &first);
    let (tx, rx) = mpsc::channel(4);
    let watcher = watch_dirs(files, tx)?;
    tokio::spawn(reload_loop(
        files.clone(),
        policy,
        publisher,
        contents,
        rx,
        watcher,
        shutdown,
    ));
    Ok(handle)
}

/// Watches the files' directories (Kubernetes swaps a mounted Secret's files by replacing a
/// `..data` symlink, so the files themselves see no event).
fn watch_dirs(
    files: &IdentityFiles,
    tx: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if crate::reload::is_write(&event.kind) {
            // A full channel already holds a pending reload; it will read the new files.
            let _ = tx.try_send(());
        }
    })
    .context("cannot start the identity file watcher")?;
    let mut dirs: Vec<PathBuf> = [&files.cert_chain, &files.key, &files.roots]
        .iter()
        .map(|p| dir_of(p))
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    Ok(watcher)
}

fn dir_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

async fn reload_loop(
    files: IdentityFiles,
    policy: Policy,
    mut publisher: Publisher,
    mut applied: Contents,
    mut rx: mpsc::Receiver<()>,
    watcher: notify::RecommendedWatcher,
    shutdown: CancellationToken,
) {
    // The watcher stops when dropped; keep it for the life of this task.
    let _watcher = watcher;
    let mut refused: Option<Contents> = None;
    // Set while a file cannot be read, so that is reported once, not per event.
    let mut unreadable = false;
    loop {
        tokio::select! {
            event = rx.recv() => if event.is_none() { return },
            () = shutdown.cancelled() => return,
        }
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        let (contents, result) = match settle(&files, &policy).await {
            Ok(read) => {
                if std::mem::take(&mut unreadable) {
                    tracing::info!("gateway identity files readable again");
                }
                read
            }
            Err(err) => {
                if !std::mem::replace(&mut unreadable, true) {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "gateway identity files unreadable; keeping the certificate in force"
                    );
                }
                continue;
            }
        };
        if contents == applied || refused.as_ref() == Some(&contents) {
            continue;
        }
        match result {
            Ok(next) => {
                publisher.publish(&next);
                applied = contents;
                refused = None;
            }
            Err(err) => {
                publisher.failed(format!("{err:#}"));
                refused = Some(contents);
            }
        }
    }
}

/// Reads and checks the files; a set that does not check out is read again until it does
/// or stops changing. An error while a file cannot be read (mid-swap, or removed: the
/// certificate in force stays, and the file's return is a change like any other).
async fn settle(
    files: &IdentityFiles,
    policy: &Policy,
) -> anyhow::Result<(Contents, anyhow::Result<Certified>)> {
    let mut contents = read(files).await?;
    let mut result = check(files, &contents, policy);
    for _ in 0..MAX_SETTLE_ROUNDS {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(SETTLE_BEFORE_REPORTING).await;
        let again = read(files).await?;
        if again == contents {
            break;
        }
        contents = again;
        result = check(files, &contents, policy);
    }
    Ok((contents, result))
}

async fn read(files: &IdentityFiles) -> anyhow::Result<Contents> {
    let read = |p: PathBuf| async move {
        tokio::fs::read(&p)
            .await
            .with_context(|| format!("identity.files: cannot read {}", p.display()))
    };
    Ok([
        read(files.cert_chain.clone()).await?,
        read(files.key.clone()).await?,
        read(files.roots.clone()).await?,
    ])
}

/// Checks a set of files; errors name the file at fault.
fn check(
    files: &IdentityFiles,
    [chain, key, roots]: &Contents,
    policy: &Policy,
) -> anyhow::Result<Certified> {
    let chain_file = files.cert_chain.display();
    let key_file = files.key.display();
    let roots_file = files.roots.display();
    let chain = pem_certs(chain, &format!("identity.files.cert_chain {chain_file}"))?;
    let roots = pem_certs(roots, &format!("identity.files.roots {roots_file}"))?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| anyhow::anyhow!("identity.files.key {key_file}: no PEM private key: {e}"))?;
    Certified::new(chain, key, &roots, policy).map_err(|problem| match problem {
        CertProblem::Chain(why) => anyhow::anyhow!("identity.files.cert_chain {chain_file}: {why}"),
        CertProblem::Key(why) => anyhow::anyhow!("identity.files.key {key_file}: {why}"),
        CertProblem::Roots(why) => {
            anyhow::anyhow!("identity.files.cert_chain {chain_file} / roots {roots_file}: {why}")
        }
    })
}
