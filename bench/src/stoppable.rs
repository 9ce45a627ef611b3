//! A spawned accept loop that stops on request: `shutdown` waits for it to finish, dropping
//! the handle aborts it; and the accept loop it usually runs. Shared by the model server and
//! the WAN link.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

pub(crate) struct StoppableTask {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl StoppableTask {
    /// Spawns `run(stopped)`; `stopped` resolves when [`StoppableTask::shutdown`] is called.
    pub(crate) fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        StoppableTask {
            stop: Some(stop),
            task: Some(tokio::spawn(run(stopped))),
        }
    }

    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StoppableTask {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts on `listener` until `stopped`, running `handle`'s future for each connection;
/// when stopped, every connection still open is aborted. `what` names the server in logs.
pub(crate) async fn accept_until_stopped<F, Fut>(
    listener: TcpListener,
    mut stopped: oneshot::Receiver<()>,
    what: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(handle(tcp, peer));
                }
                Err(err) => {
                    // Typically out of file descriptors: back off rather than spin.
                    tracing::warn!(%err, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}
