//! The ClientHello parser on what real clients send.

use crate::support::hello::with_extension;
use crate::support::*;
use eastwest_proxy::client_hello::{parse, HelloError, Parse, MAX_HELLO_BYTES, MAX_HELLO_RECORDS};

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
fn tiny_records_parse_up_to_a_cap() {
    let pki = pki();
    let hello = client_hello_bytes(&pki.client, "tiny.example.com");
    // Two bytes per record: even the 4-byte handshake header spans records.
    let two = split_records(&hello, 2);
    assert!((hello.len() - 5).div_ceil(2) <= MAX_HELLO_RECORDS);
    assert_eq!(done(&two).0.as_deref(), Some("tiny.example.com"));
    // One byte per record: more records than any client sends.
    let one = split_records(&hello, 1);
    assert!(hello.len() - 5 > MAX_HELLO_RECORDS);
    assert_eq!(
        parse(&one),
        Err(HelloError::Malformed(
            "ClientHello spread over too many records"
        ))
    );
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
