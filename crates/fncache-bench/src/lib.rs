//! Benchmarks of fncache on real modules: the edit scenarios made from them, the measurements
//! each run in a fresh process, and the suite behind `fncache-bench`.

pub mod edits;
pub mod probe;
pub mod suite;
pub mod synthetic;
