//! eastwest-bench end to end: serve, run, wan and demo over real sockets.
//! One test binary per crate: each links once, which keeps a fresh build small and quick.

mod ambient_destination;
mod demo_ambient;
mod demo_quick;
mod demo_telemetry;
mod run_compat;
mod run_failures;
mod run_flags;
mod run_model_server;
mod run_pacing;
mod run_through_proxy;
mod run_vs_sglang;
mod serve_api;
mod serve_cli;
mod serve_openai_python;
mod serve_queue;
mod serve_support;
mod serve_timing;
mod serve_tls;
mod wan_link;
