//! The CPU interpreter on the two problems: a 512³ f32 matmul with 128³ blocks, and
//! causal flash attention at batch 1, 4 heads, sequence 1024, head dim 128. Beside them,
//! ndarray's own `dot` on the same matmul: the bar a whole-array BLAS-like call sets.

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Ix2;
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_dsl::{DType, InterpretOptions};
use torchtpu_testkernels::{flash::Flash, matmul::Matmul, Example};

fn interpreter(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("interpret");
    group.sample_size(20);

    let matmul = Matmul { m: 512, n: 512, k: 512, block: (128, 128, 128), dtype: DType::F32 };
    let inputs = matmul.random_inputs(&mut rng);
    let call = matmul.call();
    let traced = call.trace(&inputs.iter().map(|a| a.value_type()).collect::<Vec<_>>()).expect("traces");
    group.bench_function("matmul_512_f32_b128/trace+run", |b| b.iter(|| call.interpret(&inputs).expect("runs")));
    group.bench_function("matmul_512_f32_b128/run", |b| b.iter(|| traced.interpret(&inputs, InterpretOptions::default()).expect("runs")));
    let (x, y) = (inputs[0].to_f64().mapv(|v| v as f32), inputs[1].to_f64().mapv(|v| v as f32));
    let (x, y) = (x.into_dimensionality::<Ix2>().expect("2-D"), y.into_dimensionality::<Ix2>().expect("2-D"));
    group.bench_function("matmul_512_f32/ndarray_dot", |b| b.iter(|| x.dot(&y)));

    let flash = Flash { batch: 1, heads: 4, seq: 1024, head_dim: 128, block_q: 128, block_k: 128, dtype: DType::F32 };
    let inputs = flash.random_inputs(&mut rng);
    let call = flash.call();
    group.bench_function("flash_causal_1x4x1024x128_f32_b128/trace+run", |b| b.iter(|| call.interpret(&inputs).expect("runs")));
    group.finish();
}

criterion_group!(benches, interpreter);
criterion_main!(benches);
