//! Flash attention gradients: the f64 reference is checked by finite differences, then the
//! dK/dV and dQ kernels against it (interpreter, checked mode, PJRT CPU), on fresh random
//! inputs with causal masks, GQA, segment ids, ragged and unequal lengths, f32 and bf16.

use ndarray::{Array2, ArrayD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::flash::{backward, backward_calls, backward_tpu_modules, forward, reference, reference_backward, AttentionOptions, AttentionShape};
use torchtpu_runtime::{Chip, TpuCompiler};

fn normal(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng))
}

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

#[test]
fn the_f64_reference_gradients_agree_with_finite_differences() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (q, k, v, d_o) = (normal(&mut rng, &[1, 2, 5, 3]), normal(&mut rng, &[1, 1, 6, 3]), normal(&mut rng, &[1, 1, 6, 3]), normal(&mut rng, &[1, 2, 5, 3]));
    let qs = Array2::from_shape_vec((1, 5), vec![0, 0, 1, 1, 1]).expect("ids");
    let ks = Array2::from_shape_vec((1, 6), vec![0, 0, 0, 1, 1, 1]).expect("ids");
    let seg = Some((&qs, &ks));
    let scale = 0.7;
    let loss = |q: &ArrayD<f64>, k: &ArrayD<f64>, v: &ArrayD<f64>| reference(q, k, v, seg, true, scale).0.iter().zip(d_o.iter()).map(|(a, b)| a * b).sum::<f64>();
    let (dq, dk, dv) = reference_backward(&q, &k, &v, &d_o, seg, true, scale);
    let h = 1e-6;
    let fd = |which: usize, ix: &[usize]| {
        let (mut plus, mut minus) = ([q.clone(), k.clone(), v.clone()], [q.clone(), k.clone(), v.clone()]);
        plus[which][ix] += h;
        minus[which][ix] -= h;
        (loss(&plus[0], &plus[1], &plus[2]) - loss(&minus[0], &minus[1], &minus[2])) / (2.0 * h)
    };
    for ix in [[0, 0, 0, 0], [0, 1, 3, 2], [0, 1, 4, 1]] {
        assert!(approx::abs_diff_eq!(fd(0, &ix), dq[ix], epsilon = 1e-6), "dq{ix:?}: {} vs {}", fd(0, &ix), dq[ix]);
    }
    for ix in [[0, 0, 0, 0], [0, 0, 4, 2], [0, 0, 5, 1]] {
        assert!(approx::abs_diff_eq!(fd(1, &ix), dk[ix], epsilon = 1e-6), "dk{ix:?}: {} vs {}", fd(1, &ix), dk[ix]);
        assert!(approx::abs_diff_eq!(fd(2, &ix), dv[ix], epsilon = 1e-6), "dv{ix:?}: {} vs {}", fd(2, &ix), dv[ix]);
    }
}

struct Case {
    shape: AttentionShape,
    causal: bool,
    segments: bool,
    dtype: DType,
    block: Option<(usize, usize)>,
}

fn check(case: &Case, backend: Backend, seed: u64) {
    let s = case.shape;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut arr = |shape: &[usize]| HostArray::from_f64(case.dtype, &normal(&mut rng, shape));
    let (q, k, v, d_o) = (
        arr(&[s.batch, s.heads, s.q_len, s.head_dim]),
        arr(&[s.batch, s.kv_heads, s.kv_len, s.head_dim]),
        arr(&[s.batch, s.kv_heads, s.kv_len, s.head_dim]),
        arr(&[s.batch, s.heads, s.q_len, s.head_dim]),
    );
    let seg = case.segments.then(|| {
        let ids = |len: usize| Array2::from_shape_fn((s.batch, len), |(_, i)| (i / 37) as i32);
        (ids(s.q_len), ids(s.kv_len))
    });
    let seg = seg.as_ref().map(|(a, b)| (a, b));
    let opts = AttentionOptions { causal: case.causal, sm_scale: None, block: case.block, ..Default::default() };
    let (o, lse) = forward(&q, &k, &v, seg, opts, backend).expect("forward");
    let (dq, dk, dv) = backward(&q, &k, &v, &o, &lse, &d_o, seg, opts, backend).unwrap_or_else(|e| panic!("{s:?} on {backend}: {e}"));
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let want = reference_backward(&q.to_f64(), &k.to_f64(), &v.to_f64(), &d_o.to_f64(), seg, case.causal, scale);
    let tol = if case.dtype == DType::BF16 { 5e-2 } else { 1e-4 };
    for (name, got, want) in [("dq", &dq, want.0.into_dyn()), ("dk", &dk, want.1.into_dyn()), ("dv", &dv, want.2.into_dyn())] {
        let peak = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = got.to_f64().iter().zip(want.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / peak;
        assert!(err <= tol, "{name} for {s:?} causal={} segments={} {} on {backend} (seed {seed}): {err:e} > {tol:e}", case.causal, case.segments, case.dtype);
    }
}

fn cases() -> Vec<Case> {
    let shape = |batch, heads, kv_heads, q_len, kv_len, head_dim| AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim };
    vec![
        Case { shape: shape(1, 2, 2, 128, 128, 32), causal: true, segments: false, dtype: DType::F32, block: Some((64, 32)) },
        Case { shape: shape(2, 4, 2, 100, 70, 16), causal: false, segments: false, dtype: DType::F32, block: Some((32, 64)) },
        Case { shape: shape(1, 4, 1, 90, 90, 32), causal: true, segments: true, dtype: DType::F32, block: Some((32, 32)) },
        Case { shape: shape(1, 2, 1, 64, 96, 32), causal: true, segments: false, dtype: DType::BF16, block: Some((32, 32)) },
        // Causal, more queries than keys, ragged, kv blocks narrower than q blocks.
        Case { shape: shape(1, 2, 1, 100, 70, 16), causal: true, segments: false, dtype: DType::F32, block: Some((48, 16)) },
    ]
}

#[test]
fn backward_matches_the_reference_on_the_interpreter_and_pjrt_cpu() {
    let seed = seed();
    for case in cases() {
        check(&case, Backend::Interpret, seed);
        check(&case, Backend::Cpu, seed);
    }
}

#[test]
fn backward_passes_the_interpreters_checked_mode() {
    let s = AttentionShape { batch: 1, heads: 2, kv_heads: 1, q_len: 50, kv_len: 70, head_dim: 16 };
    let (dkv, dq) = backward_calls(s, DType::F32, AttentionOptions { causal: true, sm_scale: None, block: Some((32, 32)), ..Default::default() }, false).expect("calls");
    let mut rng = StdRng::seed_from_u64(seed());
    let mut arr = |shape: &[usize]| HostArray::from_f64(DType::F32, &normal(&mut rng, shape));
    let operands = vec![
        arr(&[1, 2, 50, 16]),
        arr(&[1, 1, 70, 16]),
        arr(&[1, 1, 70, 16]),
        arr(&[1, 2, 50, 16]),
        arr(&[1, 2, 50, 16]),
        arr(&[1, 2, 50, 1]),
        HostArray::from(ndarray::Array3::<i32>::zeros((1, 50, 128))),
        HostArray::from(ndarray::Array3::<i32>::zeros((1, 8, 70))),
        HostArray::from(ndarray::Array4::<f32>::zeros((1, 1, 8, 128))),
        HostArray::from(ndarray::Array2::<i32>::zeros((8, 128))),
    ];
    for call in [dkv, dq] {
        let out = call.interpret_checked(&operands).expect("no uninitialized reads");
        assert!(out.iter().all(|o| o.to_f64().iter().all(|x| x.is_finite())), "NaN padding leaked into a gradient");
    }
}

#[test]
fn backward_compiles_with_libtpu_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let mut failures = Vec::new();
    for (shape, dtype, block, causal, segs) in [
        (AttentionShape { batch: 1, heads: 8, kv_heads: 2, q_len: 2048, kv_len: 2048, head_dim: 128 }, DType::BF16, (256, 256), true, true),
        (AttentionShape { batch: 2, heads: 4, kv_heads: 4, q_len: 1000, kv_len: 777, head_dim: 64 }, DType::F32, (128, 128), false, false),
    ] {
        // An explicit block within every chip's default scoped VMEM (no limit to set): the
        // modules are the same whichever chip they are lowered for.
        let opts = AttentionOptions { causal, sm_scale: None, block: Some(block), ..Default::default() };
        let (dkv, dq) = backward_tpu_modules(shape, dtype, opts, segs, Chip::V5e).expect("lowers");
        for (name, module) in [("dkv text", dkv.text.as_bytes()), ("dkv artifact", &dkv.artifact), ("dq text", dq.text.as_bytes()), ("dq artifact", &dq.artifact)] {
            for chip in Chip::ALL {
                if let Err(e) = compiler.compile(chip, module) {
                    failures.push(format!("{name} {shape:?} {dtype} on {chip}: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
