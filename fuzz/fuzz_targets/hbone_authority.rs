//! HBONE CONNECT authorities: never panic; an accepted one is exactly `<hostname>:<port>`,
//! with a hostname that is no IP address and a port that is not 0 (no open relay).
#![no_main]

use eastwest_proxy::hbone::authority::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = parse(s) {
            assert_eq!(format!("{}:{}", a.hostname, a.port), s);
            assert_ne!(a.port, 0);
            assert!(a.hostname.parse::<std::net::IpAddr>().is_err());
            assert!(a.hostname.bytes().any(|b| !b.is_ascii_digit() && b != b'.'));
        }
    }
});
