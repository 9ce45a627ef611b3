//! `eastwest-bench demo --quick` runs the whole two-region path and writes its outputs.

#[test]
fn quick_demo_writes_results_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo-out");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eastwest-bench"))
        .args(["demo", "--quick", "--rtt", "20ms"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "direct (in-region)",
        "cross-region keepalive",
        "cross-region cold",
        "ambient cross-region warm",
        "ambient cross-region cold",
    ] {
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let scenarios = results["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 5);
    for sc in scenarios {
        let m = &sc["metrics"];
        assert_eq!(m["completed"], 8, "{}", sc["name"]);
        assert_eq!(m["failed"], 0);
        assert_eq!(m["total_output_tokens"], 64);
        assert!(m["mean_ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(m["mean_itl_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(sc["ttfts_ms"].as_array().unwrap().len(), 8);
        assert_eq!(sc["itls_ms"].as_array().unwrap().len(), 8 * 7);
        assert_eq!(sc["settings"]["num_prompts"], 8);
        assert!(sc["settings"]["connection"].is_string());
        // The window to query the gateway's metrics over (deploy/tools/demo_kiali.sh).
        let window = (
            sc["started_unix_s"].as_f64().unwrap(),
            sc["finished_unix_s"].as_f64().unwrap(),
        );
        assert!(window.0 > 1.7e9 && window.0 < window.1, "{window:?}");
    }
    assert_eq!(
        results["checks"]["server_sse_events"],
        results["checks"]["client_sse_events"]
    );
    assert!(results["gateway_counters"].as_object().is_some());
    // The ambient path's RTT accounting, per scenario.
    for name in ["ambient cross-region warm", "ambient cross-region cold"] {
        let check = &results["checks"]["ambient"][name];
        assert!(check["ttft_delta_rtts"].is_f64(), "{name}: {check}");
        assert!(check["expected_rtts"].is_u64(), "{name}: {check}");
    }
    assert!(results["topology"]["ambient"]["gateway_hbone"].is_string());

    // Which build, when, and every setting, so a results.json explains itself.
    let build = &results["eastwest"];
    assert_eq!(build["version"], env!("CARGO_PKG_VERSION"));
    assert!(build["commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(build["started_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(build["command"]
        .as_array()
        .is_some_and(|a| a.iter().any(|w| w == "--quick")));
    let options = &results["options"];
    assert_eq!(options["rtt_ms"], 20.0);
    for setting in [
        "ttft_ms",
        "itl_ms",
        "num_prompts",
        "input_len",
        "output_len",
        "concurrency",
        "quick",
        "out",
    ] {
        assert!(
            !options[setting].is_null(),
            "results.json lacks options.{setting}"
        );
    }

    for svg in ["ttft_cdf.svg", "ttft_by_scenario.svg", "itl_cdf.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg"), "{svg}");
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        // One curve per scenario, and a legend naming each.
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("polyline"))
                .count(),
            5
        );
        assert!(text.contains("cross-region cold"));
        assert!(text.contains("ambient cross-region cold"));
    }
}
