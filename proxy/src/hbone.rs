//! HBONE (HTTP/2 CONNECT over mTLS), Istio ambient's tunnel: the gateway's `mode: hbone`
//! listener and a client that speaks it.

pub mod authority;
pub mod client;
pub(crate) mod server;
