//! Our kernels on the PJRT CPU plugin against XLA's own ops written directly in StableHLO,
//! and against the interpreter, side by side: 1024³ f32 matmul, and causal flash attention
//! 1×8×2048×128 f32. Each kernel runs at several block shapes; the best is the comparison.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::{client, upload, Backend, Compiled};
use torchtpu_testkernels::{flash::Flash, matmul::Matmul, relative_error, Example};

const XLA_DOT: &str = r#"module @xla_dot {
  func.func public @main(%a: tensor<1024x1024xf32>, %b: tensor<1024x1024xf32>) -> tensor<1024x1024xf32> {
    %0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : (tensor<1024x1024xf32>, tensor<1024x1024xf32>) -> tensor<1024x1024xf32>
    return %0 : tensor<1024x1024xf32>
  }
}"#;

/// Plain causal attention: scores, mask, softmax, weighted sum; XLA fuses what it can.
const XLA_ATTENTION: &str = r#"module @xla_attention {
  func.func public @main(%q: tensor<1x8x2048x128xf32>, %k: tensor<1x8x2048x128xf32>, %v: tensor<1x8x2048x128xf32>) -> tensor<1x8x2048x128xf32> {
    %s = stablehlo.dot_general %q, %k, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [3] : (tensor<1x8x2048x128xf32>, tensor<1x8x2048x128xf32>) -> tensor<1x8x2048x2048xf32>
    %scale = stablehlo.constant dense<0.0883883461> : tensor<1x8x2048x2048xf32>
    %ss = stablehlo.multiply %s, %scale : tensor<1x8x2048x2048xf32>
    %row = stablehlo.iota dim = 2 : tensor<1x8x2048x2048xi32>
    %col = stablehlo.iota dim = 3 : tensor<1x8x2048x2048xi32>
    %visible = stablehlo.compare GE, %row, %col, SIGNED : (tensor<1x8x2048x2048xi32>, tensor<1x8x2048x2048xi32>) -> tensor<1x8x2048x2048xi1>
    %neg = stablehlo.constant dense<-2.38197633e+38> : tensor<1x8x2048x2048xf32>
    %masked = stablehlo.select %visible, %ss, %neg : tensor<1x8x2048x2048xi1>, tensor<1x8x2048x2048xf32>
    %ninf = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %mx = stablehlo.reduce(%masked init: %ninf) applies stablehlo.maximum across dimensions = [3] : (tensor<1x8x2048x2048xf32>, tensor<f32>) -> tensor<1x8x2048xf32>
    %mxb = stablehlo.broadcast_in_dim %mx, dims = [0, 1, 2] : (tensor<1x8x2048xf32>) -> tensor<1x8x2048x2048xf32>
    %shifted = stablehlo.subtract %masked, %mxb : tensor<1x8x2048x2048xf32>
    %e = stablehlo.exponential %shifted : tensor<1x8x2048x2048xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%e init: %zero) applies stablehlo.add across dimensions = [3] : (tensor<1x8x2048x2048xf32>, tensor<f32>) -> tensor<1x8x2048xf32>
    %sumb = stablehlo.broadcast_in_dim %sum, dims = [0, 1, 2] : (tensor<1x8x2048xf32>) -> tensor<1x8x2048x2048xf32>
    %p = stablehlo.divide %e, %sumb : tensor<1x8x2048x2048xf32>
    %o = stablehlo.dot_general %p, %v, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [2] : (tensor<1x8x2048x2048xf32>, tensor<1x8x2048x128xf32>) -> tensor<1x8x2048x128xf32>
    return %o : tensor<1x8x2048x128xf32>
  }
}"#;

fn compare(c: &mut Criterion, group: &str, xla: &str, candidates: Vec<(String, Box<dyn Example>)>, interpret_best: bool) {
    let cpu = client(Backend::Cpu).expect("the PJRT CPU plugin (run scripts/setup.sh)");
    let inputs = candidates[0].1.random_inputs(&mut StdRng::seed_from_u64(0));
    let buffers: Vec<_> = inputs.iter().map(|a| upload(&cpu, a).expect("uploads")).collect();
    let refs: Vec<_> = buffers.iter().collect();
    let xla_exe = cpu.compile(xla).expect("XLA module compiles");
    let reference = candidates[0].1.reference(&inputs);
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.bench_function("xla", |b| b.iter(|| xla_exe.execute(&refs).expect("runs")));
    for (name, example) in &candidates {
        let types: Vec<_> = inputs.iter().map(HostArray::value_type).collect();
        let compiled = Compiled::new(&example.call().trace(&types).expect("traces"), Backend::Cpu).expect("compiles");
        let out = compiled.run(&inputs).expect("runs");
        let err = relative_error(&out[0], &reference[0]);
        assert!(err < 1e-4, "{name}: relative error {err:e} against the f64 reference");
        g.bench_function(format!("torchtpu/{name}"), |b| b.iter(|| compiled.execute(&buffers).expect("runs")));
    }
    if interpret_best {
        let call = candidates[0].1.call();
        g.bench_function(format!("interpreter/{}", candidates[0].0), |b| b.iter(|| call.interpret(&inputs).expect("runs")));
    }
    g.finish();
}

fn pjrt_cpu(c: &mut Criterion) {
    let matmul = |b: (usize, usize, usize)| -> (String, Box<dyn Example>) {
        (format!("b{}x{}x{}", b.0, b.1, b.2), Box::new(Matmul { m: 1024, n: 1024, k: 1024, block: b, dtype: DType::F32 }))
    };
    compare(
        c,
        "pjrt_cpu/matmul_1024_f32",
        XLA_DOT,
        vec![matmul((1024, 1024, 1024)), matmul((512, 512, 1024)), matmul((256, 256, 1024)), matmul((256, 256, 256)), matmul((128, 128, 128))],
        true,
    );
    let flash = |bq: usize, bk: usize| -> (String, Box<dyn Example>) {
        (format!("bq{bq}bk{bk}"), Box::new(Flash { batch: 1, heads: 8, seq: 2048, head_dim: 128, block_q: bq, block_k: bk, dtype: DType::F32 }))
    };
    compare(c, "pjrt_cpu/flash_causal_1x8x2048x128_f32", XLA_ATTENTION, vec![flash(512, 512), flash(256, 512), flash(512, 1024), flash(256, 256), flash(128, 128)], true);
}

criterion_group!(benches, pjrt_cpu);
criterion_main!(benches);
