//! eastwest-control end to end against an in-process Kubernetes API server that speaks the real wire protocol.
//! One test binary per crate: each links once, which keeps a fresh build small and quick.

mod ambient;
mod cli;
mod delta;
mod e2e;
mod rotation;
mod secrets;
mod stream;
mod subsets;
mod support;
mod unsynced;
mod validation;
mod watch;
