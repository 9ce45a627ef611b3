//! The binary running as a user runs it: reloads by file and SIGHUP, signals, logs and the
//! route cache.

use std::process::Command;

use crate::cli::proxy;
use crate::support::{free_port, http_get_blocking, Running};

/// Polls `cond` every 20 ms until it holds; panics with `what` after 20 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The ports of the three admin servers, each fixed before the proxy starts.
#[derive(Clone, Copy)]
struct Admin {
    status: u16,
    metrics: u16,
    debug: u16,
}

impl Admin {
    fn free() -> Admin {
        Admin {
            status: free_port(),
            metrics: free_port(),
            debug: free_port(),
        }
    }

    fn yaml(&self) -> String {
        format!(
            "admin: {{status_address: 127.0.0.1:{}, metrics_address: 127.0.0.1:{}, debug_address: 127.0.0.1:{}}}\n",
            self.status, self.metrics, self.debug
        )
    }

    /// GET `path` from the server that serves it.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let port = match path {
            "/healthz/ready" => self.status,
            "/metrics" => self.metrics,
            _ => self.debug,
        };
        http_get_blocking(port, path)
    }
}

/// All three admin servers on loopback, any free port (the defaults would collide).
const ANY_ADMIN: &str =
    "admin: {status_address: 127.0.0.1:0, metrics_address: 127.0.0.1:0, debug_address: 127.0.0.1:0}\n";

fn config_dump(admin: Admin) -> serde_json::Value {
    let (_, dump) = admin.get("/config_dump").unwrap();
    serde_json::from_str(&dump).unwrap()
}

fn signal(proxy: &Running, name: &str) {
    let sent = Command::new("kill")
        .args([name, &proxy.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Writes `gw.yaml` in `dir`: the admin servers on free ports, one listener on any port.
/// Returns its path, the admin ports and the text (for tests that extend it).
fn base_config(dir: &std::path::Path) -> (std::path::PathBuf, Admin, String) {
    let admin = Admin::free();
    let base = format!(
        "{}listeners:\n  - name: tls\n    address: 127.0.0.1:0\n",
        admin.yaml()
    );
    let config = dir.join("gw.yaml");
    std::fs::write(&config, &base).unwrap();
    (config, admin, base)
}

/// The proxy serving `config`, with `args` added and its log discarded.
fn start(config: &std::path::Path, args: &[std::ffi::OsString]) -> Running {
    Running(
        proxy()
            .arg("--config")
            .arg(config)
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The arguments that subscribe to a control that is down (nothing listens on its port),
/// with `cache` as the route cache.
fn down_control_with_cache(cache: &std::path::Path) -> Vec<std::ffi::OsString> {
    let control = format!("http://127.0.0.1:{}", free_port());
    [
        "--control",
        &control,
        "--cluster",
        "ash",
        "--network",
        "network2",
        "--route-cache",
    ]
    .iter()
    .map(Into::into)
    .chain([cache.as_os_str().to_owned()])
    .collect()
}

#[test]
fn restart_while_control_is_down_routes_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, _) = base_config(dir.path());
    let cache = dir.path().join("routes.json");
    std::fs::write(
        &cache,
        r#"{"version": 42, "services": [{"hostname": "sglang.demo.svc.cluster.local",
            "ports": [{"port": 8000, "endpoints": [{"address": "10.0.0.9:8000"}]}]}]}"#,
    )
    .unwrap();
    let _proxy = start(&config, &down_control_with_cache(&cache));
    wait_until("ready from the cache", || {
        matches!(admin.get("/healthz/ready"), Some((200, _)))
    });
    let dump = config_dump(admin);
    assert_eq!(dump["route_table_version"], 42);
    assert_eq!(dump["routes_source"], "control");
    assert_eq!(
        dump["config"]["routes"]["services"][0]["hostname"],
        "sglang.demo.svc.cluster.local"
    );
    // The failed connection attempts to control are counted and described.
    wait_until("control's metrics described", || {
        let (_, metrics) = admin.get("/metrics").unwrap();
        metrics.contains("# HELP eastwest_control_stream_errors_total")
            && metrics.contains("# HELP eastwest_control_connected")
    });
}

#[test]
fn https_control_without_an_identity_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        format!("{ANY_ADMIN}listeners:\n  - name: tls\n    address: 127.0.0.1:0\n"),
    )
    .unwrap();
    let with_https_control = || {
        let mut cmd = proxy();
        cmd.arg("--config").arg(&path).args([
            "--control",
            "https://control:15010",
            "--cluster",
            "ash",
            "--network",
            "n2",
        ]);
        cmd
    };
    let out = with_https_control().output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --tls-cert"));

    // A missing identity file: the cause once, in the one error style.
    let out = with_https_control()
        .args([
            "--tls-cert",
            "/nonexistent/cert-chain.pem",
            "--tls-key",
            "/nonexistent/key.pem",
            "--tls-ca",
            "/nonexistent/root-cert.pem",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.starts_with("error: ")
            && err.contains("/nonexistent/")
            && err.matches("No such file").count() == 1,
        "{err}"
    );
}

/// A config reached through a symlink into another directory changes where the file watcher
/// does not look (it watches the link's directory); SIGHUP is how an operator applies it.
#[test]
fn sighup_applies_a_change_the_file_watcher_cannot_see() {
    let watched = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (real, admin, base) = base_config(elsewhere.path());
    let config = watched.path().join("gw.yaml");
    std::os::unix::fs::symlink(&real, &config).unwrap();
    let proxy = start(&config, &[]);
    wait_until("ready", || {
        matches!(admin.get("/healthz/ready"), Some((200, _)))
    });
    std::fs::write(
        &real,
        format!("{base}routes:\n  services:\n    - hostname: added.ns.svc.cluster.local\n      ports: [{{port: 80, endpoints: [{{address: 10.0.0.1:80}}]}}]\n"),
    )
    .unwrap();
    let service = |dump: &serde_json::Value| {
        dump["config"]["routes"]["services"][0]["hostname"]
            .as_str()
            .map(str::to_string)
    };
    // Signalled until applied: a SIGHUP that lands before the reload task runs is dropped.
    wait_until("SIGHUP to apply the change", || {
        signal(&proxy, "-HUP");
        service(&config_dump(admin)).as_deref() == Some("added.ns.svc.cluster.local")
    });
    let (_, metrics) = admin.get("/metrics").unwrap();
    assert!(
        metrics.contains("eastwest_config_reloads_total 1"),
        "{metrics}"
    );
}

/// What an operator reads in `kubectl logs`: plain lines without terminal colour codes, and
/// on SIGTERM a drain that ends in exit status 0.
#[test]
fn logs_into_a_pipe_are_plain_text_and_sigterm_exits_zero() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        // No accept period: this test is about the drain ending in exit status 0.
        format!("{ANY_ADMIN}drain_accept_period: 0s\nlisteners:\n  - name: tls\n    address: 127.0.0.1:0\n"),
    )
    .unwrap();
    let mut proxy = Running(
        proxy()
            .arg("--config")
            .arg(&config)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = proxy.0.stderr.take().unwrap();
    let (lines, log_lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let mut read_until = |what: &str| loop {
        let line = log_lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no {what:?} line in:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if line.contains(what) {
            return log.clone();
        }
    };
    read_until("listening");
    signal(&proxy, "-TERM");
    let log = read_until("drained");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after drain");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}\n{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in:\n{log}");
}

/// A reload that failed for a reason outside the file (its new port still taken) is applied
/// by the next SIGHUP once that reason is gone, though the file has not changed since.
#[test]
fn sighup_retries_a_reload_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (config, admin, base) = base_config(dir.path());
    let proxy = start(&config, &[]);
    wait_until("ready", || {
        matches!(admin.get("/healthz/ready"), Some((200, _)))
    });
    // Written aside and renamed, so the watcher sees one whole change.
    let next = dir.path().join("next.yaml");
    std::fs::write(
        &next,
        format!("{base}  - name: extra\n    address: 127.0.0.1:{port}\n"),
    )
    .unwrap();
    std::fs::rename(&next, &config).unwrap();
    wait_until("the reload to fail on the taken port", || {
        let (_, metrics) = admin.get("/metrics").unwrap();
        metrics.contains("eastwest_config_reload_failures_total 1")
    });
    drop(taken);
    let listeners = |dump: serde_json::Value| dump["config"]["listeners"].as_array().map(Vec::len);
    wait_until("SIGHUP to apply the unchanged file", || {
        signal(&proxy, "-HUP");
        listeners(config_dump(admin)) == Some(2)
    });
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// A route cache that can't be used is ignored: the gateway starts, not ready until control
/// answers, instead of refusing to start.
#[test]
fn a_corrupt_route_cache_does_not_keep_the_gateway_down() {
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, _) = base_config(dir.path());
    let cache = dir.path().join("routes.json");
    std::fs::write(&cache, b"{\"version\": 42, \"servi").unwrap();
    let mut proxy = start(&config, &down_control_with_cache(&cache));
    wait_until("the admin server to answer", || {
        assert!(proxy.0.try_wait().unwrap().is_none(), "the proxy exited");
        admin.get("/healthz/ready").is_some()
    });
    assert_eq!(admin.get("/healthz/ready").unwrap().0, 503);
}

/// The proxy serving `config` with debug logs into `log`.
fn start_logged(config: &std::path::Path, log: &std::path::Path) -> Running {
    Running(
        proxy()
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "eastwest_proxy=debug")
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Lines of the log at `log` containing `what`.
fn log_lines(log: &std::path::Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

fn metric(admin: Admin, series: &str) -> Option<f64> {
    let (_, body) = admin.get("/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn with_service(base: &str, host: &str) -> String {
    format!("{base}routes:\n  services:\n    - hostname: {host}\n      ports: [{{port: 80, endpoints: [{{address: 10.0.0.1:80}}]}}]\n")
}

fn first_service(admin: Admin) -> Option<String> {
    config_dump(admin)["config"]["routes"]["services"][0]["hostname"]
        .as_str()
        .map(str::to_string)
}

/// A bad file is one error, however many events its writing makes and however many SIGHUPs
/// follow; /config_dump says what and when until a good file replaces it. The reload
/// counters are there at 0 before anything happened, for rate() and alerts.
#[test]
fn a_bad_config_is_reported_once_and_shown_in_config_dump() {
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, base) = base_config(dir.path());
    let log = dir.path().join("log");
    let proxy = start_logged(&config, &log);
    wait_until("ready", || {
        matches!(admin.get("/healthz/ready"), Some((200, _)))
    });
    for counter in [
        "eastwest_config_reloads_total",
        "eastwest_config_reload_failures_total",
        "eastwest_route_tables_rejected_total",
    ] {
        assert_eq!(metric(admin, counter), Some(0.0), "{counter} at startup");
    }
    assert!(config_dump(admin)["last_reload_error"].is_null());

    // Written in place: create, modify and close events for one content.
    std::fs::write(&config, format!("{base}  - name: bad\n    address: nope\n")).unwrap();
    wait_until("the failure to be counted", || {
        metric(admin, "eastwest_config_reload_failures_total") == Some(1.0)
    });
    let dump = config_dump(admin);
    let error = dump["last_reload_error"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("listeners[1].address"), "{dump}");
    let at = dump["last_reload_error"]["at"].as_str().unwrap_or_default();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );

    // Two SIGHUPs read the same content again: no new error.
    for seen in 1..=2 {
        signal(&proxy, "-HUP");
        wait_until("the SIGHUP to be handled", || {
            log_lines(&log, "config still refused for the same reason") >= seen
        });
    }
    assert_eq!(log_lines(&log, "config reload refused"), 1);

    let next = dir.path().join("next.yaml");
    std::fs::write(&next, with_service(&base, "good.ns.svc.cluster.local")).unwrap();
    std::fs::rename(&next, &config).unwrap();
    wait_until("the good file to apply", || {
        first_service(admin).as_deref() == Some("good.ns.svc.cluster.local")
    });
    assert_eq!(
        metric(admin, "eastwest_config_reload_failures_total"),
        Some(1.0)
    );
    assert!(config_dump(admin)["last_reload_error"].is_null());
}

/// A file caught half-written is read again before it is called bad; a removed file is a
/// warning and the config in force keeps serving.
#[test]
fn a_half_written_file_is_not_an_error_and_a_removed_one_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, base) = base_config(dir.path());
    let log = dir.path().join("log");
    let _proxy = start_logged(&config, &log);
    wait_until("ready", || {
        matches!(admin.get("/healthz/ready"), Some((200, _)))
    });
    let whole = with_service(&base, "whole.ns.svc.cluster.local");
    // A slow writer: the first part, a pause the watcher's settle delay does not cover, the rest.
    let cut = whole.find("10.0.0.1").unwrap() + 4;
    std::fs::write(&config, &whole[..cut]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    std::fs::write(&config, &whole).unwrap();
    wait_until("the whole file to apply", || {
        first_service(admin).as_deref() == Some("whole.ns.svc.cluster.local")
    });
    assert_eq!(
        metric(admin, "eastwest_config_reload_failures_total"),
        Some(0.0)
    );

    std::fs::remove_file(&config).unwrap();
    wait_until("a warning about the removed file", || {
        log_lines(&log, "config file removed or unreadable") == 1
    });
    assert_eq!(admin.get("/healthz/ready").map(|r| r.0), Some(200));
    assert_eq!(
        metric(admin, "eastwest_config_reload_failures_total"),
        Some(0.0)
    );
    assert_eq!(
        first_service(admin).as_deref(),
        Some("whole.ns.svc.cluster.local")
    );
}
