//! The binary as a user runs it.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eastwest-proxy"))
}

/// Writes `yaml` to a file and runs `--check` on it; returns the output and the file's path.
fn check(yaml: &str) -> (std::process::Output, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = proxy()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    (out, path.display().to_string(), dir)
}

#[test]
fn check_accepts_a_good_file() {
    let (out, _, _dir) = check("listeners:\n  - name: tls\n    address: 0.0.0.0:15443\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listener, 0 services)"));
}

#[test]
fn check_counts_in_singular_and_plural() {
    let service = |name: &str| {
        format!("    - hostname: {name}.demo.svc.cluster.local\n      ports: [{{port: 8000, endpoints: [{{address: 10.0.0.7:8000}}]}}]\n")
    };
    let listeners = "listeners:\n  - {name: a, address: 0.0.0.0:15443}\n  - {name: b, address: 0.0.0.0:15444}\n";
    let (out, _, _dir) = check(&format!(
        "{listeners}routes:\n  services:\n{}",
        service("one")
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (2 listeners, 1 service)"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let two = format!("{}{}", service("one"), service("two"));
    let (out, _, _dir) = check(&format!("{listeners}routes:\n  services:\n{two}"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 listeners, 2 services)"));
}

/// The README's quick-start config with a typo gives exactly the error the README shows.
#[test]
fn the_readme_example_error_is_what_check_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let quick_start = &readme[readme.find("## Gateway quick start").unwrap()..];
    let yaml = quick_start
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(yaml, _)| yaml)
        .unwrap();
    let shown = quick_start
        .split_once("Config errors name the file, line, column and field\n(`")
        .and_then(|(_, rest)| rest.split_once("...`)"))
        .map(|(error, _)| error.replace("\\`", "`"))
        .expect("the README's example error");
    let dir = tempfile::tempdir().unwrap();
    let typo = yaml.replacen("    mode: sni", "    mdoe: sni", 1);
    assert_ne!(typo, yaml, "the quick start has no `mode: sni` to misspell");
    std::fs::write(dir.path().join("gateway.yaml"), typo).unwrap();
    let out = proxy()
        .current_dir(dir.path())
        .args(["--config", "gateway.yaml", "--check"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        printed.starts_with(&shown),
        "README shows:\n{shown}\nthe binary prints:\n{printed}"
    );
}

#[test]
fn version_names_the_commit() {
    let out = proxy().arg("--version").output().unwrap();
    assert!(out.status.success());
    let version = String::from_utf8(out.stdout).unwrap();
    let commit = version
        .strip_prefix(concat!(
            "eastwest-proxy ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{version:?}"));
    assert!(
        commit == "unknown" || commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{version:?}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "-o default eastwest-proxy"),
        ("zsh", "#compdef eastwest-proxy"),
        ("fish", "complete -c eastwest-proxy"),
    ] {
        let out = proxy().args(["completions", shell]).output().unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains(marker) && script.contains("tls-ca"),
            "{shell}:\n{script}"
        );
    }
}

#[test]
fn check_names_file_line_and_field() {
    let (out, path, _dir) =
        check("listeners:\n  - name: tls\n    address: 0.0.0.0:15443\n    mode: passthru\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{path}:4:"))
            && err.contains("listeners[0].mode")
            && err.contains("passthru"),
        "{err}"
    );
}

#[test]
fn every_problem_is_its_own_error_line() {
    let (out, path, _dir) = check(
        "listeners:\n  - {name: tls, address: 0.0.0.0:15443}\n  - {name: tls, address: 0.0.0.0:15443}\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    for line in lines {
        assert!(line.starts_with(&format!("error: {path}:3:")), "{err}");
    }
}

#[test]
fn missing_file_is_named() {
    let out = proxy()
        .args(["--config", "/nonexistent/gw.yaml", "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: /nonexistent/gw.yaml: cannot read: No such file or directory (os error 2)\n"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some((
        out.get(9..12)?.parse().ok()?,
        out.split_once("\r\n\r\n")?.1.to_string(),
    ))
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after 20 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn config_dump(admin: u16) -> serde_json::Value {
    let (_, dump) = http_get(admin, "/config_dump").unwrap();
    serde_json::from_str(&dump).unwrap()
}

fn signal(proxy: &Running, name: &str) {
    let sent = Command::new("kill")
        .args([name, &proxy.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Writes `gw.yaml` in `dir`: the admin server on a free port, one listener on any port.
/// Returns its path, the admin port and the text (for tests that extend it).
fn base_config(dir: &std::path::Path) -> (std::path::PathBuf, u16, String) {
    let admin = free_port();
    let base = format!(
        "admin: {{address: 127.0.0.1:{admin}}}\nlisteners:\n  - name: tls\n    address: 127.0.0.1:0\n"
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

/// Kills the child when the test ends, pass or fail.
struct Running(std::process::Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
        matches!(http_get(admin, "/healthz/ready"), Some((200, _)))
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
        let (_, metrics) = http_get(admin, "/metrics").unwrap();
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
        "admin: {address: 127.0.0.1:0}\nlisteners:\n  - name: tls\n    address: 127.0.0.1:0\n",
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
        matches!(http_get(admin, "/healthz/ready"), Some((200, _)))
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
    let (_, metrics) = http_get(admin, "/metrics").unwrap();
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
        "admin: {address: 127.0.0.1:0}\nlisteners:\n  - name: tls\n    address: 127.0.0.1:0\n",
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
        matches!(http_get(admin, "/healthz/ready"), Some((200, _)))
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
        let (_, metrics) = http_get(admin, "/metrics").unwrap();
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
        http_get(admin, "/healthz/ready").is_some()
    });
    assert_eq!(http_get(admin, "/healthz/ready").unwrap().0, 503);
}
