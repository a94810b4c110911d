//! Criterion benchmarks for torchtpu; see `benches/` (run with `cargo bench -p torchtpu-benches`).
