//! The tuned tables: every entry compiles for its target (libtpu for the chips, the PJRT CPU
//! plugin for `cpu`), and calls pick the table's block for their bucket, else a default.

use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::HostArray;
use torchtpu_exec::{client, Backend};
use torchtpu_kernels::flash::{with_tuned_backward_blocks, with_tuned_block, AttentionOptions, AttentionShape};
use torchtpu_kernels::tuning::{table, table_problems, tuned, TableTarget};
use torchtpu_runtime::TpuCompiler;

#[test]
fn every_table_entry_compiles_for_its_target() {
    use rayon::prelude::*;
    let mut jobs = Vec::new();
    for target in TableTarget::ALL {
        let t = table(target).expect("valid JSON");
        for (kernel, bucket, problem) in table_problems(target) {
            if let Some(config) = t.get(&kernel).and_then(|k| k.get(&bucket)) {
                jobs.push((target, kernel, bucket, config.clone(), problem));
            }
        }
    }
    assert!(!jobs.is_empty(), "the tables are empty: run `cargo run --release -- tables`");
    // Compilers are thread-safe: spread the entries over the cores.
    let failures: Vec<String> = jobs
        .par_iter()
        .filter_map(|(target, kernel, bucket, config, problem)| {
            let values: Vec<(String, usize)> = config
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("key=value");
                    (k.to_string(), v.parse().expect("a number"))
                })
                .collect();
            let call = problem.build(&torchtpu_autotune::Config(values)).expect("builds");
            let traced = call.trace(&problem.operand_types()).expect("traces");
            let result = match target {
                TableTarget::Cpu => client(Backend::Cpu).expect("CPU plugin").compile(&lower(&traced, Target::PortableStableHlo).expect("lowers")).map(|_| ()).map_err(|e| e.to_string()),
                TableTarget::Chip(chip) => {
                    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
                    compiler.compile(*chip, &lower(&traced, Target::TpuStableHlo).expect("lowers")).map(|_| ()).map_err(|e| e.to_string())
                }
            };
            result.err().map(|e| format!("{} {kernel} {bucket} {config}: {e}", target.name()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_target_has_a_table_covering_its_buckets() {
    for target in TableTarget::ALL {
        let t = table(target).expect("valid JSON");
        for (kernel, bucket, _) in table_problems(target) {
            assert!(t.get(&kernel).and_then(|k| k.get(&bucket)).is_some(), "{} has no entry for {kernel} {bucket}", target.name());
        }
    }
}

#[test]
fn calls_use_their_buckets_table_entry_else_a_default() {
    // 1×4×1000×128 causal f32 falls in the s1024 bucket of the CPU table.
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 4, q_len: 1000, kv_len: 1000, head_dim: 128 };
    let opts = AttentionOptions { causal: true, sm_scale: None, block: None };
    let entry = tuned(TableTarget::Cpu, "flash_attention", "s1024d128/causal/f32").expect("the cpu table has the bucket");
    let get = |n: &str| entry.iter().find(|(k, _)| k == n).map(|&(_, v)| v).expect("tunable present");
    let chosen = with_tuned_block(shape, torchtpu_dsl::DType::F32, opts, Backend::Cpu).block.expect("a tuned block");
    assert_eq!(chosen, (get("bq").min(1000usize.div_ceil(8) * 8), get("bk").min(1000usize.div_ceil(8) * 8)));
    // The backward kernels take their own entries.
    let (dkv, dq) = with_tuned_backward_blocks(shape, torchtpu_dsl::DType::F32, opts, Backend::Cpu);
    for (kernel, chosen) in [("flash_attention_dkv", dkv.block), ("flash_attention_dq", dq.block)] {
        let entry = tuned(TableTarget::Cpu, kernel, "s1024d128/causal/f32").expect("the cpu table has the bucket");
        let get = |n: &str| entry.iter().find(|(k, _)| k == n).map(|&(_, v)| v.min(1000usize.div_ceil(8) * 8)).expect("tunable present");
        assert_eq!(chosen, Some((get("bq"), get("bk"))), "{kernel}");
    }
    // An explicit block wins over the table.
    let explicit = AttentionOptions { block: Some((64, 64)), ..opts };
    assert_eq!(with_tuned_block(shape, torchtpu_dsl::DType::F32, explicit, Backend::Cpu).block, Some((64, 64)));
    // No bucket for head_dim 48: no tuned block, so the call's safe default applies.
    let odd = AttentionShape { head_dim: 48, ..shape };
    assert_eq!(with_tuned_block(odd, torchtpu_dsl::DType::F32, opts, Backend::Cpu).block, None);
}

#[test]
fn lowered_tpu_modules_and_device_buffer_runs() {
    use torchtpu_kernels::{flash, matmul};
    use torchtpu_runtime::Chip;
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 2, q_len: 1024, kv_len: 1024, head_dim: 128 };
    let opts = AttentionOptions { causal: true, sm_scale: None, block: None };
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let fwd = flash::forward_tpu_module(shape, torchtpu_dsl::DType::BF16, opts, true, Chip::V6e).expect("lowers");
    assert!(fwd.contains("tpu_custom_call"));
    compiler.compile(Chip::V6e, &fwd).expect("the forward module compiles");
    let (dkv, dq) = flash::backward_tpu_modules(shape, torchtpu_dsl::DType::BF16, opts, true, Chip::V6e).expect("lowers");
    compiler.compile(Chip::V6e, &dkv).expect("dK/dV compiles");
    compiler.compile(Chip::V6e, &dq).expect("dQ compiles");
    let m = matmul::MatmulShape { batch: None, m: 1024, n: 1024, k: 1024 };
    compiler.compile(Chip::V5e, &matmul::tpu_module(m, torchtpu_dsl::DType::BF16, Default::default(), Chip::V5e).expect("lowers")).expect("compiles");

    // On device buffers: upload once, run twice, download.
    let small = matmul::MatmulShape { batch: None, m: 64, n: 32, k: 48 };
    let c = matmul::compiled(small, torchtpu_dsl::DType::F32, Default::default(), Backend::Cpu).expect("compiles");
    let a = ndarray::Array2::from_shape_fn((64, 48), |(i, j)| (i + 2 * j) as f32 / 10.0);
    let b = ndarray::Array2::from_shape_fn((48, 32), |(i, j)| (i as f32 - j as f32) / 7.0);
    let buffers = c.upload(&[HostArray::from(&a), HostArray::from(&b)]).expect("uploads");
    c.execute(&buffers).expect("runs");
    let out = c.execute(&buffers).expect("runs again");
    let got = torchtpu_exec::download(&out[0], &torchtpu_dsl::ir::ValueType::new(torchtpu_dsl::DType::F32, [64, 32])).expect("downloads");
    let want = a.dot(&b);
    let got = got.into_array::<f32>().expect("f32");
    assert!(got.iter().zip(want.iter()).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs().max(1.0)));
}
