//! Timing lower bounds (deterministic: a server can be late, never early): the first token
//! comes no sooner than `ttft - jitter`, the last no sooner than that plus `(n-1) * itl`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::serve_support::*;
use eastwest_bench::serve::{ModelServer, ServeConfig};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn tokens_are_never_early() {
    let cfg = ServeConfig {
        ttft: Duration::from_millis(30),
        ttft_jitter: Duration::from_millis(10),
        itl: Duration::from_millis(5),
        ..Default::default()
    };
    let server = ModelServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .unwrap();
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": true})
            .to_string();
    for _ in 0..3 {
        let sent = Instant::now();
        let events = post_sse(server.local_addr(), "/v1/chat/completions", &body).await;
        // Only bounds against the send time hold: a receive can be late, never early.
        let tokens: Vec<Instant> = events[1..11].iter().map(|e| e.at).collect();
        assert!(
            tokens[0] - sent >= Duration::from_millis(20),
            "TTFT {:?}",
            tokens[0] - sent
        );
        for (k, t) in tokens.iter().enumerate() {
            let floor = Duration::from_millis(20 + 5 * k as u64);
            assert!(*t - sent >= floor, "token {k} after {:?}", *t - sent);
        }
    }
}
