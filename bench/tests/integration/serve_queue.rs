//! `max_running` queues requests: with one slot, a second request generates nothing
//! until the first is served; with two slots they overlap. A client that leaves frees
//! its slot.

use std::net::SocketAddr;
use std::time::Duration;

use crate::serve_support::*;
use eastwest_bench::serve::{ModelServer, ServeConfig};
use serde_json::json;

fn is_content(e: &Event) -> bool {
    e.data != "[DONE]"
        && e.json()["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
}

async fn start(max_running: usize) -> ModelServer {
    let cfg = ServeConfig {
        max_running,
        ttft: Duration::from_millis(1),
        itl: Duration::from_millis(1),
        ..Default::default()
    };
    ModelServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .unwrap()
}

fn chat(max_tokens: usize) -> String {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": true})
        .to_string()
}

/// Reads until the first token; returns how many tokens were read (1) or 0 at the end.
async fn first_token(reader: &mut SseReader) {
    loop {
        let e = reader.next().await.expect("a token before the end");
        if is_content(&e) {
            return;
        }
    }
}

async fn count_rest(reader: &mut SseReader) -> usize {
    let mut n = 0;
    while let Some(e) = reader.next().await {
        n += usize::from(is_content(&e));
    }
    n
}

#[tokio::test]
async fn one_slot_serves_one_after_the_other() {
    let server = start(1).await;
    let addr = server.local_addr();
    let mut a = SseReader::new(post(addr, "/v1/chat/completions", &chat(30)).await);
    first_token(&mut a).await;
    // A holds the only slot; B gets its headers at once but queues.
    let mut b = SseReader::new(post(addr, "/v1/chat/completions", &chat(30)).await);
    wait_for("B to queue", || server.stats().waiting == 1).await;
    assert_eq!(server.stats().running, 1);
    let drain_a = tokio::spawn(async move { 1 + count_rest(&mut a).await });
    first_token(&mut b).await;
    // B's first token exists only after A was served to its end.
    assert_eq!(server.stats().requests, 1, "B generated before A finished");
    let b_tokens = 1 + count_rest(&mut b).await;
    assert_eq!((drain_a.await.unwrap(), b_tokens), (30, 30));
    let stats = server.stats();
    assert_eq!(
        (
            stats.requests,
            stats.peak_running,
            stats.running,
            stats.waiting
        ),
        (2, 1, 0, 0)
    );
}

#[tokio::test]
async fn two_slots_overlap_and_a_departed_client_frees_its_slot() {
    let server = start(2).await;
    let addr = server.local_addr();
    // A is long (seconds); B is short and runs while A is still generating.
    let mut a = SseReader::new(post(addr, "/v1/chat/completions", &chat(5000)).await);
    first_token(&mut a).await;
    let mut b = SseReader::new(post(addr, "/v1/chat/completions", &chat(3)).await);
    assert_eq!(count_rest(&mut b).await, 3);
    let stats = server.stats();
    assert_eq!(
        (stats.requests, stats.running, stats.peak_running),
        (1, 1, 2)
    );
    // A's client leaves: the server stops generating for it.
    drop(a);
    wait_for("A's slot to be freed", || server.stats().running == 0).await;
    assert_eq!(server.stats().requests, 1, "A was not served to its end");
}
