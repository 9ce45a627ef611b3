//! A spawned accept loop that stops on request: `shutdown` waits for it to finish, dropping
//! the handle aborts it. Shared by the model server and the WAN link.

use std::future::Future;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
