//! Replays fuzz/corpus/proxy_config through the loader on stable Rust: it must never panic.

#[test]
fn proxy_config_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_config");
    let mut ok = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        if eastwest_routes::parse_proxy_config(&text, &path.display().to_string()).is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 1, "the sample gateway.yaml in the corpus should load");
}
