//! What a user can pass the kernels' Rust API either works as PyTorch would or is an error
//! value: empty shapes, NaN and inf, blocks of 0, heads that do not divide, wrong dtypes,
//! shapes too large to address. Then a property suite draws such inputs at random and checks
//! each against the f64 references: no panic, an error only for invalid input.

use ndarray::{Array2, ArrayD};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::flash::{self, AttentionOptions, AttentionShape};
use torchtpu_kernels::matmul::{self, MatmulOptions, MatmulShape};
use torchtpu_kernels::Error;

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    HostArray::from_f64(dtype, &ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng)))
}

fn qkv(rng: &mut StdRng, s: AttentionShape, dtype: DType) -> [HostArray; 3] {
    let kv = [s.batch, s.kv_heads, s.kv_len, s.head_dim];
    [random(rng, dtype, &[s.batch, s.heads, s.q_len, s.head_dim]), random(rng, dtype, &kv), random(rng, dtype, &kv)]
}

fn shape(batch: usize, heads: usize, kv_heads: usize, q_len: usize, kv_len: usize, head_dim: usize) -> AttentionShape {
    AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim }
}

#[test]
fn empty_attention_gives_zeros_and_the_log_sum_exp_of_what_each_row_sees() {
    let mut rng = StdRng::seed_from_u64(1);
    for s in [shape(0, 2, 2, 8, 8, 16), shape(1, 0, 0, 8, 8, 16), shape(1, 2, 1, 0, 8, 16), shape(1, 2, 1, 8, 0, 16), shape(2, 2, 2, 8, 5, 0)] {
        for causal in [false, true] {
            let [q, k, v] = qkv(&mut rng, s, DType::F32);
            let opts = AttentionOptions { causal, ..AttentionOptions::default() };
            let (o, lse) = flash::forward(&q, &k, &v, None, opts, Backend::Interpret).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(o.shape(), q.shape());
            assert!(o.to_f64().iter().all(|&x| x == 0.0), "{s:?}");
            assert_eq!(lse.dim(), (s.batch, s.heads, s.q_len));
            for ((_, _, i), &l) in lse.indexed_iter() {
                // head_dim 0: every score is 0, so the log-sum-exp is log(#visible keys).
                let visible = if causal { (i + 1).min(s.kv_len) } else { s.kv_len };
                let want = if visible == 0 { f32::NEG_INFINITY } else { (visible as f32).ln() };
                assert_eq!(l, want, "{s:?} causal {causal} row {i}");
            }
            let (dq, dk, dv) = flash::backward(&q, &k, &v, &o, &lse, &o, None, opts, Backend::Interpret).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            for (g, like) in [(&dq, &q), (&dk, &k), (&dv, &v)] {
                assert_eq!(g.shape(), like.shape());
                assert!(g.to_f64().iter().all(|&x| x == 0.0));
            }
        }
    }
}

#[test]
fn empty_matmul_gives_torchs_shapes_and_zeros() {
    let mut rng = StdRng::seed_from_u64(2);
    for (a, b, want) in [
        (vec![0, 4], vec![4, 3], vec![0, 3]),
        (vec![5, 0], vec![0, 3], vec![5, 3]),
        (vec![5, 4], vec![4, 0], vec![5, 0]),
        (vec![0, 5, 4], vec![0, 4, 3], vec![0, 5, 3]),
        (vec![2, 5, 0], vec![2, 0, 3], vec![2, 5, 3]),
    ] {
        for backend in [Backend::Interpret, Backend::Cpu] {
            let out = matmul::matmul(&random(&mut rng, DType::F32, &a), &random(&mut rng, DType::F32, &b), MatmulOptions::default(), backend).expect("empty matmul");
            assert_eq!(out.shape(), want.as_slice());
            assert!(out.to_f64().iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn nan_reaches_attentions_output_where_sdpa_puts_it() {
    let mut rng = StdRng::seed_from_u64(3);
    let s = shape(1, 2, 2, 24, 24, 16);
    let [q, k, v] = qkv(&mut rng, s, DType::F32);
    let mut qn = q.to_f64();
    qn[[0, 0, 5, 0]] = f64::NAN;
    let qn = HostArray::from_f64(DType::F32, &qn);
    for backend in [Backend::Interpret, Backend::Cpu] {
        let (o, lse) = flash::forward(&qn, &k, &v, None, AttentionOptions::default(), backend).expect("runs");
        let o = o.to_f64();
        for i in 0..24 {
            let row_nan = (0..16).all(|c| o[[0, 0, i, c]].is_nan());
            assert_eq!(row_nan, i == 5, "{backend}: row {i}");
            assert_eq!(lse[[0, 0, i]].is_nan(), i == 5);
        }
        assert!(o.iter().skip(24 * 16).all(|x| x.is_finite()), "other heads stay finite");
        // A NaN key reaches every row that sees it: causally, rows from its position on.
        let mut kn = k.to_f64();
        kn[[0, 1, 7, 3]] = f64::NAN;
        let kn = HostArray::from_f64(DType::F32, &kn);
        let (o, _) = flash::forward(&q, &kn, &v, None, AttentionOptions { causal: true, ..Default::default() }, backend).expect("runs");
        let o = o.to_f64();
        for i in 0..24 {
            assert_eq!(o[[0, 1, i, 0]].is_nan(), i >= 7, "{backend}: row {i}");
            assert!(o[[0, 0, i, 0]].is_finite());
        }
        for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let (o, _) = flash::forward(&q, &k, &v, None, AttentionOptions { sm_scale: Some(scale), ..Default::default() }, backend).expect("runs");
            assert!(o.to_f64().iter().any(|x| x.is_nan()), "{backend}: sm_scale {scale} must not hide as zeros");
        }
    }
    // A row whose visible scores are all -inf (an inf query against negative keys) is NaN, as
    // SDPA's softmax gives, under every mask; the other rows stay finite.
    let mut qi = q.to_f64();
    qi[[0, 0, 5, 0]] = f64::INFINITY;
    let qi = HostArray::from_f64(DType::F32, &qi);
    let mut kneg = k.to_f64();
    kneg.slice_mut(ndarray::s![.., .., .., 0]).mapv_inplace(|x| -x.abs() - 0.5);
    let kneg = HostArray::from_f64(DType::F32, &kneg);
    let ids = Array2::from_shape_fn((1, 24), |(_, i)| (i / 4) as i32);
    for backend in [Backend::Interpret, Backend::Cpu] {
        for (causal, segments) in [(false, None), (true, None), (true, Some((&ids, &ids)))] {
            let opts = AttentionOptions { causal, ..Default::default() };
            let (o, _) = flash::forward(&qi, &kneg, &v, segments, opts, backend).expect("runs");
            let o = o.to_f64();
            for i in 0..24 {
                assert_eq!(o[[0, 0, i, 0]].is_nan(), i == 5, "{backend} causal {causal} segments {}: row {i}", segments.is_some());
            }
        }
    }
    // A row that sees no key gives 0, not NaN (as SDPA).
    let ids_q = Array2::from_elem((1, 24), 1);
    let ids_k = Array2::from_elem((1, 24), 2);
    let (o, lse) = flash::forward(&q, &k, &v, Some((&ids_q, &ids_k)), AttentionOptions::default(), Backend::Cpu).expect("runs");
    assert!(o.to_f64().iter().all(|&x| x == 0.0));
    assert!(lse.iter().all(|&l| l == f32::NEG_INFINITY));
}

#[test]
fn bad_blocks_heads_and_dtypes_are_errors_not_panics() {
    let mut rng = StdRng::seed_from_u64(4);
    let s = shape(1, 2, 2, 16, 16, 8);
    let [q, k, v] = qkv(&mut rng, s, DType::F32);
    for block in [(0, 8), (8, 0)] {
        let err = flash::forward(&q, &k, &v, None, AttentionOptions { block: Some(block), ..Default::default() }, Backend::Interpret).expect_err("block 0");
        assert!(err.to_string().contains("must be positive"), "{err}");
        let err = flash::backward_call(flash::FlashPass::BackwardDq, s, DType::F32, AttentionOptions { block: Some(block), ..Default::default() }, false).expect_err("block 0");
        assert!(matches!(err, Error::Shape(_)), "{err}");
    }
    for block in [(0, 128, 128), (8, 0, 128), (8, 128, 0)] {
        let (a, b) = (random(&mut rng, DType::F32, &[8, 16]), random(&mut rng, DType::F32, &[16, 8]));
        let err = matmul::matmul(&a, &b, MatmulOptions { block: Some(block), ..Default::default() }, Backend::Interpret).expect_err("block 0");
        assert!(err.to_string().contains("must be positive"), "{err}");
    }
    // q heads that k/v heads do not divide, and k/v with no heads under q heads.
    for (h, hk) in [(3, 2), (2, 0)] {
        let s = shape(1, h, hk, 8, 8, 8);
        let [q, k, v] = qkv(&mut rng, s, DType::F32);
        let err = flash::forward(&q, &k, &v, None, AttentionOptions::default(), Backend::Interpret).expect_err("heads");
        assert!(err.to_string().contains("grouped-query"), "{err}");
    }
    let ints = HostArray::from(ndarray::ArrayD::<i32>::zeros(vec![1, 2, 8, 8]));
    let err = flash::forward(&ints, &ints, &ints, None, AttentionOptions::default(), Backend::Interpret).expect_err("i32");
    assert!(matches!(err, Error::Dtype(_)), "{err}");
    let ints = HostArray::from(ndarray::ArrayD::<i32>::zeros(vec![8, 8]));
    assert!(matches!(matmul::matmul(&ints, &ints, MatmulOptions::default(), Backend::Cpu), Err(Error::Dtype(_))));
}

#[test]
fn shapes_too_large_to_run_are_errors_before_anything_is_allocated() {
    // 2^31 programs along one axis (grid indices are i32), and an array past the address space.
    let huge = shape(1, 1, 1, 1 << 34, 1 << 34, 128);
    let call = flash::forward_call(huge, DType::F32, AttentionOptions { block: Some((8, 128)), ..Default::default() }, false).expect("builds");
    let err = call.trace(&flash::forward_operand_types(huge, DType::F32, false)).expect_err("too many programs");
    assert!(err.to_string().contains("grid indices are i32"), "{err}");
    let shape = MatmulShape { batch: None, m: usize::MAX / 2, n: 256, k: 256 };
    let call = matmul::call(shape, DType::F32, MatmulOptions { block: Some((1 << 40, 128, 128)), ..Default::default() }).expect("builds");
    let err = call.trace(&matmul::operand_types(shape, DType::F32, false)).expect_err("past the address space");
    assert!(matches!(err, torchtpu_dsl::Error::TooLarge { .. }), "{err}");
    // Memory that is not there is refused with how much was asked for.
    let err = torchtpu_dsl::memory::check_fits(1 << 60, "a test").expect_err("an exabyte");
    assert!(err.contains("GiB of host memory"), "{err}");
}

#[test]
fn attention_without_segments_or_bias_costs_no_memory_per_position_for_them() {
    let long = shape(1, 1, 1, 1 << 20, 1 << 20, 8);
    let types = flash::forward_operand_types(long, DType::F32, false);
    let placeholder_bytes: usize = types[3..].iter().map(|t| t.size_bytes()).sum();
    assert_eq!(placeholder_bytes, 4 * 8 * 128 * 4, "one tile each for the segment ids, the bias and the seed, whatever the length");
    let (qs, ks) = flash::segment_layout(long, None).expect("placeholders");
    assert_eq!(qs.len() + ks.len(), 2 * 8 * 128);
}

/// `want` within `tol` of `got` (relative to the reference's scale), NaN where it is NaN.
fn agrees(got: &HostArray, want: &ArrayD<f64>, tol: f64) -> Result<(), String> {
    let got = got.to_f64();
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} vs {:?}", got.shape(), want.shape()));
    }
    let scale = want.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
    for (g, w) in got.iter().zip(want) {
        if w.is_nan() != g.is_nan() || (!w.is_nan() && (g - w).abs() > tol * scale) {
            return Err(format!("got {g}, want {w} (tolerance {tol} x {scale})"));
        }
    }
    Ok(())
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        3e-2
    } else {
        1e-4
    }
}

fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1usize), 2usize..40]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16)]
}

fn block() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![Just(None), Just(Some(0)), (1usize..5).prop_map(|b| Some(b * 8))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Matmul at drawn shapes (0 and 1 included), dtypes, blocks (0 included) and a NaN or
    /// inf placed at random: an error exactly when a block is 0, else the f64 reference.
    #[test]
    fn matmul_agrees_with_f64_or_refuses_a_zero_block(m in dims(), n in dims(), k in dims(), batch in prop_oneof![Just(None), (0usize..3).prop_map(Some)], dtype in dtype(), bm in block(), bn in block(), bk in block(), poison in prop_oneof![Just(None), Just(Some(f64::NAN)), Just(Some(f64::INFINITY))], seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let lead: Vec<usize> = batch.into_iter().collect();
        let mut a = ArrayD::from_shape_simple_fn([lead.clone(), vec![m, k]].concat(), || StandardNormal.sample(&mut rng));
        let b = ArrayD::from_shape_simple_fn([lead, vec![k, n]].concat(), || StandardNormal.sample(&mut rng));
        if let (Some(p), Some(x)) = (poison, a.iter_mut().next()) {
            *x = p;
        }
        let (ha, hb) = (HostArray::from_f64(dtype, &a), HostArray::from_f64(dtype, &b));
        let block = match (bm, bn, bk) {
            (None, None, None) => None,
            (m, n, k) => Some((m.unwrap_or(8), n.unwrap_or(128), k.unwrap_or(128))),
        };
        let zero_block = block.is_some_and(|(m, n, k)| m == 0 || n == 0 || k == 0);
        let shape = MatmulShape { batch, m, n, k };
        match matmul::matmul(&ha, &hb, MatmulOptions { block, ..Default::default() }, Backend::Interpret) {
            Err(e) => prop_assert!(zero_block && !shape.is_empty(), "unexpected error: {e}"),
            Ok(out) => {
                prop_assert!(!zero_block || shape.is_empty(), "a zero block was accepted");
                let want = matmul::reference(&ha.to_f64(), &hb.to_f64(), false);
                prop_assert!(agrees(&out, &want, tolerance(dtype) * (k.max(1) as f64).sqrt()).is_ok(), "{:?}", agrees(&out, &want, tolerance(dtype)));
            }
        }
    }

    /// Attention at drawn shapes (0 and 1 included, GQA, unequal lengths), dtypes, masks,
    /// segment ids and blocks: an error exactly for invalid input, else the f64 reference.
    #[test]
    fn attention_agrees_with_f64_or_refuses_invalid_input(batch in 0usize..3, kv_heads in 0usize..3, group in 1usize..3, q_len in dims(), kv_len in dims(), head_dim in prop_oneof![Just(0usize), Just(1usize), 2usize..20], dtype in dtype(), causal in any::<bool>(), use_segments in any::<bool>(), bq in block(), bk in block(), seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let s = shape(batch, kv_heads * group, kv_heads, q_len, kv_len, head_dim);
        let [q, k, v] = qkv(&mut rng, s, dtype);
        let ids = |len| Array2::from_shape_fn((batch, len), |(_, i)| (i / 5) as i32);
        let (qs, ks) = (ids(q_len), ids(kv_len));
        let segments = use_segments.then_some((&qs, &ks));
        let block = match (bq, bk) {
            (None, None) => None,
            (a, b) => Some((a.unwrap_or(8), b.unwrap_or(8))),
        };
        let zero_block = block.is_some_and(|(a, b)| a == 0 || b == 0);
        let opts = AttentionOptions { causal, sm_scale: None, block, ..Default::default() };
        match flash::forward(&q, &k, &v, segments, opts, Backend::Interpret) {
            Err(e) => prop_assert!(zero_block && !s.is_empty(), "unexpected error: {e}"),
            Ok((o, _)) => {
                prop_assert!(!zero_block || s.is_empty(), "a zero block was accepted");
                let scale = if head_dim == 0 { 1.0 } else { 1.0 / (head_dim as f64).sqrt() };
                let (want, _) = flash::reference(&q.to_f64(), &k.to_f64(), &v.to_f64(), segments, causal, scale);
                let check = agrees(&o, &want.into_dyn(), tolerance(dtype));
                prop_assert!(check.is_ok(), "{:?}", check);
            }
        }
    }
}
