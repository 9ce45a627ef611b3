//! Replays the fuzz seed corpora (and any crash inputs saved there) through the parsers on
//! stable Rust, so a once-found crash stays fixed. `--ignored regenerate_seeds` rewrites the
//! generated seeds.

use std::path::{Path, PathBuf};

use crate::support::*;
use eastwest_proxy::client_hello::{self, Parse};
use eastwest_proxy::hbone::authority;
use eastwest_proxy::istio_sni;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn client_hello_corpus_replays() {
    let files = corpus("client_hello");
    assert!(files.len() >= 8, "seed corpus missing");
    let mut parsed = 0;
    for (path, data) in &files {
        // Every prefix too: that is how bytes arrive from the network.
        for end in 0..=data.len() {
            let _ = client_hello::parse(&data[..end]);
        }
        if let Ok(Parse::Done(info)) = client_hello::parse(data) {
            parsed += 1;
            let hello = info.client_hello();
            assert!(hello.sni.is_none_or(|s| s.is_ascii()), "{}", path.display());
        }
    }
    assert!(parsed >= 4, "the real hellos in the corpus should parse");
}

#[test]
fn istio_sni_corpus_replays() {
    for (path, data) in corpus("istio_sni") {
        if let Ok(s) = std::str::from_utf8(&data) {
            // The fuzz target's property: a parsed name is exactly what Istio would write.
            if let Ok(sni) = istio_sni::parse(s) {
                let again = format!("outbound_.{}_.{}_.{}", sni.port, sni.subset, sni.hostname);
                assert!(again.eq_ignore_ascii_case(s), "{}", path.display());
            }
        }
    }
}

#[test]
fn hbone_authority_corpus_replays() {
    let files = corpus("hbone_authority");
    assert!(files.len() >= 8, "seed corpus missing");
    let mut accepted = 0;
    for (path, data) in files {
        if let Ok(s) = std::str::from_utf8(&data) {
            // The fuzz target's property: an accepted authority is exactly hostname:port,
            // never an IP address or port 0.
            if let Ok(a) = authority::parse(s) {
                accepted += 1;
                assert_eq!(
                    format!("{}:{}", a.hostname, a.port),
                    s,
                    "{}",
                    path.display()
                );
                assert_ne!(a.port, 0, "{}", path.display());
                assert!(a.hostname.parse::<std::net::IpAddr>().is_err());
            }
        }
    }
    assert!(
        accepted >= 2,
        "the service authorities in the corpus should parse"
    );
}

#[test]
#[ignore = "writes fuzz/corpus seeds"]
fn regenerate_seeds() {
    let pki = pki();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let hello_dir = dir.join("client_hello");
    std::fs::create_dir_all(&hello_dir).unwrap();
    let sglang = client_hello_bytes(&pki.client, &istio_sni(8000, "", SGLANG));
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("istio-sglang", sglang.clone()),
        (
            "istio-subset",
            client_hello_bytes(
                &pki.client,
                &istio_sni(5000, "v2", "helloworld.sample.svc.cluster.local"),
            ),
        ),
        ("no-sni", client_hello_bytes(&pki.client, "10.0.0.1")),
        (
            "plain-dns",
            client_hello_bytes(&pki.client, "api.example.com"),
        ),
        ("split-64", split_records(&sglang, 64)),
        ("split-1", split_records(&sglang, 1)),
        ("truncated", sglang[..sglang.len() / 2].to_vec()),
        ("http", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
        ("empty-record", vec![22, 3, 1, 0, 0]),
        ("huge-length", vec![22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]),
    ];
    for (name, bytes) in seeds {
        std::fs::write(hello_dir.join(name), bytes).unwrap();
    }
    let sni_dir = dir.join("istio_sni");
    std::fs::create_dir_all(&sni_dir).unwrap();
    for (i, s) in [
        "outbound_.8000_._.sglang.demo.svc.cluster.local",
        "outbound_.5000_.v2_.helloworld.sample.svc.cluster.local",
        "outbound_.65535_.a-b_.x",
        "outbound_.0_._.x",
        "outbound_.99999_._.x",
        "inbound_.80_._.x",
        "outbound_._.",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(sni_dir.join(format!("seed-{i}")), s).unwrap();
    }
}
