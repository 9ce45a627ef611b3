//! ClientHello parsing cost for a typical 512-byte hello (target: under 1 µs), and for a
//! 60 KiB post-quantum-sized hello still arriving: the read loop parses after every read, so
//! an incomplete multi-record hello must cost little each time.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use eastwest_proxy::client_hello::{parse, Parse};
use rustls::pki_types::ServerName;

#[path = "../tests/integration/support/hello.rs"]
mod hello;

fn hello_512() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()];
    let name = ServerName::try_from("outbound_.8000_._.sglang.demo.svc.cluster.local").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    // Pad to 512 bytes, a typical browser/sidecar hello size.
    let pad = 512 - out.len() - 4;
    hello::with_extension(&out, pad)
}

fn bench(c: &mut Criterion) {
    let hello = hello_512();
    let mut group = c.benchmark_group("client_hello");
    group.throughput(criterion::Throughput::Bytes(hello.len() as u64));
    group.bench_function(format!("parse_{}B", hello.len()), |b| {
        b.iter(|| match parse(std::hint::black_box(&hello)) {
            Ok(Parse::Done(info)) => std::hint::black_box(info.client_hello().sni.map(str::len)),
            _ => panic!("hello did not parse"),
        })
    });
    group.finish();

    // Four 16 KiB records, the last one 1 KiB short.
    let big = hello::with_extension(&hello, 60_000);
    let arriving = &big[..big.len() - 1024];
    let mut group = c.benchmark_group("client_hello");
    group.bench_function("parse_incomplete_60KiB_4_records", |b| {
        b.iter(|| match parse(std::hint::black_box(arriving)) {
            Ok(Parse::NeedMore) => {}
            _ => panic!("an incomplete hello must need more"),
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
