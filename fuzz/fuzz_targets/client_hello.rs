//! Any bytes a client sends before the handshake: the parser must never panic, and reading
//! them in pieces (as the proxy does, with a `HelloReader`) gives the verdict parsing them
//! whole gives.
#![no_main]

use eastwest_proxy::client_hello::{parse, HelloReader, Parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parse::Done(info)) = &whole {
        let hello = info.client_hello();
        let _ = hello.alpn_protocols().count();
        if let Some(sni) = hello.sni {
            assert!(sni.is_ascii());
        }
    }
    // Byte by byte: every prefix, and still O(bytes) in total with a reader.
    let mut reader = HelloReader::default();
    let mut end = 0;
    let pieces = loop {
        end = (end + 1).min(data.len());
        match reader.parse(&data[..end]) {
            Ok(Parse::NeedMore) if end < data.len() => continue,
            other => break other,
        }
    };
    assert_eq!(pieces, whole);
});
