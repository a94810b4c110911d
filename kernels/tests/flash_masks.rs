//! Flash attention with what SDPA takes beyond q, k, v: an additive bias (broadcast over batch
//! or heads, -inf entries hiding keys, whole rows hidden) and its gradient, bottom-right causal
//! alignment (fewer and more queries than keys), and dropout. The f64 reference's gradients
//! are checked by finite differences, then every kernel against the reference on the checked
//! interpreter and PJRT CPU at two block sizes, on fresh random inputs; q, k and v read in
//! place from a fused projection's rows; and libtpu compiles each variant for every chip.

mod common;

use ndarray::{Array2, ArrayD, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_kernels::flash::{
    dropout_keeps, reference_backward_masked, reference_masked, AttentionShape, BiasShape, FlashConfig, FlashOp, FlashPass, FlashProblem, HeadLayout, ReferenceMasks,
};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

fn normal(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng))
}

/// A bias with some keys hidden (-inf) and, for the first query row, every key hidden.
fn bias_with_hidden_keys(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f64> {
    let mut b = normal(rng, shape);
    for (n, x) in b.indexed_iter_mut() {
        if n[2] == 0 || rng.random_bool(0.2) {
            *x = f64::NEG_INFINITY;
        }
    }
    b
}

#[test]
fn reference_gradients_with_a_bias_bottom_right_causal_and_dropout_agree_with_finite_differences() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (q, k, v, d_o) = (normal(&mut rng, &[1, 2, 4, 3]), normal(&mut rng, &[1, 1, 6, 3]), normal(&mut rng, &[1, 1, 6, 2]), normal(&mut rng, &[1, 2, 4, 2]));
    let bias = normal(&mut rng, &[1, 2, 4, 6]);
    let scale = 0.6;
    fn masks(b: &ArrayD<f64>) -> ReferenceMasks<'_> {
        ReferenceMasks { causal: Some(2), bias: Some(b), dropout: Some((7, 0.3)), ..Default::default() }
    }
    let loss =
        |q: &ArrayD<f64>, k: &ArrayD<f64>, v: &ArrayD<f64>, b: &ArrayD<f64>| reference_masked(q, k, v, &masks(b), scale).0.iter().zip(d_o.iter()).map(|(a, b)| a * b).sum::<f64>();
    let g = reference_backward_masked(&q, &k, &v, &d_o, &masks(&bias), scale);
    common::assert_gradient("dq", |x| loss(x, &k, &v, &bias), &q, &g.dq.into_dyn(), 1e-6);
    common::assert_gradient("dk", |x| loss(&q, x, &v, &bias), &k, &g.dk.into_dyn(), 1e-6);
    common::assert_gradient("dv", |x| loss(&q, &k, x, &bias), &v, &g.dv.into_dyn(), 1e-6);
    common::assert_gradient("dbias", |x| loss(&q, &k, &v, x), &bias, &g.dbias.into_dyn(), 1e-6);
}

#[test]
fn dropout_keeps_one_minus_its_rate_and_depends_on_the_seed() {
    let (rows, cols) = (300, 400);
    for rate in [0.1, 0.5, 0.9] {
        let kept = (0..rows).flat_map(|i| (0..cols).map(move |j| (i, j))).filter(|&(i, j)| dropout_keeps(3, 1, i, j, cols, rate)).count() as f64;
        let n = (rows * cols) as f64;
        let sigma = (n * rate * (1.0 - rate)).sqrt();
        assert!((kept - n * (1.0 - rate)).abs() < 5.0 * sigma, "rate {rate}: kept {kept} of {n}");
    }
    let same = (0..1000).filter(|&j| dropout_keeps(1, 0, 0, j, 1000, 0.5) == dropout_keeps(2, 0, 0, j, 1000, 0.5)).count();
    assert!((400..600).contains(&same), "seeds 1 and 2 agree on {same} of 1000 keys");
    let heads = (0..1000).filter(|&j| dropout_keeps(1, 0, 0, j, 1000, 0.5) == dropout_keeps(1, 1, 0, j, 1000, 0.5)).count();
    assert!((400..600).contains(&heads), "heads 0 and 1 agree on {heads} of 1000 keys");
    assert!((0..1000).all(|j| dropout_keeps(5, 0, 2, j, 1000, 0.0)), "rate 0 keeps everything");
    assert!((0..1000).all(|j| !dropout_keeps(5, 0, 2, j, 1000, 1.0)), "rate 1 keeps nothing");
}

struct Case {
    shape: AttentionShape,
    dtype: DType,
    causal: bool,
    bottom_right: bool,
    segments: bool,
    bias: Option<BiasShape>,
    dropout_p: f64,
    blocks: [(usize, usize); 2],
}

fn cases() -> Vec<Case> {
    let shape = |batch, heads, kv_heads, q_len, kv_len, head_dim| AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim };
    vec![
        // A full bias with hidden keys and rows, GQA, decoding-like bottom-right (fewer queries).
        Case {
            shape: shape(2, 4, 2, 20, 300, 16),
            dtype: DType::F32,
            causal: true,
            bottom_right: true,
            segments: false,
            bias: Some(BiasShape { batch: 2, heads: 4 }),
            dropout_p: 0.0,
            blocks: [(8, 16), (16, 128)],
        },
        // One bias for every batch and head, top-left causal, dropout, bf16.
        Case {
            shape: shape(2, 2, 2, 40, 40, 32),
            dtype: DType::BF16,
            causal: true,
            bottom_right: false,
            segments: false,
            bias: Some(BiasShape { batch: 1, heads: 1 }),
            dropout_p: 0.25,
            blocks: [(16, 16), (32, 8)],
        },
        // Bottom-right with more queries than keys (leading rows see nothing), segments, dropout.
        Case { shape: shape(1, 2, 1, 50, 30, 16), dtype: DType::F32, causal: true, bottom_right: true, segments: true, bias: None, dropout_p: 0.4, blocks: [(16, 8), (32, 32)] },
        // A per-head bias broadcast over the batch, no causal mask, ragged.
        Case {
            shape: shape(3, 2, 1, 33, 260, 8),
            dtype: DType::F32,
            causal: false,
            bottom_right: false,
            segments: false,
            bias: Some(BiasShape { batch: 1, heads: 2 }),
            dropout_p: 0.1,
            blocks: [(8, 8), (48, 16)],
        },
    ]
}

fn layout_segments(s: AttentionShape, ids_q: &Array2<i32>, ids_k: &Array2<i32>) -> [HostArray; 2] {
    let (qs, ks) = torchtpu_kernels::flash::segment_layout(s, Some((ids_q.view(), ids_k.view()))).expect("layout");
    [HostArray::from(qs), HostArray::from(ks)]
}

#[test]
fn every_kernel_matches_the_reference_with_bias_bottom_right_causal_and_dropout() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for case in cases() {
        let s = case.shape;
        let problem = FlashProblem {
            causal: case.causal,
            bottom_right: case.bottom_right,
            segments: case.segments,
            bias: case.bias,
            bias_grad: case.bias.is_some(),
            dropout_p: case.dropout_p,
            ..FlashProblem::plain(s, case.dtype)
        };
        let forward_op = FlashOp(FlashPass::Forward);
        let mut inputs = forward_op.random_inputs(&problem, &mut rng);
        let arr = |a: &ArrayD<f64>| HostArray::from_f64(case.dtype, a);
        inputs[0] = arr(&normal(&mut rng, &[s.batch, s.heads, s.q_len, s.head_dim]));
        inputs[1] = arr(&normal(&mut rng, &[s.batch, s.kv_heads, s.kv_len, s.head_dim]));
        inputs[2] = arr(&normal(&mut rng, &[s.batch, s.kv_heads, s.kv_len, s.head_dim]));
        if case.segments {
            let ids = |len: usize| Array2::from_shape_fn((s.batch, len), |(_, i)| (i / 11) as i32);
            let [qs, ks] = layout_segments(s, &ids(s.q_len), &ids(s.kv_len));
            inputs[3] = qs;
            inputs[4] = ks;
        }
        if let Some(b) = case.bias {
            inputs[5] = HostArray::from_f64(DType::F32, &bias_with_hidden_keys(&mut rng, &[b.batch, b.heads, s.q_len, s.kv_len]));
        }
        inputs[6] = HostArray::from(Array2::from_elem((8, 128), rng.random::<i32>()));
        let forward_out = forward_op.reference(&problem, &inputs);
        let d_o = arr(&normal(&mut rng, &[s.batch, s.heads, s.q_len, s.head_dim]));
        let (o, lse) = (arr(&forward_out[0]), HostArray::from_f64(DType::F32, &forward_out[1]));
        let backward_inputs = [&inputs[..3], &[o, d_o, lse], &inputs[3..]].concat();
        for (bq, bk) in case.blocks {
            let c = FlashConfig::new(bq, bk);
            common::assert_matches_f64(&forward_op, &problem, c, &inputs, case.dtype, 1.0, seed);
            for pass in [FlashPass::BackwardDkv, FlashPass::BackwardDq] {
                common::assert_matches_f64(&FlashOp(pass), &problem, c, &backward_inputs, case.dtype, 2.0, seed);
            }
        }
        // A row every key of which is hidden gives zeros and lse -inf, as SDPA does.
        if case.bias.is_some() {
            let lse = forward_out[1].index_axis(Axis(2), 0).to_owned();
            assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY), "a fully hidden row's lse: {lse:?}");
        }
    }
}

#[test]
fn q_k_v_read_in_place_from_a_fused_projection_match_the_reference() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // One [b, s, (h + 2 hk) d] array, as `x @ W_qkv.T` gives: q, k and v are its column ranges.
    let (h, hk, d) = (4, 2, 128);
    let width = h + 2 * hk;
    let shape = AttentionShape { batch: 2, heads: h, kv_heads: hk, q_len: 40, kv_len: 40, head_dim: d };
    let problem = FlashProblem {
        causal: true,
        dropout_p: 0.2,
        q_layout: HeadLayout::Bshd { width, offset: 0 },
        k_layout: HeadLayout::Bshd { width, offset: h },
        v_layout: HeadLayout::Bshd { width, offset: h + hk },
        ..FlashProblem::plain(shape, DType::F32)
    };
    let qkv = HostArray::from_f64(DType::F32, &normal(&mut rng, &[2, 40, width * d]));
    let forward_op = FlashOp(FlashPass::Forward);
    let mut inputs = forward_op.random_inputs(&problem, &mut rng);
    for operand in &mut inputs[..3] {
        *operand = qkv.clone();
    }
    inputs[6] = HostArray::from(Array2::from_elem((8, 128), rng.random::<i32>()));
    // The reference reads the same heads from the contiguous layout.
    let contiguous = |range: std::ops::Range<usize>| {
        let rows = qkv.to_f64().into_shape_with_order((2, 40, width, d)).expect("rows");
        HostArray::from_f64(DType::F32, &rows.slice(ndarray::s![.., .., range, ..]).permuted_axes([0, 2, 1, 3]).as_standard_layout().into_owned().into_dyn())
    };
    let plain = FlashProblem { q_layout: HeadLayout::Bhsd, k_layout: HeadLayout::Bhsd, v_layout: HeadLayout::Bhsd, ..problem };
    let plain_inputs = [vec![contiguous(0..h), contiguous(h..h + hk), contiguous(h + hk..width)], inputs[3..].to_vec()].concat();
    let want = forward_op.reference(&plain, &plain_inputs);
    assert_eq!(forward_op.reference(&problem, &inputs), want, "the reference reads the layouts' heads");
    let d_o = HostArray::from_f64(DType::F32, &normal(&mut rng, &[2, h, 40, d]));
    let (o, lse) = (HostArray::from_f64(DType::F32, &want[0]), HostArray::from_f64(DType::F32, &want[1]));
    let backward_inputs = [&inputs[..3], &[o, d_o, lse], &inputs[3..]].concat();
    for c in [FlashConfig::new(16, 8), FlashConfig::new(40, 40)] {
        common::assert_matches_f64(&forward_op, &problem, c, &inputs, DType::F32, 1.0, seed);
        for pass in [FlashPass::BackwardDkv, FlashPass::BackwardDq] {
            common::assert_matches_f64(&FlashOp(pass), &problem, c, &backward_inputs, DType::F32, 2.0, seed);
        }
    }
    let narrow = FlashProblem { shape: AttentionShape { head_dim: 64, ..shape }, ..problem };
    let err = op::run(&forward_op, &narrow, None, &inputs, torchtpu_exec::Backend::Interpret).expect_err("64 lanes of a wider row");
    assert!(err.to_string().contains("multiple of 128"), "{err}");
}

#[test]
fn masked_variants_compile_with_libtpu_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let shape = AttentionShape { batch: 2, heads: 8, kv_heads: 2, q_len: 512, kv_len: 1024, head_dim: 128 };
    let mut failures = Vec::new();
    let fused = |offset| HeadLayout::Bshd { width: 12, offset };
    for (dtype, bias, in_place) in [(DType::BF16, Some(BiasShape { batch: 1, heads: 8 }), false), (DType::F32, None, true)] {
        let (q_layout, k_layout, v_layout) = if in_place { (fused(0), fused(8), fused(10)) } else { Default::default() };
        let problem =
            FlashProblem { causal: true, bottom_right: true, bias, bias_grad: bias.is_some(), dropout_p: 0.1, q_layout, k_layout, v_layout, ..FlashProblem::plain(shape, dtype) };
        for pass in FlashPass::ALL {
            let module = op::tpu_module(&FlashOp(pass), &problem, Some(&FlashConfig::new(256, 256)), Chip::V5e).expect("lowers");
            for chip in Chip::ALL {
                if let Err(e) = compiler.compile(chip, &module.artifact) {
                    failures.push(format!("{pass:?} {dtype} bias={bias:?} on {chip}: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
