//! Flash attention forward against the independent f64 reference, on fresh random inputs:
//! causal and not, GQA and MQA, segment ids, ragged and unequal lengths, batch 1, f32 and
//! bf16; on the interpreter (also in checked mode) and the PJRT CPU plugin; and compiled by
//! libtpu for every chip.

use ndarray::{Array2, ArrayD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::flash::{forward, forward_call, forward_tpu_module, reference, AttentionOptions, AttentionShape, FlashConfig, FlashOp, FlashPass, FlashProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

struct Case {
    shape: AttentionShape,
    causal: bool,
    segments: bool,
    dtype: DType,
    block: Option<(usize, usize)>,
}

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    HostArray::from_f64(dtype, &ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng)))
}

/// Packed documents: ids that step up at random positions (the same sequence for q and kv
/// when the lengths agree, so a causal mask and the segments combine as in packed training).
fn segments(rng: &mut StdRng, batch: usize, len: usize) -> Array2<i32> {
    let mut ids = Array2::zeros((batch, len));
    for b in 0..batch {
        let mut id = 0;
        for i in 0..len {
            if i > 0 && rng.random_bool(0.03) {
                id += 1;
            }
            ids[[b, i]] = id;
        }
    }
    ids
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        3e-2
    } else {
        5e-5
    }
}

fn check(case: &Case, backend: Backend, seed: u64) {
    let s = case.shape;
    let mut rng = StdRng::seed_from_u64(seed);
    let q = random(&mut rng, case.dtype, &[s.batch, s.heads, s.q_len, s.head_dim]);
    let k = random(&mut rng, case.dtype, &[s.batch, s.kv_heads, s.kv_len, s.head_dim]);
    let v = random(&mut rng, case.dtype, &[s.batch, s.kv_heads, s.kv_len, s.head_dim]);
    let seg = case.segments.then(|| {
        let qs = segments(&mut rng, s.batch, s.q_len);
        let ks = if s.q_len == s.kv_len { qs.clone() } else { segments(&mut rng, s.batch, s.kv_len) };
        (qs, ks)
    });
    let seg_refs = seg.as_ref().map(|(a, b)| (a, b));
    let opts = AttentionOptions { causal: case.causal, sm_scale: None, block: case.block, ..Default::default() };
    let (o, lse) = forward(&q, &k, &v, seg_refs, opts, backend).unwrap_or_else(|e| panic!("{:?} on {backend}: {e}", s));
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let (want_o, want_lse) = reference(&q.to_f64(), &k.to_f64(), &v.to_f64(), seg_refs, case.causal, scale);
    let got = o.to_f64();
    let peak = want_o.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let err = got.iter().zip(want_o.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / peak;
    let tol = tolerance(case.dtype);
    assert!(err <= tol, "{s:?} causal={} segments={} {} on {backend} (seed {seed}): output error {err:e} > {tol:e}", case.causal, case.segments, case.dtype);
    for (g, w) in lse.iter().zip(want_lse.iter()) {
        if w.is_infinite() {
            assert!(g.is_infinite() && *g < 0.0, "{s:?}: lse {g} where no key is visible");
        } else {
            assert!(((*g as f64) - w).abs() <= tol * w.abs().max(1.0), "{s:?} on {backend} (seed {seed}): lse {g} vs {w}");
        }
    }
}

fn cases() -> Vec<Case> {
    let shape = |batch, heads, kv_heads, q_len, kv_len, head_dim| AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim };
    vec![
        Case { shape: shape(1, 2, 2, 256, 256, 64), causal: true, segments: false, dtype: DType::F32, block: Some((128, 128)) },
        Case { shape: shape(2, 4, 2, 200, 136, 32), causal: false, segments: false, dtype: DType::F32, block: Some((64, 64)) },
        Case { shape: shape(2, 4, 1, 130, 130, 32), causal: true, segments: true, dtype: DType::BF16, block: Some((64, 128)) },
        Case { shape: shape(1, 2, 2, 100, 300, 64), causal: true, segments: false, dtype: DType::F32, block: None },
        Case { shape: shape(1, 1, 1, 1, 40, 16), causal: false, segments: true, dtype: DType::F32, block: None },
        Case { shape: shape(2, 2, 2, 96, 96, 64), causal: false, segments: true, dtype: DType::BF16, block: Some((32, 32)) },
        // Causal, more queries than keys, ragged, kv blocks narrower than q blocks.
        Case { shape: shape(1, 2, 1, 100, 70, 16), causal: true, segments: false, dtype: DType::F32, block: Some((48, 16)) },
    ]
}

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

#[test]
fn forward_matches_the_reference_on_the_interpreter() {
    let seed = seed();
    for case in cases() {
        check(&case, Backend::Interpret, seed);
    }
}

#[test]
fn forward_matches_the_reference_on_pjrt_cpu() {
    let seed = seed();
    for case in cases() {
        check(&case, Backend::Cpu, seed);
    }
}

#[test]
fn forward_passes_the_interpreters_checked_mode() {
    // Checked mode poisons padding with NaN: ragged kv blocks must be fully masked.
    let s = AttentionShape { batch: 1, heads: 2, kv_heads: 1, q_len: 70, kv_len: 90, head_dim: 32 };
    let call = forward_call(s, DType::F32, AttentionOptions { causal: false, sm_scale: None, block: Some((32, 64)), ..Default::default() }, false).expect("call");
    let mut rng = StdRng::seed_from_u64(seed());
    let operands = vec![
        random(&mut rng, DType::F32, &[1, 2, 70, 32]),
        random(&mut rng, DType::F32, &[1, 1, 90, 32]),
        random(&mut rng, DType::F32, &[1, 1, 90, 32]),
        HostArray::from(ndarray::Array3::<i32>::zeros((1, 70, 128))),
        HostArray::from(ndarray::Array3::<i32>::zeros((1, 8, 90))),
        HostArray::from(ndarray::Array4::<f32>::zeros((1, 1, 8, 128))),
        HostArray::from(ndarray::Array2::<i32>::zeros((8, 128))),
    ];
    let out = call.interpret_checked(&operands).expect("no uninitialized reads");
    assert!(out[0].to_f64().iter().all(|x| x.is_finite()));
}

#[test]
fn bad_shapes_are_clear_errors() {
    let z = |shape: &[usize]| HostArray::from(ArrayD::<f32>::zeros(shape.to_vec()));
    let err = forward(&z(&[1, 3, 8, 16]), &z(&[1, 2, 8, 16]), &z(&[1, 2, 8, 16]), None, AttentionOptions::default(), Backend::Interpret).expect_err("3 heads over 2");
    assert!(err.to_string().contains("multiple of k/v heads"), "{err}");
    let err = forward(&z(&[1, 2, 8, 16]), &z(&[1, 2, 8, 32]), &z(&[1, 2, 8, 32]), None, AttentionOptions::default(), Backend::Interpret).expect_err("head dims");
    assert!(err.to_string().contains("head_dim"), "{err}");
    let err = forward(&z(&[2, 8, 16]), &z(&[1, 2, 8, 16]), &z(&[1, 2, 8, 16]), None, AttentionOptions::default(), Backend::Interpret).expect_err("rank");
    assert!(err.to_string().contains("[batch, heads, seq, head_dim]"), "{err}");
}

#[test]
fn forward_compiles_with_libtpu_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let mut failures = Vec::new();
    for (shape, dtype, block, causal, segs) in [
        (AttentionShape { batch: 1, heads: 8, kv_heads: 2, q_len: 2048, kv_len: 2048, head_dim: 128 }, DType::BF16, (512, 512), true, true),
        (AttentionShape { batch: 2, heads: 4, kv_heads: 4, q_len: 1000, kv_len: 777, head_dim: 64 }, DType::F32, (256, 128), false, false),
        (AttentionShape { batch: 1, heads: 2, kv_heads: 1, q_len: 128, kv_len: 4096, head_dim: 128 }, DType::BF16, (128, 1024), true, false),
    ] {
        // An explicit block within every chip's default scoped VMEM (no limit to set): the
        // module is the same whichever chip it is lowered for.
        let module = forward_tpu_module(shape, dtype, AttentionOptions { causal, sm_scale: None, block: Some(block), ..Default::default() }, segs, Chip::V5e).expect("lowers");
        for chip in Chip::ALL {
            // Both forms: the text `lower` prints and the artifact TorchTPU is given.
            for (form, code) in [("text", module.text.as_bytes()), ("artifact", &module.artifact)] {
                if let Err(e) = compiler.compile(chip, code) {
                    failures.push(format!("{shape:?} {dtype} {form} on {chip}: {e}"));
                }
            }
        }
    }
    // 2048-wide kv blocks computed 512 keys at a time: they fit even v4's VMEM.
    let forward = FlashOp(FlashPass::Forward);
    let shape = AttentionShape { batch: 1, heads: 2, kv_heads: 2, q_len: 8192, kv_len: 8192, head_dim: 128 };
    let p = FlashProblem { causal: true, ..FlashProblem::plain(shape, DType::BF16) };
    for chip in Chip::ALL {
        let module = op::tpu_module(&forward, &p, Some(&FlashConfig { bq: 1024, bk: 2048, bkc: 512 }), chip).expect("lowers");
        if let Err(e) = compiler.compile(chip, &module.artifact) {
            failures.push(format!("sub-blocked {shape:?} on {chip}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn kv_sub_blocks_match_the_reference() {
    let forward = FlashOp(FlashPass::Forward);
    let seed = seed();
    let shape = |heads, kv_heads, q_len, kv_len, head_dim| AttentionShape { batch: 1, heads, kv_heads, q_len, kv_len, head_dim };
    // Ragged kv (the last sub-blocks partly or wholly past it, also where the keys end on a
    // sub-block's edge), causal top-left and bottom-right, GQA, bf16; sub-blocks of 128 in
    // 256-, 384- and 512-wide kv blocks.
    for (shape, causal, bottom_right, dtype, (bq, bk, bkc)) in [
        (shape(2, 1, 300, 1000, 64), true, false, DType::F32, (128, 512, 128)),
        (shape(2, 2, 256, 384, 32), false, false, DType::BF16, (128, 384, 128)),
        (shape(1, 1, 200, 700, 64), true, true, DType::F32, (64, 256, 128)),
        (shape(1, 1, 384, 384, 64), true, false, DType::F32, (256, 256, 128)),
    ] {
        let p = FlashProblem { causal, bottom_right, ..FlashProblem::plain(shape, dtype) };
        let c = FlashConfig { bq, bk, bkc };
        assert_eq!(forward.fit(&p, c), c, "the sub-block is kept");
        let inputs = forward.random_inputs(&p, &mut StdRng::seed_from_u64(seed));
        let want = forward.reference(&p, &inputs);
        // Checked mode fills blocks' padding with NaN: a sub-block past the keys must not reach
        // the output.
        let checked = forward.call(&p, &c).and_then(|call| Ok(call.interpret_checked(&inputs)?)).unwrap_or_else(|e| panic!("{shape:?} checked: {e}"));
        let cpu = op::run(&forward, &p, Some(&c), &inputs, Backend::Cpu).unwrap_or_else(|e| panic!("{shape:?} on cpu: {e}"));
        for (backend, got) in [("checked interpreter", checked), ("cpu", cpu)] {
            for (g, w) in got.iter().zip(&want) {
                let g = g.to_f64();
                let peak = w.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
                let err = g.iter().zip(w.iter()).filter(|(_, w)| w.is_finite()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / peak;
                assert!(err <= tolerance(dtype), "{shape:?} causal={causal} bottom_right={bottom_right} {dtype} {c:?} on {backend} (seed {seed}): error {err:e}");
                assert!(g.iter().zip(w.iter()).all(|(a, b)| if b.is_finite() { a.is_finite() } else { a == b }), "{shape:?} on {backend}: a value differs in finiteness");
            }
        }
    }
}
