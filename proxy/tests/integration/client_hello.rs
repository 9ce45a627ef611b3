//! The ClientHello parser on what real clients send.

use crate::support::hello::with_extension;
use crate::support::*;
use eastwest_proxy::client_hello::{parse, HelloError, HelloReader, Parse, MAX_HELLO_BYTES};

fn done(bytes: &[u8]) -> (Option<String>, Vec<String>, bool) {
    match parse(bytes) {
        Ok(Parse::Done(info)) => {
            let h = info.client_hello();
            (
                h.sni.map(str::to_string),
                h.alpn_protocols()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect(),
                h.offers_tls13,
            )
        }
        other => panic!("not parsed: {other:?}"),
    }
}

#[test]
fn real_rustls_hello_gives_sni_alpn_and_tls13() {
    let pki = pki();
    let sni = istio_sni(8000, "", SGLANG);
    let hello = client_hello_bytes(&pki.client, &sni);
    assert_eq!(
        done(&hello),
        (
            Some(sni),
            vec!["istio-peer-exchange".into(), "istio".into()],
            true
        )
    );
}

#[test]
fn every_prefix_needs_more_and_never_errs() {
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "api.example.com");
    for split in [hello.clone(), split_records(&hello, 7)] {
        for end in 0..split.len() {
            assert_eq!(parse(&split[..end]), Ok(Parse::NeedMore), "prefix {end}");
        }
        assert_eq!(done(&split).0.as_deref(), Some("api.example.com"));
    }
}

#[test]
fn post_quantum_sized_hellos_parse_up_to_the_cap() {
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "big.example.com");
    // ML-KEM-768 key shares put real hellos around 1.8 KiB: more than one MTU.
    let big = with_extension(&hello, 1500);
    assert!(big.len() > 1500);
    assert_eq!(done(&big).0.as_deref(), Some("big.example.com"));
    // Spanning several 16 KiB records.
    let huge = with_extension(&hello, 40_000);
    assert_eq!(done(&huge).0.as_deref(), Some("big.example.com"));
    // Over the cap.
    let too_big = with_extension(&hello, MAX_HELLO_BYTES);
    assert_eq!(parse(&too_big), Err(HelloError::TooLarge));
}

#[test]
fn tls12_hello_without_extensions() {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0xc0, 0x2f]); // one suite
    body.extend_from_slice(&[1, 0]); // null compression
    let mut rec = vec![
        22,
        3,
        1,
        0,
        (body.len() + 4) as u8,
        1,
        0,
        0,
        body.len() as u8,
    ];
    rec.extend_from_slice(&body);
    assert_eq!(done(&rec), (None, vec![], false));
}

#[test]
fn any_record_fragmentation_parses() {
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "tiny.example.com");
    // Two bytes per record: even the 4-byte handshake header spans records.
    assert_eq!(
        done(&split_records(&hello, 2)).0.as_deref(),
        Some("tiny.example.com")
    );
    // One byte per record, of a hello near the 64 KiB cap: legal TLS, however odd.
    let big = with_extension(&hello, MAX_HELLO_BYTES - hello.len() - 64);
    let one = split_records(&single_record(&big), 1);
    assert!(one.len() > 6 * 60_000);
    assert_eq!(done(&one).0.as_deref(), Some("tiny.example.com"));
}

#[test]
fn a_trickled_hello_is_walked_once() {
    // One record per read, as a client trickling 1-byte records would deliver it: each call
    // walks only the new record (the whole walk is O(bytes), not O(records²)).
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "trickle.example.com");
    let big = with_extension(&hello, MAX_HELLO_BYTES - hello.len() - 64);
    let one = split_records(&single_record(&big), 1);
    let mut reader = HelloReader::default();
    let mut end = 0;
    let info = loop {
        end = (end + 6).min(one.len());
        match reader.parse(&one[..end]).unwrap() {
            Parse::NeedMore => assert!(end < one.len()),
            Parse::Done(info) => break info,
        }
    };
    assert_eq!(end, one.len());
    assert_eq!(info.client_hello().sni, Some("trickle.example.com"));
    // Over the cap in tiny records: refused as too large, not malformed.
    let over = with_extension(&hello, MAX_HELLO_BYTES);
    let over = split_records(&single_record(&over), 1);
    assert_eq!(parse(&over), Err(HelloError::TooLarge));
}

/// `with_extension`'s output (16 KiB records) as one record, so `split_records` can re-frame
/// it; the record length field is not looked at by `split_records`.
fn single_record(hello: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    let mut at = 0;
    while at < hello.len() {
        let len = u16::from_be_bytes([hello[at + 3], hello[at + 4]]) as usize;
        msg.extend_from_slice(&hello[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    let mut out = vec![22, 3, 1, 0, 0];
    out.extend_from_slice(&msg);
    out
}

#[test]
fn garbage_is_rejected_early() {
    assert_eq!(parse(b"G"), Err(HelloError::NotTls));
    assert_eq!(
        parse(&[22, 3, 1, 0, 0]).unwrap_err().to_string(),
        "malformed ClientHello: empty handshake record"
    );
    // A server hello where a client hello belongs.
    assert!(matches!(
        parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
        Err(HelloError::Malformed(_))
    ));
    // An alert record after the first fragment.
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "x.example");
    let mut split = split_records(&hello, 16);
    split[16 + 5] = 21;
    assert!(matches!(parse(&split), Err(HelloError::Malformed(_))));
}
