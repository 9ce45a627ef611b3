//! The command line as a user meets it: `--check`, errors, `--version`, completions.
//! The running binary (reloads, signals, the route cache) is in `running.rs`.

use std::process::Command;

pub(crate) fn proxy() -> Command {
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
