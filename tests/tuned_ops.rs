//! What `torchtpu tune` caches is what the ops' calls use: the CLI tunes the shipped kernels
//! under the keys their calls look up, and an exact-shape result beats the table's bucket.
//! (Alone in its test binary: it points the tuning cache at a directory of its own.)

use torchtpu_autotune::Config;
use torchtpu_dsl::DType;
use torchtpu_kernels::matmul::MatmulShape;
use torchtpu_kernels::tuning::{choose, matmul_bucket, MatmulTunable, TableTarget};
use torchtpu_runtime::Chip;

#[test]
fn the_cli_fills_the_cache_the_ops_read() {
    let cache = std::env::temp_dir().join(format!("torchtpu-tuned-ops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::env::set_var("TORCHTPU_CACHE_DIR", &cache);
    let shape = MatmulShape { batch: None, m: 384, n: 640, k: 256 };
    let problem = MatmulTunable { shape, dtype: DType::BF16, transpose_b: false };
    let target = Some(TableTarget::Chip(Chip::V6e));
    let bucket = matmul_bucket(shape, DType::BF16, false);
    let before = choose(target, "matmul", &bucket, &problem);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_torchtpu"))
        .args(["tune", "matmul", "--device", "v6e", "--dtype", "bf16", "--set", "m=384,n=640,k=256", "--strategy", "exhaustive", "--json"])
        .env("TORCHTPU_CACHE_DIR", &cache)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let best = summary["best_config"].as_str().expect("best config").to_string();

    let after = choose(target, "matmul", &bucket, &problem).expect("the cached result");
    assert_eq!(Config(after).to_string(), best, "the ops use what the CLI tuned (the table said {before:?})");
    let _ = std::fs::remove_dir_all(&cache);
}
