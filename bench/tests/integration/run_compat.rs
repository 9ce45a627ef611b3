//! eastwest-bench run against what sglang's bench_serving writes and sends
//! (tests/fixtures/sglang_bench_serving.json, extracted from sglang 0.5.23's source by the
//! script beside it): every JSONL key, the console lines in order, the request body keys.

use super::run_flags::{recording_server, run};

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("../fixtures/sglang_bench_serving.json")).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_keys_console_and_bodies_are_bench_servings() {
    let fx = fixture();
    let (url, log) = recording_server().await;
    let dir = tempfile::tempdir().unwrap();
    for (backend, api) in [
        ("sglang-oai", "completions"),
        ("sglang-oai-chat", "chat"),
        ("sglang", "native"),
    ] {
        let out = dir.path().join(format!("{backend}.jsonl"));
        let output = run(
            &url,
            &out,
            &[
                "--backend",
                backend,
                "--model",
                "m",
                "--num-prompts",
                "2",
                "--request-rate",
                "50",
                "--output-details",
                "--goodput",
                "e2el:5000",
                "ttft:1000",
                "--tag",
                "t",
                "--ready-check-timeout-sec",
                "5",
                "--warmup-requests",
                "1",
            ],
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");

        // Every key bench_serving writes (result, goodput, details), with its types, in its
        // order (eastwest's own keys may come between goodput and details).
        let text = std::fs::read_to_string(&out).unwrap();
        let mut at = 0;
        for key in strings(&fx["result_keys"])
            .iter()
            .chain(&strings(&fx["goodput_keys"]))
            .chain(&strings(&fx["details_keys"]))
        {
            let found = text[at..].find(&format!("\"{key}\":"));
            assert!(
                found.is_some(),
                "{backend}: {key:?} not after the keys before it in {text}"
            );
            at += found.unwrap_or(0);
        }
        let line = super::run_flags::parse_jsonl(&text);
        let obj = line.as_object().unwrap();
        for key in strings(&fx["result_keys"])
            .iter()
            .chain(&strings(&fx["goodput_keys"]))
            .chain(&strings(&fx["details_keys"]))
        {
            assert!(
                obj.contains_key(key.as_str()),
                "{backend}: no {key:?} in {line}"
            );
        }
        assert_eq!(line["backend"], backend);
        assert_eq!(line["tag"], "t");
        assert_eq!(
            line["request_rate"], 50.0,
            "a float, as bench_serving writes it"
        );
        assert!(line["max_concurrent_requests"].is_u64());
        assert!(line["max_output_tokens_per_s"].is_f64());
        assert!(line["accept_length"].is_null());
        assert_eq!(line["goodput_slos_ms"]["ttft"], 1000.0);
        // bench_serving's SLO dicts keep the order the SLOs were given in.
        assert!(
            text.contains(r#""goodput_slos_ms":{"e2el":5000.0,"ttft":1000.0}"#),
            "{text}"
        );
        assert!(line["slo_attainment_by_metric"]["e2el"].is_f64());
        if api != "native" {
            assert_eq!(line["generated_texts"][0], "a");
        }

        // The console table: bench_serving's lines in its order (the two it prints only for
        // image datasets and speculative decoding left out), then eastwest's section.
        let sglang: Vec<String> = strings(&fx["console_lines"])
            .into_iter()
            .filter(|l| l != "Total input vision tokens:" && l != "Accept length:")
            .collect();
        // bench_serving's progress lines before the table, in its order.
        let mut at = 0;
        for progress in [
            "benchmark_args=",
            "Waiting up to",
            "Server ready in",
            "#Input tokens: ",
            "#Output tokens: ",
            "Starting warmup with 1 sequences...",
            "Warmup completed with 1 sequences. Starting main benchmark run...",
            "Serving Benchmark Result",
        ] {
            let found = stdout[at..].find(progress);
            assert!(found.is_some(), "{progress:?} not in order in {stdout}");
            at += found.unwrap_or(0);
        }
        let table = &stdout[stdout.find("Serving Benchmark Result").unwrap()..];
        let ours: Vec<String> = table
            .lines()
            .skip(1)
            .take_while(|l| !l.contains("eastwest"))
            // print_goodput's section (its own function in bench_serving, checked below).
            .filter(|l| !l.to_lowercase().contains("goodput") && !l.contains("SLO"))
            .map(|l| match l.trim_matches('-') {
                title if l.starts_with('-') => title.to_string(),
                _ => l[..40].trim_end().to_string(),
            })
            .collect();
        assert_eq!(ours, sglang, "{table}");
        for goodput_line in [
            "SLOs (ms):",
            "Request goodput (req/s):",
            "SLO attainment (%):",
            "TTFT SLO attainment (%):",
        ] {
            assert!(table.contains(goodput_line), "{table}");
        }

        // The request bodies: bench_serving's keys, no more.
        let seen = log.lock().unwrap().clone();
        let (_, body) = seen
            .iter()
            .rev()
            .find(|(h, _)| h.starts_with("post "))
            .unwrap();
        let mut got: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
        let mut want = strings(&fx["body_keys"][api]);
        got.sort();
        want.sort();
        assert_eq!(got, want, "{backend} body {body}");
        if api == "native" {
            let mut got: Vec<String> = body["sampling_params"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let mut want = strings(&fx["native_sampling_params_keys"]);
            got.sort();
            want.sort();
            assert_eq!(got, want, "native sampling_params {body}");
        }
    }
}
