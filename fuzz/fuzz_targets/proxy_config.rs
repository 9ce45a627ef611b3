//! Config files as users write them: loading never panics, whatever the YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = eastwest_routes::parse_proxy_config(text, "fuzz.yaml");
    }
});
