//! End to end through a real eastwest-proxy: real sockets, real rustls on both ends.

use std::time::Duration;

use crate::support::*;
use eastwest_proxy::Proxy;
use eastwest_routes::{ListenerConfig, ListenerMode, SniPattern, SniRule, Subset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn istio_mtls_passes_through_untouched() {
    let pki = pki();
    let backend = tls_echo_backend("ash-sglang", &pki.server).await;
    let proxy = Proxy::start(passthrough_config(
        "e2e",
        vec![service(SGLANG, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("e2e").unwrap();

    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    // The backend saw our client certificate and we negotiated ALPN with it: the handshake
    // went end to end, so the gateway passed the bytes untouched.
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    assert_eq!(
        greeting(&mut tls).await,
        "ash-sglang spiffe://cluster.local/ns/demo/sa/open-webui"
    );
    tls.write_all(b"hello over the mesh").await.unwrap();
    let mut buf = [0u8; 19];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello over the mesh");
    drop(tls);

    let route = format!("{SGLANG}:8000");
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"e2e\",route=\"{route}\",result=\"routed\"}}"),
        1.0,
    )
    .await;
    assert!(
        metric(
            &proxy,
            &format!("eastwest_bytes_total{{route=\"{route}\",direction=\"to_downstream\"}}")
        )
        .await
            > 19.0
    );
}

#[tokio::test]
async fn subsets_select_endpoints_by_label() {
    let pki = pki();
    let v1 = tls_echo_backend("v1", &pki.server).await;
    let v2 = tls_echo_backend("v2", &pki.server).await;
    let host = "helloworld.sample.svc.cluster.local";
    let mut svc = service(
        host,
        5000,
        &[(v1, &[("version", "v1")]), (v2, &[("version", "v2")])],
    );
    svc.subsets = vec![Subset {
        name: "v2".into(),
        labels: [("version".to_string(), "v2".to_string())].into(),
    }];
    let proxy = Proxy::start(passthrough_config("subsets", vec![svc]))
        .await
        .unwrap();
    let gw = proxy.listener_addr("subsets").unwrap();
    for _ in 0..5 {
        let mut tls = istio_connect(gw, &pki.client, &istio_sni(5000, "v2", host))
            .await
            .unwrap();
        assert!(greeting(&mut tls).await.starts_with("v2 "));
    }
    // Without a subset both versions answer.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let mut tls = istio_connect(gw, &pki.client, &istio_sni(5000, "", host))
            .await
            .unwrap();
        seen.insert(
            greeting(&mut tls)
                .await
                .split(' ')
                .next()
                .unwrap()
                .to_string(),
        );
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "only {seen:?} answered");
}

#[tokio::test]
async fn sni_listener_prefers_exact_then_longest_wildcard_then_any() {
    let (exact, mut exact_rx) = raw_backend(b"exact").await;
    let (wild, mut wild_rx) = raw_backend(b"wild").await;
    let (any, mut any_rx) = raw_backend(b"any").await;
    let mut listener = ListenerConfig::new(
        "sni-rules",
        "127.0.0.1:0".parse().unwrap(),
        ListenerMode::Sni,
    );
    let rule = |p: &str, a: std::net::SocketAddr| SniRule {
        sni: SniPattern::parse(p).unwrap(),
        upstreams: vec![a.to_string()],
    };
    listener.rules = vec![
        rule("*", any),
        rule("*.example.com", wild),
        rule("api.example.com", exact),
    ];
    let mut cfg = eastwest_routes::ProxyConfig::with_listeners(vec![listener]);
    cfg.admin = eastwest_routes::AdminConfig::loopback_any_port();
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("sni-rules").unwrap();
    let pki = pki();

    for (sni, rx, reply) in [
        ("api.example.com", &mut exact_rx, "exact"),
        ("a.b.example.com", &mut wild_rx, "wild"),
        ("istiod.istio-system.svc", &mut any_rx, "any"),
    ] {
        let hello = client_hello_bytes(&pki.client, sni);
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(&hello).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, reply.as_bytes(), "{sni}");
        assert_eq!(
            rx.recv().await.unwrap(),
            hello,
            "{sni}: bytes changed on the way"
        );
    }
}

#[tokio::test]
async fn unroutable_hellos_are_closed_and_counted() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let proxy = Proxy::start(passthrough_config(
        "refuse",
        vec![service(SGLANG, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("refuse").unwrap();

    let cases: [(&str, Vec<u8>); 5] = [
        (
            "unknown_route",
            client_hello_bytes(
                &pki.client,
                &istio_sni(8000, "", "other.demo.svc.cluster.local"),
            ),
        ),
        (
            "unknown_route",
            client_hello_bytes(&pki.client, &istio_sni(9999, "", SGLANG)),
        ),
        (
            "bad_sni",
            client_hello_bytes(&pki.client, "sglang.demo.svc.cluster.local"),
        ),
        ("no_sni", client_hello_bytes(&pki.client, "127.0.0.1")),
        ("malformed", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
    ];
    for (_, bytes) in &cases {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(closed_by_proxy(s).await);
    }
    for (result, want) in [
        ("unknown_route", 2.0),
        ("bad_sni", 1.0),
        ("no_sni", 1.0),
        ("malformed", 1.0),
    ] {
        wait_metric(
            &proxy,
            &format!("eastwest_connections_closed_total{{listener=\"refuse\",route=\"\",result=\"{result}\"}}"),
            want,
        )
        .await;
    }
    // Nothing leaked to the backend and the gateway still routes.
    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut tls).await.starts_with("b "));
}

#[tokio::test]
async fn hello_one_byte_per_write_and_across_records() {
    let pki = pki();
    let (backend, mut rx) = raw_backend(b"ok").await;
    let proxy = Proxy::start(passthrough_config(
        "trickle",
        vec![service(SGLANG, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("trickle").unwrap();
    let hello = client_hello_bytes(&pki.client, &istio_sni(8000, "", SGLANG));

    // One byte per record is legal TLS too.
    for bytes in [
        hello.clone(),
        split_records(&hello, 64),
        split_records(&hello, 1),
    ] {
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.set_nodelay(true).unwrap();
        for b in &bytes {
            s.write_all(std::slice::from_ref(b)).await.unwrap();
            s.flush().await.unwrap();
        }
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ok");
        assert_eq!(rx.recv().await.unwrap(), bytes, "bytes changed on the way");
    }
}

#[tokio::test]
async fn slow_hello_times_out_without_disturbing_others() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let mut cfg = passthrough_config("slow", vec![service(SGLANG, 8000, &[(backend, &[])])]);
    cfg.listeners[0].hello_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("slow").unwrap();

    let mut slow = TcpStream::connect(gw).await.unwrap();
    slow.write_all(&[22, 3, 1]).await.unwrap();
    // Meanwhile a normal client is served.
    let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut tls).await.starts_with("b "));
    assert!(closed_by_proxy(slow).await);
    wait_metric(
        &proxy,
        "eastwest_connections_closed_total{listener=\"slow\",route=\"\",result=\"hello_timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped() {
    let pki = pki();
    let live = tls_echo_backend("live", &pki.server).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connecting is refused
    let proxy = Proxy::start(passthrough_config(
        "retry",
        vec![service(SGLANG, 8000, &[(dead, &[]), (live, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("retry").unwrap();
    let failures = format!("eastwest_upstream_connect_failures_total{{route=\"{SGLANG}:8000\"}}");
    // The balancer starts at a random endpoint: keep connecting until the dead one was tried
    // at least once (each try is a coin flip, so 64 bounds it safely). Every client is served.
    let mut dead_tried = false;
    for _ in 0..64 {
        let mut tls = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
            .await
            .unwrap();
        assert!(greeting(&mut tls).await.starts_with("live "));
        if metric(&proxy, &failures).await >= 1.0 {
            dead_tried = true;
            break;
        }
    }
    assert!(dead_tried, "the dead endpoint was never tried");
}

#[tokio::test]
async fn all_endpoints_down_is_counted_as_upstream_failed() {
    let pki = pki();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(passthrough_config(
        "down",
        vec![service(SGLANG, 8000, &[(dead, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("down").unwrap();
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&client_hello_bytes(
        &pki.client,
        &istio_sni(8000, "", SGLANG),
    ))
    .await
    .unwrap();
    assert!(closed_by_proxy(s).await);
    wait_metric(
        &proxy,
        &format!("eastwest_connections_closed_total{{listener=\"down\",route=\"{SGLANG}:8000\",result=\"upstream_failed\"}}"),
        1.0,
    )
    .await;
}

#[tokio::test]
async fn half_close_is_passed_through() {
    let pki = pki();
    let (backend, mut rx) = raw_backend(b"pong after your FIN").await;
    let proxy = Proxy::start(passthrough_config(
        "half",
        vec![service(SGLANG, 8000, &[(backend, &[])])],
    ))
    .await
    .unwrap();
    let gw = proxy.listener_addr("half").unwrap();
    let hello = client_hello_bytes(&pki.client, &istio_sni(8000, "", SGLANG));
    // The backend replies only after it sees our FIN; our read side must stay open.
    let got = half_closed_exchange(gw, &[&hello, b"ping"]).await;
    assert_eq!(got, b"pong after your FIN");
    let mut sent = hello.clone();
    sent.extend_from_slice(b"ping");
    assert_eq!(rx.recv().await.unwrap(), sent);
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_counted() {
    let pki = pki();
    let backend = tls_echo_backend("b", &pki.server).await;
    let mut cfg = passthrough_config("limit", vec![service(SGLANG, 8000, &[(backend, &[])])]);
    cfg.listeners[0].max_connections = Some(1);
    let proxy = Proxy::start(cfg).await.unwrap();
    let gw = proxy.listener_addr("limit").unwrap();
    let mut first = istio_connect(gw, &pki.client, &istio_sni(8000, "", SGLANG))
        .await
        .unwrap();
    assert!(greeting(&mut first).await.starts_with("b "));
    let second = TcpStream::connect(gw).await.unwrap();
    assert!(closed_by_proxy(second).await);
    wait_metric(
        &proxy,
        "eastwest_connections_refused_total{listener=\"limit\"}",
        1.0,
    )
    .await;
    // The first one is unaffected.
    first.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"x");
}

/// What `ss -o` shows as `timer:(keepalive,…)` for the IPv4 TCP socket `local` → `remote`:
/// the time until its next keepalive probe, if the keepalive timer runs (`tr` 2 in
/// /proc/net/tcp, `tm->when` in clock ticks of 1/100 s).
fn keepalive_timer(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<Duration> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(a) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            )
        }
        std::net::SocketAddr::V6(_) => unreachable!("the test uses 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() <= 5 || f[1] != local || f[2] != remote {
            return None;
        }
        let ticks = f[5].strip_prefix("02:")?;
        Some(Duration::from_millis(
            10 * u64::from_str_radix(ticks, 16).ok()?,
        ))
    })
}

fn keepalive_timer_running(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> bool {
    keepalive_timer(local, remote).is_some()
}

/// A client through the gateway `gw` to the raw `backend`, its hello sent; returns the client
/// and the gateway's side of the upstream connection, as the backend accepted it.
async fn relayed_connection(
    gw: std::net::SocketAddr,
    backend: &tokio::net::TcpListener,
) -> (TcpStream, TcpStream, std::net::SocketAddr) {
    let pki = pki();
    let mut client = TcpStream::connect(gw).await.unwrap();
    client
        .write_all(&client_hello_bytes(
            &pki.client,
            &istio_sni(8000, "", SGLANG),
        ))
        .await
        .unwrap();
    let (upstream, gateway_side) = backend.accept().await.unwrap();
    (client, upstream, gateway_side)
}

/// A gateway with `tcp_keepalive` routing SGLANG:8000 to a raw backend that says nothing; also
/// its config, for reloads.
async fn keepalive_gateway(
    tcp_keepalive: Duration,
) -> (
    tokio::net::TcpListener,
    eastwest_routes::ProxyConfig,
    Proxy,
    std::net::SocketAddr,
) {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let mut cfg = passthrough_config("ka", vec![service(SGLANG, 8000, &[(backend_addr, &[])])]);
    cfg.upstream.tcp_keepalive = tcp_keepalive;
    let proxy = Proxy::start(cfg.clone()).await.unwrap();
    let gw = proxy.listener_addr("ka").unwrap();
    (backend, cfg, proxy, gw)
}

/// A reload that changes `tcp_keepalive` reaches connections accepted afterwards on a listener
/// that keeps running (accepted sockets copy the listening socket's settings).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_reloaded_tcp_keepalive_reaches_new_connections() {
    let (backend, mut cfg, proxy, gw) = keepalive_gateway(Duration::from_secs(3600)).await;
    let (old, _old_upstream, _) = relayed_connection(gw, &backend).await;
    cfg.upstream.tcp_keepalive = Duration::from_secs(5);
    proxy.apply_config(cfg).await.unwrap();
    let (new, _new_upstream, _) = relayed_connection(gw, &backend).await;
    let probe_in = |c: &TcpStream| keepalive_timer(gw, c.local_addr().unwrap()).unwrap();
    assert!(
        probe_in(&new) <= Duration::from_secs(5),
        "new: {:?}",
        probe_in(&new)
    );
    assert!(
        probe_in(&old) > Duration::from_secs(600),
        "old: {:?}",
        probe_in(&old)
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn both_sides_of_a_quiet_connection_get_tcp_keepalive() {
    let (backend, _cfg, _proxy, gw) = keepalive_gateway(Duration::from_secs(1)).await;
    let backend_addr = backend.local_addr().unwrap();
    let (client, _upstream, gateway_side) = relayed_connection(gw, &backend).await;
    // Nothing moves from now on; within the keepalive time both of the gateway's sockets must
    // be probing their peers.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let downstream = (gw, client.local_addr().unwrap());
    let upstream = (gateway_side, backend_addr);
    while !(keepalive_timer_running(downstream.0, downstream.1)
        && keepalive_timer_running(upstream.0, upstream.1))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no keepalive timer on the gateway's sockets (downstream {}, upstream {})",
            keepalive_timer_running(downstream.0, downstream.1),
            keepalive_timer_running(upstream.0, upstream.1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
