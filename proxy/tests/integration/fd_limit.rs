//! The proxy at its open-file limit, run under `prlimit --nofile`: a client beyond what it
//! can hold is closed at once (EOF) instead of hanging in the accept queue, and the status
//! port still answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use eastwest_proxy::fd_limit::RESERVED;

use crate::support::{free_port, http_get_blocking, Running};

struct Limited {
    _process: Running,
    listener: u16,
    status: u16,
    metrics: u16,
}

/// The proxy with soft and hard open-file limits of `nofile`, `extra` added to its listener.
fn start_limited(dir: &std::path::Path, nofile: u64, extra: &str) -> Limited {
    let (listener, status, metrics) = (free_port(), free_port(), free_port());
    let config = dir.join("gw.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{status_address: 127.0.0.1:{status}, metrics_address: 127.0.0.1:{metrics}, debug_address: 127.0.0.1:0}}\n\
             listeners:\n  - name: tls\n    address: 127.0.0.1:{listener}\n    hello_timeout: 60s\n{extra}"
        ),
    )
    .unwrap();
    let child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_eastwest-proxy"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) is needed");
    let limited = Limited {
        _process: Running(child),
        listener,
        status,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get_blocking(limited.status, "/healthz/ready").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the proxy never turned ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    limited
}

/// A client that has sent the first byte of a TLS record (so deferred accept hands it over)
/// and waits for the rest of its hello.
fn waiting_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"\x16").unwrap();
    s
}

/// True when the proxy closes `s` within 10 s; false if it keeps it open that long.
fn closed_promptly(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        Ok(_) => false,
    }
}

fn overloaded(proxy: &Limited) -> f64 {
    let (_, body) = http_get_blocking(proxy.metrics, "/metrics").unwrap();
    let series =
        "eastwest_connections_closed_total{listener=\"tls\",route=\"\",result=\"overloaded\"} ";
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// With max_connections left to its default, the limit leaves room for the admin servers:
/// clients beyond it are refused at once and probes still answer.
#[test]
fn at_the_derived_limit_new_clients_get_eof_and_the_status_port_answers() {
    let dir = tempfile::tempdir().unwrap();
    let room = 20;
    let proxy = start_limited(dir.path(), RESERVED + 2 * room, "");
    let held: Vec<TcpStream> = (0..room).map(|_| waiting_client(proxy.listener)).collect();
    for _ in 0..5 {
        assert!(
            closed_promptly(waiting_client(proxy.listener)),
            "an over-limit client was left hanging"
        );
    }
    assert_eq!(
        http_get_blocking(proxy.status, "/healthz/ready").map(|r| r.0),
        Some(200)
    );
    assert!(overloaded(&proxy) >= 5.0);
    drop(held);
}

/// With a max_connections the descriptors cannot back, accept itself fails (EMFILE): the
/// waiting client is still taken, with the reserved descriptor, and closed.
#[test]
fn out_of_descriptors_a_waiting_client_is_closed_not_left_in_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let nofile = 300;
    let proxy = start_limited(dir.path(), nofile, "    max_connections: 100000\n");
    // More clients than the process has descriptors: the last ones meet EMFILE.
    let held: Vec<TcpStream> = (0..nofile)
        .map(|_| waiting_client(proxy.listener))
        .collect();
    assert!(
        closed_promptly(waiting_client(proxy.listener)),
        "a client was left in the accept queue"
    );
    assert_eq!(
        http_get_blocking(proxy.status, "/healthz/ready").map(|r| r.0),
        Some(200)
    );
    assert!(overloaded(&proxy) >= 1.0);
    drop(held);
}

/// An inherited soft limit of 512 (shells often hand out 1024) is raised to the hard limit,
/// and the log says so.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        "admin: {status_address: 127.0.0.1:0, metrics_address: 127.0.0.1:0, debug_address: 127.0.0.1:0}\n\
         listeners:\n  - name: tls\n    address: 127.0.0.1:0\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let child = Command::new("prlimit")
        .args(["--nofile=512:4096", "--"])
        .arg(env!("CARGO_BIN_EXE_eastwest-proxy"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _proxy = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("open-file limit")) {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no open-file limit line in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        line.contains("soft_before=512")
            && line.contains("soft=4096")
            && line.contains("hard=4096"),
        "{line}"
    );
}
