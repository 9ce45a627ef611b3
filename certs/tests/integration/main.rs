//! eastwest-certs end to end: the CLI, inspection, and real TLS handshakes with rustls and OpenSSL.
//! One test binary per crate: each links once, which keeps a fresh build small and quick.

mod cli;
mod inspect;
mod mtls;
mod openssl_tls;
