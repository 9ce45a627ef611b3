//! The `hbone` listener under load and change: many streams on one connection, flow
//! control, half-close, drain with GOAWAY, route updates and certificate rotation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eastwest_certs::{Identity, SpiffeId};
use eastwest_routes::RouteTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{metric, wait_metric, DEADLINE, TD};

use crate::support::ambient::*;

#[tokio::test]
async fn two_hundred_concurrent_streams_share_one_connection() {
    const LISTENER: &str = "hbone-200-streams";
    let a = ambient();
    let cfg = reviews_echo_config(&a, LISTENER).await;
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    // All open at once before any finishes.
    let mut streams = Vec::new();
    for _ in 0..200 {
        streams.push(outer.open(&authority).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let msg = format!("stream {i}");
            roundtrip(&mut s, msg.as_bytes()).await;
            s.shutdown().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    wait_metric(
        &proxy,
        &format!("eastwest_hbone_streams_closed_total{{listener=\"{LISTENER}\",route=\"{authority}\",result=\"routed\"}}"),
        200.0,
    )
    .await;
    // One outer connection carried them all.
    assert_eq!(
        metric(
            &proxy,
            &format!("eastwest_connections_opened_total{{listener=\"{LISTENER}\"}}")
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn eight_mib_through_one_stream_while_a_stalled_stream_blocks_nothing() {
    const LISTENER: &str = "hbone-8mib";
    let a = ambient();
    // A destination that accepts but never reads: its stream's windows fill and stay full.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (tcp, _) = stalled.accept().await.unwrap();
        // Hold it open, unread, for the test's life.
        let _ = held_tx.send(tcp).await;
        std::future::pending::<()>().await;
    });
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![
            service(
                REVIEWS,
                vec![(9080, vec![ambient_endpoint(tcp_echo().await)])],
            ),
            service(
                "stalled.bookinfo.svc.cluster.local",
                vec![(9080, vec![ambient_endpoint(stalled_addr)])],
            ),
        ],
    );
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;

    // A writer pushing far more into the stalled stream than windows and socket buffers
    // hold: it blocks, and the gateway buffers no more than the windows allow.
    let mut slow = outer
        .open("stalled.bookinfo.svc.cluster.local:9080")
        .await
        .unwrap();
    let _held = held_rx.recv().await.unwrap();
    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pushing = pushed.clone();
    let stalled_writer = tokio::spawn(async move {
        let chunk = vec![7u8; 256 * 1024];
        for _ in 0..256 {
            slow.write_all(&chunk).await.unwrap();
            pushing.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });

    // 8 MiB through another stream on the same connection, both ways, byte for byte.
    let mut fast = outer.open(&format!("{REVIEWS}:9080")).await.unwrap();
    let data: Bytes = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut fast);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::with_capacity(8 * 1024 * 1024);
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("8 MiB did not get through next to a stalled stream");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");
    // Meanwhile the stalled stream still waits for window: its 64 MiB never got through.
    assert!(!stalled_writer.is_finished());
    let pushed = pushed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        pushed < 32 * 1024 * 1024,
        "the gateway buffered {pushed} bytes"
    );
    stalled_writer.abort();
}

/// Each side's end passes as a half-close while the other direction keeps flowing.
#[tokio::test]
async fn half_close_passes_both_ways() {
    const LISTENER: &str = "hbone-half-close";
    let a = ambient();
    // Reads to EOF, then answers with what it got, then closes: sees the client's FIN.
    let (reads_first, mut got_rx) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    s.write_all(format!("got {}", got.len()).as_bytes())
                        .await
                        .unwrap();
                    s.shutdown().await.unwrap();
                    let _ = tx.send(got).await;
                });
            }
        });
        (addr, rx)
    };
    // Says goodbye and closes its sending side first, then still reads everything.
    let (closes_first, mut later_rx) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    s.write_all(b"bye").await.unwrap();
                    s.shutdown().await.unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    let _ = tx.send(got).await;
                });
            }
        });
        (addr, rx)
    };
    let cfg = hbone_config(
        &a,
        LISTENER,
        vec![
            service(
                "reads.bookinfo.svc.cluster.local",
                vec![(1, vec![ambient_endpoint(reads_first)])],
            ),
            service(
                "closes.bookinfo.svc.cluster.local",
                vec![(1, vec![ambient_endpoint(closes_first)])],
            ),
        ],
    );
    let (_proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;

    // END_STREAM -> FIN: the destination reads to EOF, and its answer still comes back.
    let mut s = outer
        .open("reads.bookinfo.svc.cluster.local:1")
        .await
        .unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 7");
    assert_eq!(got_rx.recv().await.unwrap(), b"request");

    // FIN -> END_STREAM: the client reads EOF, and what it sends after still arrives.
    let mut s = outer
        .open("closes.bookinfo.svc.cluster.local:1")
        .await
        .unwrap();
    let mut first = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, "bye");
    s.write_all(b"after your FIN").await.unwrap();
    s.shutdown().await.unwrap();
    let later = tokio::time::timeout(DEADLINE, later_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(later, b"after your FIN");
}

/// The drain: GOAWAY refuses new streams on the open connection, while a stream open before
/// keeps flowing; the drain ends as soon as that stream does.
#[tokio::test]
async fn drain_sends_goaway_and_open_streams_keep_flowing() {
    const LISTENER: &str = "hbone-drain";
    let a = ambient();
    let mut cfg = reviews_echo_config(&a, LISTENER).await;
    cfg.drain_accept_period = Duration::ZERO;
    cfg.drain_period = Duration::from_secs(60);
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    let mut open = outer.open(&authority).await.unwrap();
    roundtrip(&mut open, b"before").await;

    let draining = tokio::spawn(proxy.clone().shutdown());
    // GOAWAY reaches the client: new streams on this connection are refused.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match outer.open(&authority).await {
            Err(e) => {
                assert_eq!(e.status(), None, "refused by GOAWAY, not a status: {e}");
                break;
            }
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "no GOAWAY");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    for msg in [&b"during the drain"[..], b"still"] {
        roundtrip(&mut open, msg).await;
    }
    assert!(
        !draining.is_finished(),
        "the drain waits for the open stream"
    );
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(DEADLINE, draining)
        .await
        .expect("the drain ended when the last stream did, not at drain_period")
        .unwrap();
}

/// A route table without the service refuses new streams and leaves open ones alone.
#[tokio::test]
async fn route_updates_never_cut_established_streams() {
    const LISTENER: &str = "hbone-route-update";
    let a = ambient();
    let cfg = reviews_echo_config(&a, LISTENER).await;
    let (proxy, gw) = start(cfg).await;
    let outer = outer(gw, &a.source).await;
    let authority = format!("{REVIEWS}:9080");
    let mut open = outer.open(&authority).await.unwrap();
    roundtrip(&mut open, b"before").await;
    proxy
        .apply_routes(RouteTable {
            version: 2,
            ..Default::default()
        })
        .unwrap();
    let err = outer.open(&authority).await.err().unwrap();
    assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    roundtrip(&mut open, b"after the service left the table").await;
}

/// The gateway certificate a new TLS handshake with the gateway sees (its leaf).
async fn served_gateway_leaf(gw: SocketAddr, client: &Identity) -> Vec<u8> {
    let tcp = TcpStream::connect(gw).await.unwrap();
    let tls = tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(h2_client_tls(client)).connect(no_sni(), tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotating_the_gateway_certificate_files_under_load_drops_no_stream() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const LISTENER: &str = "hbone-rotation";
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 10;
    /// Round trips each stream makes after the new certificate is seen.
    const AFTER: usize = 3;
    let a = ambient();
    let cfg = reviews_echo_config(&a, LISTENER).await;
    let (proxy, gw) = start(cfg).await;
    let authority = format!("{REVIEWS}:9080");
    let old_leaf = served_gateway_leaf(gw, &a.source).await;

    // Load: streams on several outer connections, each echoing until it has gone on for
    // AFTER round trips past the rotation.
    let rotated = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = Vec::new();
    for c in 0..CONNECTIONS {
        let client = outer(gw, &a.source).await;
        for s in 0..STREAMS {
            let mut stream = client.open(&authority).await.unwrap();
            let rotated = rotated.clone();
            let (first_done, first_rx) = tokio::sync::oneshot::channel();
            started.push(first_rx);
            tasks.spawn(async move {
                let msg = format!("connection {c} stream {s}");
                roundtrip(&mut stream, msg.as_bytes()).await;
                let _ = first_done.send(());
                let mut after = 0;
                let mut pace = tokio::time::interval(Duration::from_millis(25));
                // Bounded: a stream that never sees the rotation fails on the deadline below.
                for _ in 0..100_000 {
                    pace.tick().await;
                    roundtrip(&mut stream, msg.as_bytes()).await;
                    if rotated.load(Ordering::SeqCst) {
                        after += 1;
                        if after == AFTER {
                            break;
                        }
                    }
                }
                stream.shutdown().await.unwrap();
            });
        }
    }
    for rx in started {
        rx.await.unwrap();
    }

    // Replace the files (key first, then the chain, as a naive copy would) while they flow.
    let new = a
        .mesh
        .workload(
            "east",
            &SpiffeId::workload(TD, "istio-system", "istio-eastwestgateway"),
        )
        .unwrap();
    std::fs::write(&a.gateway_files.key, new.key_pem()).unwrap();
    std::fs::write(&a.gateway_files.cert_chain, new.chain_pem()).unwrap();
    let new_leaf = new.chain_der()[0].to_vec();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leaf = served_gateway_leaf(gw, &a.source).await;
        if leaf == new_leaf {
            break;
        }
        assert_eq!(leaf, old_leaf, "a handshake saw neither certificate");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rotated.store(true, Ordering::SeqCst);

    // A new outer connection, on the new certificate, carries streams too.
    let mut fresh = outer(gw, &a.source).await.open(&authority).await.unwrap();
    roundtrip(&mut fresh, b"after the rotation").await;
    fresh.shutdown().await.unwrap();

    let all = tokio::time::timeout(3 * DEADLINE, async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
    all.await.expect("streams kept flowing past the rotation");
    let total = (CONNECTIONS * STREAMS + 1) as f64;
    wait_metric(
        &proxy,
        &format!("eastwest_hbone_streams_closed_total{{listener=\"{LISTENER}\",route=\"{authority}\",result=\"routed\"}}"),
        total,
    )
    .await;
    let (_, body) = crate::support::admin_get(&proxy, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["identity"]["renewals"], 1);
    assert!(dump["identity"]["last_error"].is_null(), "{body}");
}

/// On an `hbone` listener `eastwest_connections_*` count outer connections, opened and closed
/// alike (opened - closed is what is open, as on 15443), and CONNECT streams have a pair of
/// series of their own, routed or refused.
#[tokio::test]
async fn connections_count_outer_connections_and_streams_count_streams() {
    const LISTENER: &str = "hbone-counting";
    let a = ambient();
    let cfg = reviews_echo_config(&a, LISTENER).await;
    let (proxy, gw) = start(cfg).await;
    let authority = format!("{REVIEWS}:9080");
    for _ in 0..2 {
        let outer = outer(gw, &a.source).await;
        for i in 0..3 {
            let mut s = outer.open(&authority).await.unwrap();
            roundtrip(&mut s, format!("stream {i}").as_bytes()).await;
            s.shutdown().await.unwrap();
        }
        let refused = outer.open("nope.bookinfo.svc.cluster.local:9080").await;
        assert!(refused.is_err(), "an unknown service was routed");
        // The client closes the outer connection once its last handle is gone.
    }
    let on_listener = |rest: &str| format!("{{listener=\"{LISTENER}\"{rest}}}");
    wait_metric(
        &proxy,
        &format!(
            "eastwest_connections_closed_total{}",
            on_listener(",route=\"\",result=\"served\"")
        ),
        2.0,
    )
    .await;
    wait_metric(
        &proxy,
        &format!(
            "eastwest_hbone_streams_closed_total{}",
            on_listener(&format!(",route=\"{authority}\",result=\"routed\""))
        ),
        6.0,
    )
    .await;
    let (_, body) = crate::support::admin_get(&proxy, "/metrics").await;
    // Every series of a family on this listener, summed.
    let total = |family: &str| -> f64 {
        let prefix = format!("{family}{{listener=\"{LISTENER}\"");
        body.lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(total("eastwest_connections_opened_total"), 2.0, "{body}");
    assert_eq!(total("eastwest_connections_closed_total"), 2.0, "{body}");
    assert_eq!(total("eastwest_connections_active"), 0.0, "{body}");
    assert_eq!(total("eastwest_hbone_streams_opened_total"), 8.0, "{body}");
    assert_eq!(total("eastwest_hbone_streams_closed_total"), 8.0, "{body}");
    assert_eq!(
        metric(
            &proxy,
            &format!(
                "eastwest_hbone_streams_closed_total{}",
                on_listener(",route=\"\",result=\"unknown_route\"")
            )
        )
        .await,
        2.0
    );
}
