//! What `torchtpu tune` caches is what the ops' calls use: the CLI tunes the shipped ops
//! under the keys their calls look up, and an exact-shape result beats the table's bucket.
//! (Alone in its test binary: it points the tuning cache at a directory of its own.)

use torchtpu_dsl::DType;
use torchtpu_kernels::flash::{with_tuned_block, AttentionOptions, AttentionShape};
use torchtpu_kernels::matmul::{MatmulConfig, MatmulOp, MatmulProblem, MatmulShape};
use torchtpu_kernels::op::{config_for, Op};
use torchtpu_kernels::tables::TableTarget;
use torchtpu_runtime::Chip;

fn tune(cache: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_torchtpu")).args(args).env("TORCHTPU_CACHE_DIR", cache).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

fn config(summary: &serde_json::Value) -> Vec<(String, usize)> {
    let text = summary["best_config"].as_str().expect("best config");
    text.split(',').map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.parse().expect("a number"))).expect("k=v")).collect()
}

#[test]
fn the_cli_fills_the_cache_the_ops_read() {
    let cache = std::env::temp_dir().join(format!("torchtpu-tuned-ops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::env::set_var("TORCHTPU_CACHE_DIR", &cache);

    // A chip's ranking reaches the matmul op's calls for that chip.
    let problem = MatmulProblem { shape: MatmulShape { batch: None, m: 384, n: 640, k: 256 }, dtype: DType::BF16, transpose_b: false };
    let target = Some(TableTarget::Chip(Chip::V6e));
    let before = config_for(&MatmulOp, &problem, target);
    let summary = tune(&cache, &["tune", "matmul", "--device", "v6e", "--dtype", "bf16", "--set", "m=384,n=640,k=256", "--strategy", "exhaustive", "--json"]);
    let best = config(&summary);
    let get = |k: &str| best.iter().find(|(n, _)| n == k).map(|&(_, v)| v).expect("tunable");
    let after = config_for(&MatmulOp, &problem, target);
    let tuned = MatmulOp.fit(&problem, MatmulConfig { bm: get("bm"), bn: get("bn"), bk: get("bk") });
    assert_eq!(after, tuned, "the ops use what the CLI tuned (the table said {before:?})");

    // A CPU tuning of flash attention reaches the attention calls the PyTorch op makes, whose
    // scale is explicit where the CLI's is the default.
    let summary = tune(&cache, &["tune", "flash_attention", "--device", "cpu", "--set", "heads=1,kv_heads=1,q_len=200,kv_len=200,head_dim=64,causal=1", "--budget", "3", "--json"]);
    let best = config(&summary);
    let get = |k: &str| best.iter().find(|(n, _)| n == k).map(|&(_, v)| v).expect("tunable");
    let shape = AttentionShape { batch: 1, heads: 1, kv_heads: 1, q_len: 200, kv_len: 200, head_dim: 64 };
    let opts = AttentionOptions { causal: true, sm_scale: Some(0.125), block: None, ..Default::default() };
    let chosen = with_tuned_block(shape, DType::F32, opts, torchtpu_exec::Backend::Cpu).block;
    assert_eq!(chosen, Some((get("bq").min(200), get("bk").min(200))));
    let _ = std::fs::remove_dir_all(&cache);
}
