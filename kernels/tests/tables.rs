//! The tuned tables: every entry compiles for its target (libtpu for the chips, the PJRT CPU
//! plugin for `cpu`), and calls pick the table's block for their bucket, else a default.

use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::HostArray;
use torchtpu_exec::{client, Backend};
use torchtpu_kernels::flash::{with_tuned_backward_blocks, with_tuned_block, AttentionOptions, AttentionShape, FlashConfig};
use torchtpu_kernels::registry;
use torchtpu_kernels::tables::{entry, table, TableTarget};
use torchtpu_runtime::TpuCompiler;

/// One table job: target, op, bucket, the table's config for it (if any), the problem.
type Entry = (TableTarget, &'static str, String, Option<&'static serde_json::Value>, Box<dyn torchtpu_autotune::Tunable>);

/// Every shipped op's table entries on every target.
fn entries() -> Vec<Entry> {
    let mut out = Vec::new();
    for target in TableTarget::ALL {
        table(target).expect("valid JSON");
        for op in registry::ops() {
            for (bucket, problem) in op.table_jobs(target) {
                out.push((target, op.name(), bucket.clone(), entry(target, op.name(), &bucket), problem));
            }
        }
    }
    out
}

#[test]
fn every_table_entry_compiles_for_its_target() {
    use rayon::prelude::*;
    let jobs: Vec<_> = entries().into_iter().filter(|e| e.3.is_some()).collect();
    assert!(!jobs.is_empty(), "the tables are empty: run `cargo run --release -- tables`");
    // Compilers are thread-safe: spread the entries over the cores.
    let failures: Vec<String> = jobs
        .par_iter()
        .filter_map(|(target, op, bucket, config, problem)| {
            let fields = config.and_then(|c| c.as_object()).expect("an object");
            let values = problem.space().params().iter().map(|(n, _)| (n.clone(), fields.get(n).and_then(|v| v.as_u64()).expect("every tunable") as usize)).collect();
            let call = problem.build(&torchtpu_autotune::Config(values)).expect("builds");
            let traced = call.trace(&problem.operand_types()).expect("traces");
            let result = match target {
                TableTarget::Cpu => {
                    client(Backend::Cpu).expect("CPU plugin").compile(&lower(&traced, Target::PortableStableHlo).expect("lowers")).map(|_| ()).map_err(|e| e.to_string())
                }
                TableTarget::Chip(chip) => {
                    // With the VMEM limit its blocks get on the chip, as the ops lower it.
                    let mut traced = traced;
                    traced.vmem_limit_bytes = torchtpu_autotune::model::vmem_limit(&traced, *chip).expect("fits the chip's VMEM");
                    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
                    compiler.compile(*chip, lower(&traced, Target::TpuStableHlo).expect("lowers")).map(|_| ()).map_err(|e| e.to_string())
                }
            };
            result.err().map(|e| format!("{} {op} {bucket} {config:?}: {e}", target.name()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_target_has_a_table_covering_its_buckets() {
    for (target, op, bucket, config, _) in entries() {
        assert!(config.is_some(), "{} has no entry for {op} {bucket}", target.name());
    }
}

#[test]
fn calls_use_their_buckets_table_entry_else_a_default() {
    // 1×4×1000×128 causal f32 falls in the s1024 bucket of the CPU table.
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 4, q_len: 1000, kv_len: 1000, head_dim: 128 };
    let opts = AttentionOptions { causal: true, sm_scale: None, block: None, ..Default::default() };
    let fitted = |op: &str| {
        let c: FlashConfig = serde_json::from_value(entry(TableTarget::Cpu, op, "s1024d128/causal/f32").expect("the cpu table has the bucket").clone()).expect("a config");
        (c.bq.min(1000usize.div_ceil(8) * 8), c.bk.min(1000usize.div_ceil(8) * 8))
    };
    let chosen = with_tuned_block(shape, torchtpu_dsl::DType::F32, opts, Backend::Cpu).block.expect("a tuned block");
    assert_eq!(chosen, fitted("flash_attention"));
    // The backward kernels take their own entries.
    let (dkv, dq) = with_tuned_backward_blocks(shape, torchtpu_dsl::DType::F32, opts, Backend::Cpu);
    for (op, chosen) in [("flash_attention_dkv", dkv.block), ("flash_attention_dq", dq.block)] {
        assert_eq!(chosen, Some(fitted(op)), "{op}");
    }
    // An explicit block wins over the table.
    let explicit = AttentionOptions { block: Some((64, 64)), ..opts };
    assert_eq!(with_tuned_block(shape, torchtpu_dsl::DType::F32, explicit, Backend::Cpu).block, Some((64, 64)));
    // No bucket for head_dim 48: the op's heuristic (512 blocks, clamped to the lengths).
    let odd = AttentionShape { head_dim: 48, ..shape };
    assert_eq!(with_tuned_block(odd, torchtpu_dsl::DType::F32, opts, Backend::Cpu).block, Some((512, 512)));
}

#[test]
fn lowered_tpu_modules_and_device_buffer_runs() {
    use torchtpu_kernels::{flash, matmul};
    use torchtpu_runtime::Chip;
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 2, q_len: 1024, kv_len: 1024, head_dim: 128 };
    let opts = AttentionOptions { causal: true, sm_scale: None, block: None, ..Default::default() };
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let fwd = flash::forward_tpu_module(shape, torchtpu_dsl::DType::BF16, opts, true, Chip::V6e).expect("lowers");
    assert!(fwd.text.contains("tpu_custom_call"));
    compiler.compile(Chip::V6e, &fwd.text).expect("the forward module compiles");
    let (dkv, dq) = flash::backward_tpu_modules(shape, torchtpu_dsl::DType::BF16, opts, true, Chip::V6e).expect("lowers");
    compiler.compile(Chip::V6e, &dkv.artifact).expect("dK/dV compiles");
    compiler.compile(Chip::V6e, &dq.artifact).expect("dQ compiles");
    let m = matmul::MatmulShape { batch: None, m: 1024, n: 1024, k: 1024 };
    compiler.compile(Chip::V5e, &matmul::tpu_module(m, torchtpu_dsl::DType::BF16, Default::default(), Chip::V5e).expect("lowers").text).expect("compiles");

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
    for (&x, &y) in got.iter().zip(want.iter()) {
        approx::assert_relative_eq!(x, y, epsilon = 1e-4, max_relative = 1e-4);
    }
}
