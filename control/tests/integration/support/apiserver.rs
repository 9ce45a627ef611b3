//! An in-process HTTP/1.1 server speaking the Kubernetes API wire protocol for the handful of
//! resources eastwest-control reads: list (with `metadata.resourceVersion`, `limit`/`continue`),
//! watch (JSON event lines, BOOKMARKs, `ERROR` 410 "Expired"), label selectors, and single
//! Namespace GETs. Tests drive it directly: upsert/delete objects, drop watches mid-stream,
//! expire resource versions, go down and come back on the same port.
//!
//! It is test-only (shared by tests and the benchmark through `#[path]`), never shipped.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

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
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
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

struct Query {
    params: HashMap<String, String>,
}

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut params = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(decode(k), decode(v));
        }
        Query { params }
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v,k2!=v2,k3` equality-based selectors, which is all the control plane uses.
fn selector_matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else {
            !labels[term].is_null()
        }
    })
}

/// The API version of a path (`v1`, `v1beta1`).
fn path_version(path: &str) -> Option<&str> {
    match path
        .trim_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["api", version, ..] | ["apis", _, version, ..] => Some(version),
        _ => None,
    }
}

/// (resource, namespace, single-object name) from an API path.
fn parse_path(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    match rest {
        [res] => Some((res.to_string(), None, None)),
        ["namespaces", name] => Some(("namespaces".into(), None, Some(name.to_string()))),
        ["namespaces", ns, res] => Some((res.to_string(), Some(ns.to_string()), None)),
        ["namespaces", ns, res, name] => Some((
            res.to_string(),
            Some(ns.to_string()),
            Some(name.to_string()),
        )),
        _ => None,
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let Some((resource, ns, name)) = parse_path(req.uri().path()) else {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "no such path"),
        );
    };
    {
        let mut st = shared.state.lock().unwrap();
        let version = path_version(req.uri().path()).unwrap_or("");
        if st.not_served.contains(&resource)
            || st.not_served.contains(&format!("{resource}/{version}"))
        {
            *st.refused.entry(resource.clone()).or_default() += 1;
            return full(
                StatusCode::NOT_FOUND,
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
    }
    if let Some(name) = name {
        let st = shared.state.lock().unwrap();
        let key = (ns.unwrap_or_default(), name.clone());
        return match st.objects.get(&resource).and_then(|m| m.get(&key)) {
            Some(obj) => full(StatusCode::OK, (**obj).clone()),
            None => full(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
            ),
        };
    }
    let selector = query.get("labelSelector").map(str::to_string);
    if matches!(query.get("watch"), Some("true" | "1")) {
        let mut st = shared.state.lock().unwrap();
        if st.watch_forbidden.contains(&resource) {
            *st.watches.entry(resource.clone()).or_default() += 1;
            return full(
                StatusCode::FORBIDDEN,
                status(
                    403,
                    "Forbidden",
                    &format!("cannot watch resource {resource:?}"),
                ),
            );
        }
        drop(st);
        return start_watch(shared, resource, ns, selector, &query);
    }
    list(
        &shared,
        &resource,
        ns.as_deref(),
        selector.as_deref(),
        &query,
    )
}

fn in_scope(ns: Option<&str>, object: &Value) -> bool {
    ns.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
}

fn list(
    shared: &Shared,
    resource: &str,
    ns: Option<&str>,
    selector: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let mut st = shared.state.lock().unwrap();
    *st.lists.entry(resource.to_string()).or_default() += 1;
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    // continue token: "<rv>:<index>" — paging over a snapshot by position is good enough here.
    let start: usize = query
        .get("continue")
        .and_then(|c| c.split_once(':'))
        .and_then(|(_, i)| i.parse().ok())
        .unwrap_or(0);
    let empty = BTreeMap::new();
    let all = st.objects.get(resource).unwrap_or(&empty);
    let mut items = Vec::new();
    let mut next = None;
    for (i, obj) in all
        .values()
        .filter(|o| in_scope(ns, o) && selector_matches(selector, o))
        .enumerate()
        .skip(start)
    {
        if items.len() == limit {
            next = Some(format!("{}:{i}", st.rv));
            break;
        }
        items.push((**obj).clone());
    }
    let mut metadata = json!({"resourceVersion": st.rv.to_string()});
    if let Some(next) = next {
        metadata["continue"] = json!(next);
    }
    let body = json!({"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items});
    drop(st);
    full(StatusCode::OK, body)
}

fn start_watch(
    shared: Arc<Shared>,
    resource: String,
    ns: Option<String>,
    selector: Option<String>,
    query: &Query,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1024);
    let mut live = shared.events.subscribe();
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    let backlog: Result<Vec<Event>, u64> = {
        let mut st = shared.state.lock().unwrap();
        *st.watches.entry(resource.clone()).or_default() += 1;
        if from != 0 && from < st.oldest_rv {
            Err(st.oldest_rv)
        } else {
            Ok(st
                .log
                .iter()
                .filter(|e| e.rv > from && e.resource == resource)
                .cloned()
                .collect())
        }
    };
    let bookmark_kind = resource.clone();
    tokio::spawn(async move {
        let line = |v: Value| -> Result<Frame<Bytes>, std::io::Error> {
            let mut s = v.to_string();
            s.push('\n');
            Ok(Frame::data(Bytes::from(s)))
        };
        let matches = |e: &Event| {
            e.resource == resource
                && in_scope(ns.as_deref(), &e.object)
                && selector_matches(selector.as_deref(), &e.object)
        };
        let backlog = match backlog {
            Ok(b) => b,
            Err(oldest) => {
                let msg = format!("too old resource version: {from} ({oldest})");
                let _ = tx
                    .send(line(
                        json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
                    ))
                    .await;
                return;
            }
        };
        let mut last = from;
        for e in backlog.iter().filter(|e| matches(e)) {
            last = e.rv;
            if tx
                .send(line(json!({"type": e.kind, "object": *e.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmarks = tokio::time::interval(shared.bookmark_every);
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(e) if e.rv > last && matches(&e) => {
                        last = e.rv;
                        if tx.send(line(json!({"type": e.kind, "object": *e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind: end the watch like an overloaded API server would.
                    Err(_) => return,
                },
                _ = bookmarks.tick() => {
                    let rv = shared.state.lock().unwrap().rv;
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind_of(&bookmark_kind),
                        "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bm)).await.is_err() {
                        return;
                    }
                }
                _ = cut.changed() => {
                    let _ = tx.send(Err(std::io::Error::other("watch cut by test"))).await;
                    return;
                }
                _ = &mut deadline => return,
            }
        }
    });
    let body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "secrets" => "Secret",
        "namespaces" => "Namespace",
        "pods" => "Pod",
        "destinationrules" => "DestinationRule",
        _ => "Unknown",
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).fuse()
}
