//! eastwest-proxy end to end: real sockets, real rustls, a proxy in process or as a binary.
//! One test binary per crate: each links once, which keeps a fresh build small and quick.

mod access_log;
mod admin;
mod cli;
mod client_hello;
mod control_stream;
mod fd_limit;
mod fuzz_corpus;
mod hbone;
mod hbone_streams;
mod identity;
mod identity_istiod;
mod istio_telemetry;
mod lifecycle;
mod outlier;
mod passthrough;
mod running;
mod splice;
mod support;
mod token_timing;
