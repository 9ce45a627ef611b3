//! eastwest-bench: streaming-LLM latency across regions.
//!
//! - [`serve`]: an sglang-like OpenAI-compatible model server (no GPU).
//! - [`run`]: a load generator with sglang `bench_serving` flags and metrics.
//! - [`sidecar`]: plain TCP in, mTLS with SNI out (for clients without TLS options).
//! - [`wan`]: a userspace WAN link that adds delay per direction.
//! - [`ambient`]: ztunnel stand-ins at both ends of a double-HBONE tunnel (demo).
//! - [`demo`]: the two-region demo, the project's main job.

pub mod ambient;
pub mod demo;
pub mod run;
pub mod serve;
pub mod sidecar;
mod stoppable;
// Sub-millisecond sleeps (WAN release times, token due times, request arrivals).
pub(crate) mod timer;
pub mod wan;
