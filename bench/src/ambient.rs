//! Istio ambient's data path for the demo, both ends of a double-HBONE tunnel:
//!
//! - [`SourceZtunnel`]: what the fra node's ztunnel does for a captured app connection:
//!   an outer HBONE stream to the remote network's east-west gateway (CONNECT
//!   `<service>:<port>`), and inside it an inner mTLS + HTTP/2 CONNECT to the destination
//!   ztunnel (`<pod ip>:<port>`). The HBONE client itself is eastwest-proxy's
//!   ([`eastwest_proxy::hbone::client`]).
//! - [`DestinationZtunnel`]: the ash node's ztunnel inbound, in front of the model server:
//!   terminates the inner HBONE and relays each CONNECT to its workload.

mod destination;
mod source;

pub use destination::DestinationZtunnel;
pub use source::{OuterConnection, SourceZtunnel, SourceZtunnelConfig};
