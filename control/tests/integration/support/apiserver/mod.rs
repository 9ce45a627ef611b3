//! An in-process HTTP/1.1 server speaking the Kubernetes API wire protocol for the handful of
//! resources eastwest-control reads: list (with `metadata.resourceVersion`, `limit`/`continue`),
//! watch (JSON event lines, BOOKMARKs, `ERROR` 410 "Expired"), label selectors, and single
//! Namespace GETs. Tests drive it directly: upsert/delete objects, drop watches mid-stream,
//! expire resource versions, go down and come back on the same port.
//!
//! It is test-only (shared by tests and the benchmark through `#[path]`), never shipped. This
//! file holds the state and what tests do to it; `wire` answers the HTTP requests.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

mod wire;

type Body = BoxBody<Bytes, std::io::Error>;

/// How many past events a watch can resume from before it gets 410 Gone.
const EVENT_LOG_LEN: usize = 200_000;

#[derive(Clone)]
struct Event {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Arc<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// resource plural -> (namespace, name) -> object
    objects: HashMap<String, BTreeMap<(String, String), Arc<Value>>>,
    log: VecDeque<Event>,
    /// Watches asking to resume from a version below this get 410 Gone.
    oldest_rv: u64,
    lists: HashMap<String, u64>,
    watches: HashMap<String, u64>,
    /// Resources (`destinationrules`) or resource versions (`destinationrules/v1`) answered
    /// with 404, as for a CRD that is not installed.
    not_served: HashSet<String>,
    /// Requests answered 404 because of `not_served`, per resource.
    refused: HashMap<String, u64>,
    /// Resources whose watches are answered with 403, as for RBAC granting list but not watch.
    watch_forbidden: HashSet<String>,
    /// Every request is answered 503, as by an API server whose etcd is gone.
    unavailable: bool,
    /// Requests, per resource, answered 503 because of `unavailable`.
    unavailable_answers: HashMap<String, u64>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Bumped to cut every open watch stream abruptly.
    cut: watch::Sender<u64>,
    bookmark_every: Duration,
}

pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        Self::start_with(Duration::from_millis(500)).await
    }

    /// `bookmark_every`: how often open watches get a BOOKMARK with the current version.
    pub async fn start_with(bookmark_every: Duration) -> ApiServer {
        let (events, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                ..State::default()
            }),
            events,
            cut: watch::channel(0).0,
            bookmark_every,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = ApiServer {
            addr,
            shared,
            task: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose only cluster is this server, as `istioctl create-remote-secret`
    /// would write it (minus credentials: plain HTTP on loopback).
    pub fn kubeconfig(&self, cluster: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {url}\n  name: {cluster}\n\
             contexts:\n- context:\n    cluster: {cluster}\n    user: {cluster}\n  name: {cluster}\n\
             current-context: {cluster}\nusers:\n- name: {cluster}\n  user:\n    token: test-token\n",
            url = self.url()
        )
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            // Dropping this set (when the server goes down) aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(wire::handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Stops listening and closes every connection (connections are refused until `start_again`).
    pub async fn go_down(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same address.
    pub async fn come_back(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    pub fn apply(&self, resource: &str, mut object: Value) -> u64 {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{resource}-{ns}-{name}"));
        }
        let object = Arc::new(object);
        let existed = st
            .objects
            .entry(resource.to_string())
            .or_default()
            .insert((ns, name), object.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        self.record(&mut st, resource, kind, object);
        rv
    }

    pub fn delete(&self, resource: &str, ns: &str, name: &str) -> bool {
        let mut st = self.shared.state.lock().unwrap();
        let Some(old) = st
            .objects
            .get_mut(resource)
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
        else {
            return false;
        };
        st.rv += 1;
        let mut object = (*old).clone();
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, resource, "DELETED", Arc::new(object));
        true
    }

    fn record(&self, st: &mut State, resource: &str, kind: &'static str, object: Arc<Value>) {
        let ev = Event {
            rv: st.rv,
            resource: resource.to_string(),
            kind,
            object,
        };
        st.log.push_back(ev.clone());
        while st.log.len() > EVENT_LOG_LEN {
            if let Some(old) = st.log.pop_front() {
                st.oldest_rv = old.rv + 1;
            }
        }
        let _ = self.shared.events.send(ev);
    }

    /// Cuts every open watch mid-stream (the connection is reset, no clean end).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Forgets all history: any watch resuming from an earlier version gets `410 Gone`, which
    /// forces clients to list again. Open watches are cut so they have to resume.
    pub fn expire_history(&self) {
        {
            let mut st = self.shared.state.lock().unwrap();
            st.rv += 1;
            st.oldest_rv = st.rv + 1;
            st.log.clear();
        }
        self.drop_watches();
    }

    /// Answers `resource` (every version, or only `resource/version`) with 404 Not Found from
    /// now on, like an API server without that CRD; open watches are cut.
    pub fn stop_serving(&self, resource: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .not_served
            .insert(resource.to_string());
        self.drop_watches();
    }

    /// Serves `resource` (as given to [`ApiServer::stop_serving`]) again: the CRD got installed.
    pub fn start_serving(&self, resource: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .not_served
            .remove(resource);
    }

    /// Answers watches of `resource` with 403 Forbidden (lists still succeed), or no longer.
    pub fn forbid_watch(&self, resource: &str, forbidden: bool) {
        let mut st = self.shared.state.lock().unwrap();
        if forbidden {
            st.watch_forbidden.insert(resource.to_string());
        } else {
            st.watch_forbidden.remove(resource);
        }
    }

    /// Answers every request with 503 Service Unavailable (and cuts open watches), or no longer.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.state.lock().unwrap().unavailable = unavailable;
        if unavailable {
            self.drop_watches();
        }
    }

    /// Requests for `resource` answered 503 because of [`ApiServer::set_unavailable`].
    pub fn unavailable_count(&self, resource: &str) -> u64 {
        let st = self.shared.state.lock().unwrap();
        st.unavailable_answers.get(resource).copied().unwrap_or(0)
    }

    /// Requests for `resource` answered 404 since [`ApiServer::stop_serving`].
    pub fn refused_count(&self, resource: &str) -> u64 {
        let st = self.shared.state.lock().unwrap();
        st.refused.get(resource).copied().unwrap_or(0)
    }

    pub fn list_count(&self, resource: &str) -> u64 {
        let st = self.shared.state.lock().unwrap();
        st.lists.get(resource).copied().unwrap_or(0)
    }

    pub fn watch_count(&self, resource: &str) -> u64 {
        let st = self.shared.state.lock().unwrap();
        st.watches.get(resource).copied().unwrap_or(0)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}
