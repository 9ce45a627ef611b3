//! Istio outbound SNI names: never panic; a parsed name round-trips.
#![no_main]

use eastwest_proxy::istio_sni::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(sni) = parse(s) {
            let again = format!("outbound_.{}_.{}_.{}", sni.port, sni.subset, sni.hostname);
            assert!(again.eq_ignore_ascii_case(s));
        }
    }
});
