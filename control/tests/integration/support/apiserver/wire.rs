//! The HTTP side of the API server: paths, query parameters and label selectors, lists and
//! watch streams, answered from the state the test drives through [`super::ApiServer`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Body, Event, Shared};

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

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let query = Query::parse(req.uri().query());
    let Some((resource, ns, name)) = parse_path(req.uri().path()) else {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "no such path"),
        );
    };
    {
        let mut st = shared.state.lock().unwrap();
        if st.unavailable {
            *st.unavailable_answers.entry(resource.clone()).or_default() += 1;
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "etcdserver: leader changed"),
            );
        }
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
