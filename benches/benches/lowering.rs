//! Trace + lower to a StableHLO `tpu_custom_call` (stable Mosaic body), for the kernels and
//! blocks of the JAX reference modules: bf16 matmul 1024³ with 256³ blocks, and causal flash
//! attention 1×2×512×128 f32 with 128 blocks. Then the same modules through libtpu for v5e.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_runtime::{Chip, TpuCompiler};
use torchtpu_testkernels::{flash::Flash, matmul::Matmul, Example};

fn lowering(c: &mut Criterion) {
    let examples: [(&str, Box<dyn Example>); 2] = [
        ("matmul_bf16_1024_b256", Box::new(Matmul { m: 1024, n: 1024, k: 1024, block: (256, 256, 256), dtype: DType::BF16 })),
        ("flash_causal_1x2x512x128_f32_b128", Box::new(Flash { batch: 1, heads: 2, seq: 512, head_dim: 128, block_q: 128, block_k: 128, dtype: DType::F32 })),
    ];
    let compiler = TpuCompiler::shared().ok();
    let mut group = c.benchmark_group("lower");
    for (name, example) in &examples {
        let types: Vec<_> = example.random_inputs(&mut StdRng::seed_from_u64(0)).iter().map(HostArray::value_type).collect();
        let call = example.call();
        group.bench_function(format!("{name}/trace+lower"), |b| b.iter(|| lower(&call.trace(&types).expect("traces"), Target::TpuStableHlo).expect("lowers")));
        if let Some(compiler) = compiler {
            let module = lower(&call.trace(&types).expect("traces"), Target::TpuStableHlo).expect("lowers");
            group.bench_function(format!("{name}/libtpu_compile_v5e"), |b| b.iter(|| compiler.compile(Chip::V5e, &module).expect("compiles")));
        }
    }
    group.finish();
}

criterion_group!(benches, lowering);
criterion_main!(benches);
