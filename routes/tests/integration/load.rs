use eastwest_routes::{parse_proxy_config, ConfigError, ListenerMode, SniPattern};

fn problems(text: &str) -> Vec<String> {
    match parse_proxy_config(text, "gw.yaml") {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

const GOOD: &str = r#"
admin:
  address: 127.0.0.1:15021
listeners:
  - name: tls
    address: 0.0.0.0:15443
  - name: istiod
    address: 0.0.0.0:15012
    mode: sni
    rules:
      - sni: "*"
        upstreams: ["istiod.istio-system.svc:15012"]
routes:
  services:
    - hostname: helloworld.sample.svc.cluster.local
      subsets:
        - name: v2
          labels: {version: v2}
      ports:
        - port: 5000
          endpoints:
            - address: 10.0.0.7:5000
              labels: {version: v2}
"#;

#[test]
fn a_good_file_loads_with_defaults() {
    let cfg = parse_proxy_config(GOOD, "gw.yaml").unwrap();
    assert_eq!(cfg.listeners[0].mode, ListenerMode::AutoPassthrough);
    assert_eq!(cfg.listeners[0].hello_timeout.as_secs(), 10);
    assert_eq!(cfg.upstream.idle_timeout.as_secs(), 3600);
    assert_eq!(cfg.listeners[1].rules[0].sni, SniPattern::Any);
    let svc = cfg
        .routes
        .service("HELLOWORLD.sample.svc.cluster.local")
        .unwrap();
    assert!(svc.subsets[0].selects(&svc.ports[0].endpoints[0]));
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let text = GOOD.replace("    mode: sni\n", "    mdoe: sni\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("gw.yaml:9:5: field `listeners[1].mdoe`: unknown field `mdoe`"),
        "{}",
        p[0]
    );
    assert!(
        p[0].contains("listeners[1]") && p[0].contains("mdoe"),
        "{}",
        p[0]
    );
}

#[test]
fn bad_value_type_names_the_field() {
    let text = GOOD.replace("address: 0.0.0.0:15443", "address: not-an-address");
    let p = problems(&text);
    assert!(p[0].starts_with("gw.yaml:6:"), "{}", p[0]);
    assert!(p[0].contains("field `listeners[0].address`"), "{}", p[0]);
}

#[test]
fn validation_errors_are_located() {
    let text = GOOD
        .replace("address: 0.0.0.0:15012", "address: 0.0.0.0:15443")
        .replace("- name: v2", "- name: V_2");
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("gw.yaml:8:") && p[0].contains("listeners[1].address"),
        "{}",
        p[0]
    );
    assert!(
        p[1].starts_with("gw.yaml:17:") && p[1].contains("routes.services[0].subsets[0].name"),
        "{}",
        p[1]
    );
}

#[test]
fn waypoint_endpoints_load_and_are_validated_like_endpoints() {
    let with_waypoint = GOOD.replace(
        "              labels: {version: v2}\n",
        "              labels: {version: v2}\n          waypoint:\n            - address: 10.0.9.1:15008\n              hbone_port: 15008\n",
    );
    let cfg = parse_proxy_config(&with_waypoint, "gw.yaml").unwrap();
    let port = &cfg.routes.services[0].ports[0];
    assert_eq!(port.waypoint[0].address.to_string(), "10.0.9.1:15008");
    assert_eq!(port.waypoint[0].hbone_port, Some(15008));

    let twice = with_waypoint.replace(
        "              hbone_port: 15008\n",
        "              hbone_port: 15008\n            - address: 10.0.9.1:15008\n",
    );
    let p = problems(&twice);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("routes.services[0].ports[0].waypoint[1].address")
            && p[0].contains("listed twice"),
        "{}",
        p[0]
    );
}

#[test]
fn tcp_keepalive_must_be_what_linux_accepts() {
    for bad in ["0s", "500ms", "10h"] {
        let text = format!("{GOOD}upstream: {{tcp_keepalive: {bad}}}\n");
        let p = problems(&text);
        assert!(
            p.len() == 1
                && p[0].contains("upstream.tcp_keepalive")
                && p[0].contains("1s to 32767s"),
            "{bad}: {p:?}"
        );
    }
    let ok = format!("{GOOD}upstream: {{tcp_keepalive: 9h}}\n");
    assert!(parse_proxy_config(&ok, "gw.yaml").is_ok());
}

#[test]
fn an_unclosed_brace_is_a_syntax_error_where_the_parser_finds_it() {
    let p = problems(
        "admin: {address: 127.0.0.1:15021\nlisteners:\n  - name: tls\n    address: 0.0.0.0:15443\n",
    );
    assert_eq!(
        p,
        ["gw.yaml:2:10: YAML syntax error: while parsing a flow mapping, did not find expected ',' or '}'"]
    );
}

#[test]
fn wrong_types_say_what_form_is_expected() {
    for (from, to, want) in [
        (
            "address: 0.0.0.0:15443",
            "address: 0.0.0.0:99999",
            "gw.yaml:6:14: field `listeners[0].address`: expected host:port, e.g. 10.0.0.7:8000",
        ),
        (
            "port: 5000",
            "port: 70000",
            "gw.yaml:20:17: field `routes.services[0].ports[0].port`: invalid value: integer `70000`, expected a port number 1–65535",
        ),
    ] {
        assert_eq!(problems(&GOOD.replace(from, to)), [want]);
    }
    let text = format!("drain_period: 30\n{GOOD}");
    assert_eq!(
        problems(&text),
        ["gw.yaml:1:15: field `drain_period`: invalid value: string \"30\", expected a duration such as 30s"]
    );
}

#[test]
fn outlier_detection_has_defaults_and_checked_values() {
    let cfg = parse_proxy_config(GOOD, "gw.yaml").unwrap();
    let od = &cfg.upstream.outlier_detection;
    assert!(od.enabled);
    assert_eq!(od.consecutive_failures, 1);
    assert_eq!(od.base_ejection_time.as_secs(), 30);
    assert_eq!(od.max_ejection_time.as_secs(), 300);
    assert_eq!(od.max_ejection_percent, 50);

    let text = format!(
        "{GOOD}upstream:\n  outlier_detection:\n    consecutive_failures: 0\n    \
         base_ejection_time: 10s\n    max_ejection_time: 5s\n    max_ejection_percent: 101\n"
    );
    let p = problems(&text);
    assert_eq!(p.len(), 3, "{p:?}");
    for field in [
        "upstream.outlier_detection.consecutive_failures",
        "upstream.outlier_detection.max_ejection_time",
        "upstream.outlier_detection.max_ejection_percent",
    ] {
        assert!(p.iter().any(|p| p.contains(field)), "{field}: {p:?}");
    }
    let off = format!("{GOOD}upstream: {{outlier_detection: {{enabled: false}}}}\n");
    let cfg = parse_proxy_config(&off, "gw.yaml").unwrap();
    assert!(!cfg.upstream.outlier_detection.enabled);
}

#[test]
fn syntax_errors_have_a_position() {
    let p = problems("listeners: [\n  {name: a\n");
    assert!(p[0].starts_with("gw.yaml:"), "{}", p[0]);
}

#[test]
fn sni_rules_must_match_mode() {
    let text = GOOD.replace("    mode: sni\n", "");
    let p = problems(&text);
    assert!(p[0].contains("listeners[1].rules"), "{p:?}");
}

#[test]
fn admin_splits_into_status_metrics_and_debug_with_istio_defaults() {
    let cfg = parse_proxy_config(
        "listeners: [{name: tls, address: 0.0.0.0:15443}]\n",
        "gw.yaml",
    )
    .unwrap();
    assert_eq!(cfg.admin.status_address.to_string(), "0.0.0.0:15021");
    assert_eq!(cfg.admin.metrics_address.to_string(), "0.0.0.0:15020");
    assert_eq!(cfg.admin.debug_address.to_string(), "127.0.0.1:15000");
    assert!(!cfg.admin.legacy_address);
    assert_eq!(cfg.drain_accept_period.as_secs(), 5);
    assert_eq!(cfg.listeners[0].max_connections, None);
}

/// The old single `admin.address` still loads, as the status address, and is flagged so
/// the proxy can say where /metrics and /config_dump went.
#[test]
fn the_old_admin_address_is_the_status_address() {
    let cfg = parse_proxy_config(GOOD, "gw.yaml").unwrap();
    assert_eq!(cfg.admin.status_address.to_string(), "127.0.0.1:15021");
    assert_eq!(cfg.admin.metrics_address.to_string(), "0.0.0.0:15020");
    assert!(cfg.admin.legacy_address);
    let both = GOOD.replace(
        "  address: 127.0.0.1:15021\n",
        "  address: 127.0.0.1:15021\n  status_address: 127.0.0.1:15021\n",
    );
    let p = problems(&both);
    assert!(p[0].contains("old name of `status_address`"), "{p:?}");
}

#[test]
fn admin_servers_and_listeners_need_distinct_addresses() {
    let text = "admin: {status_address: 0.0.0.0:15021, metrics_address: 0.0.0.0:15021}\n\
                listeners: [{name: tls, address: 0.0.0.0:15020}, {name: b, address: 0.0.0.0:15021}]\n";
    let p = problems(text);
    assert!(
        p.iter().any(|p| p
            .contains("`admin.metrics_address`: 0.0.0.0:15021 is used by another admin server")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|p| p.contains("`listeners[1].address`: same address as admin.status_address")),
        "{p:?}"
    );
    // 15020 is only taken by metrics_address by default; here it was moved, so it is free.
    assert!(!p.iter().any(|p| p.contains("listeners[0]")), "{p:?}");
}
