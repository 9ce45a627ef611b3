//! eastwest-routes: loading route tables from files, and the fuzz corpus replayed.
//! One test binary per crate: each links once, which keeps a fresh build small and quick.

mod fuzz_corpus;
mod load;
