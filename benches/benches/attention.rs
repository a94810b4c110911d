//! Flash attention forward and backward on the PJRT CPU plugin, 1×8×2048×128 causal f32,
//! against plain attention (and its gradient) written directly in StableHLO, and the
//! interpreter; with achieved FLOP/s against this machine's practical peak (XLA's own
//! 2048³ f32 dot). Prints a summary after the criterion groups.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::Array3;
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::{client, upload, Backend, Compiled};
use torchtpu_kernels::flash::{backward_call, forward_call, with_tuned_backward_blocks, with_tuned_block, AttentionOptions, AttentionShape, FlashPass};

const SHAPE: AttentionShape = AttentionShape { batch: 1, heads: 8, kv_heads: 8, q_len: 2048, kv_len: 2048, head_dim: 128 };
const T: &str = "tensor<1x8x2048x128xf32>";
const S: &str = "tensor<1x8x2048x2048xf32>";

/// Causal softmax(QKᵀ·scale)·V and, when `grad`, its gradients from dO, in StableHLO.
fn xla_attention(grad: bool) -> String {
    let head = format!(
        r#"    %s0 = stablehlo.dot_general %q, %k, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [3] : ({T}, {T}) -> {S}
    %scale = stablehlo.constant dense<0.0883883461> : {S}
    %s = stablehlo.multiply %s0, %scale : {S}
    %row = stablehlo.iota dim = 2 : tensor<1x8x2048x2048xi32>
    %col = stablehlo.iota dim = 3 : tensor<1x8x2048x2048xi32>
    %vis = stablehlo.compare GE, %row, %col, SIGNED : (tensor<1x8x2048x2048xi32>, tensor<1x8x2048x2048xi32>) -> tensor<1x8x2048x2048xi1>
    %neg = stablehlo.constant dense<-2.38197633e+38> : {S}
    %ms = stablehlo.select %vis, %s, %neg : tensor<1x8x2048x2048xi1>, {S}
    %ninf = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %mx = stablehlo.reduce(%ms init: %ninf) applies stablehlo.maximum across dimensions = [3] : ({S}, tensor<f32>) -> tensor<1x8x2048xf32>
    %mxb = stablehlo.broadcast_in_dim %mx, dims = [0, 1, 2] : (tensor<1x8x2048xf32>) -> {S}
    %sh = stablehlo.subtract %ms, %mxb : {S}
    %e = stablehlo.exponential %sh : {S}
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%e init: %zero) applies stablehlo.add across dimensions = [3] : ({S}, tensor<f32>) -> tensor<1x8x2048xf32>
    %sumb = stablehlo.broadcast_in_dim %sum, dims = [0, 1, 2] : (tensor<1x8x2048xf32>) -> {S}
    %p = stablehlo.divide %e, %sumb : {S}
"#
    );
    if !grad {
        return format!(
            "module @xla_attention {{\n  func.func public @main(%q: {T}, %k: {T}, %v: {T}) -> {T} {{\n{head}    %o = stablehlo.dot_general %p, %v, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [2] : ({S}, {T}) -> {T}\n    return %o : {T}\n  }}\n}}\n"
        );
    }
    format!(
        r#"module @xla_attention_grad {{
  func.func public @main(%q: {T}, %k: {T}, %v: {T}, %do: {T}) -> ({T}, {T}, {T}) {{
{head}    %dv = stablehlo.dot_general %p, %do, batching_dims = [0, 1] x [0, 1], contracting_dims = [2] x [2] : ({S}, {T}) -> {T}
    %dp = stablehlo.dot_general %do, %v, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [3] : ({T}, {T}) -> {S}
    %pdp = stablehlo.multiply %p, %dp : {S}
    %di = stablehlo.reduce(%pdp init: %zero) applies stablehlo.add across dimensions = [3] : ({S}, tensor<f32>) -> tensor<1x8x2048xf32>
    %dib = stablehlo.broadcast_in_dim %di, dims = [0, 1, 2] : (tensor<1x8x2048xf32>) -> {S}
    %dpc = stablehlo.subtract %dp, %dib : {S}
    %ds0 = stablehlo.multiply %p, %dpc : {S}
    %ds = stablehlo.multiply %ds0, %scale : {S}
    %dq = stablehlo.dot_general %ds, %k, batching_dims = [0, 1] x [0, 1], contracting_dims = [3] x [2] : ({S}, {T}) -> {T}
    %dk = stablehlo.dot_general %ds, %q, batching_dims = [0, 1] x [0, 1], contracting_dims = [2] x [2] : ({S}, {T}) -> {T}
    return %dq, %dk, %dv : {T}, {T}, {T}
  }}
}}
"#
    )
}

fn peak_flops() -> f64 {
    let n = 2048;
    let module = format!(
        "module @peak {{\n  func.func public @main(%a: tensor<{n}x{n}xf32>, %b: tensor<{n}x{n}xf32>) -> tensor<{n}x{n}xf32> {{\n    %0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : (tensor<{n}x{n}xf32>, tensor<{n}x{n}xf32>) -> tensor<{n}x{n}xf32>\n    return %0 : tensor<{n}x{n}xf32>\n  }}\n}}"
    );
    let c = client(Backend::Cpu).expect("CPU plugin");
    let exe = c.compile(&module).expect("compiles");
    let x = HostArray::from(ndarray::Array2::<f32>::ones((n, n)));
    let (a, b) = (upload(&c, &x).expect("uploads"), upload(&c, &x).expect("uploads"));
    exe.execute(&[&a, &b]).expect("runs");
    let t = Instant::now();
    for _ in 0..3 {
        exe.execute(&[&a, &b]).expect("runs");
    }
    2.0 * (n as f64).powi(3) * 3.0 / t.elapsed().as_secs_f64()
}

fn attention(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let arr = |rng: &mut StdRng| {
        HostArray::from_f64(DType::F32, &ndarray::ArrayD::from_shape_simple_fn(vec![1, 8, 2048, 128], || rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng)))
    };
    let (q, k, v, d_o) = (arr(&mut rng), arr(&mut rng), arr(&mut rng), arr(&mut rng));
    let seg = [HostArray::from(Array3::<i32>::zeros((1, 2048, 128))), HostArray::from(Array3::<i32>::zeros((1, 8, 2048)))];
    let untuned = AttentionOptions { causal: true, sm_scale: None, block: None, ..Default::default() };
    let opts = with_tuned_block(SHAPE, DType::F32, untuned, Backend::Cpu);
    let (dkv_opts, dq_opts) = with_tuned_backward_blocks(SHAPE, DType::F32, untuned, Backend::Cpu);
    let fwd = forward_call(SHAPE, DType::F32, opts, false).expect("forward");
    let fwd_ops = vec![q.clone(), k.clone(), v.clone(), seg[0].clone(), seg[1].clone()];
    let types = |ops: &[HostArray]| ops.iter().map(HostArray::value_type).collect::<Vec<_>>();
    let fwd_c = Compiled::new(&fwd.trace(&types(&fwd_ops)).expect("traces"), Backend::Cpu).expect("compiles");
    let out = fwd_c.run(&fwd_ops).expect("runs");
    let lse = out[1].clone();
    let dkv = backward_call(FlashPass::BackwardDkv, SHAPE, DType::F32, dkv_opts, false).expect("backward dK/dV");
    let dq = backward_call(FlashPass::BackwardDq, SHAPE, DType::F32, dq_opts, false).expect("backward dQ");
    let bwd_ops = vec![q.clone(), k.clone(), v.clone(), out[0].clone(), d_o.clone(), lse, seg[0].clone(), seg[1].clone()];
    let dkv_c = Compiled::new(&dkv.trace(&types(&bwd_ops)).expect("traces"), Backend::Cpu).expect("compiles");
    let dq_c = Compiled::new(&dq.trace(&types(&bwd_ops)).expect("traces"), Backend::Cpu).expect("compiles");
    let cpu = client(Backend::Cpu).expect("CPU plugin");
    let xf = cpu.compile(&xla_attention(false)).expect("XLA forward compiles");
    let xg = cpu.compile(&xla_attention(true)).expect("XLA gradient compiles");
    let fwd_b = fwd_c.upload(&fwd_ops).expect("uploads");
    let bwd_b = dkv_c.upload(&bwd_ops).expect("uploads");
    let xla_in: Vec<_> = [&q, &k, &v, &d_o].iter().map(|a| upload(&cpu, a).expect("uploads")).collect();

    let mut g = c.benchmark_group("attention_1x8x2048x128_causal_f32");
    g.sample_size(10);
    g.bench_function(format!("torchtpu_forward_{:?}", opts.block), |b| b.iter(|| fwd_c.execute(&fwd_b).expect("runs")));
    g.bench_function("xla_forward", |b| b.iter(|| xf.execute(&[&xla_in[0], &xla_in[1], &xla_in[2]]).expect("runs")));
    g.bench_function(format!("torchtpu_backward_dkv{:?}_dq{:?}", dkv_opts.block, dq_opts.block), |b| {
        b.iter(|| (dkv_c.execute(&bwd_b).expect("runs"), dq_c.execute(&bwd_b).expect("runs")))
    });
    g.bench_function("xla_backward_with_forward", |b| b.iter(|| xg.execute(&[&xla_in[0], &xla_in[1], &xla_in[2], &xla_in[3]]).expect("runs")));
    g.bench_function("interpreter_forward", |b| b.iter(|| fwd.interpret(&fwd_ops).expect("runs")));
    g.finish();

    // FLOP/s: causal attention does half the dense work: fwd 2 matmuls, bwd 5 (dq, dk, dv, dp, and s recomputed).
    let dense = 2.0 * 2048.0 * 2048.0 * 128.0 * 8.0;
    let time = |f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..3 {
            f();
        }
        t.elapsed().as_secs_f64() / 3.0
    };
    let peak = peak_flops();
    let tf = time(&|| {
        fwd_c.execute(&fwd_b).expect("runs");
    });
    let tb = time(&|| {
        dkv_c.execute(&bwd_b).expect("runs");
        dq_c.execute(&bwd_b).expect("runs");
    });
    let (ff, fb) = (2.0 * dense / 2.0, 5.0 * dense / 2.0);
    println!(
        "attention 1x8x2048x128 causal f32, blocks {:?}: forward {:.1} ms = {:.1} GFLOP/s, backward {:.1} ms = {:.1} GFLOP/s; machine practical peak (XLA 2048^3 dot) {:.1} GFLOP/s: forward {:.0}%, backward {:.0}% of it",
        opts.block,
        tf * 1e3,
        ff / tf / 1e9,
        tb * 1e3,
        fb / tb / 1e9,
        peak / 1e9,
        100.0 * ff / tf / peak,
        100.0 * fb / tb / peak
    );
}

criterion_group!(benches, attention);
criterion_main!(benches);
