//! RMS norm, forward and backward, against f64 on fresh random inputs: ragged row counts, dims
//! that are not multiples of 128, with and without a weight, f32 and bf16, on the interpreter
//! (checked: no padding reaches an output) and PJRT CPU; the f64 gradients against finite
//! differences; compiled by libtpu for every chip; empty and bad inputs.

mod common;

use ndarray::{Array1, Array2, ArrayD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::op::{self, Op};
use torchtpu_kernels::rms_norm::{reference_backward, reference_rstd, rms_norm, rms_norm_backward, RmsNormConfig, RmsNormOp, RmsNormProblem};
use torchtpu_runtime::{Chip, TpuCompiler};

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    HostArray::from_f64(dtype, &ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng)))
}

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

fn max_err(got: &HostArray, want: &ArrayD<f64>) -> f64 {
    let got = got.to_f64();
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    got.iter().zip(want.iter()).fold(0.0f64, |m, (x, y)| if x.is_nan() { f64::INFINITY } else { m.max((x - y).abs()) }) / scale
}

fn two(a: &HostArray) -> Array2<f64> {
    let a = a.to_f64();
    let dim = *a.shape().last().expect("a last dim");
    let rows = a.len() / dim.max(1);
    a.into_shape_with_order((rows, dim)).expect("rows")
}

#[test]
fn forward_and_backward_match_f64_on_every_backend() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // (leading shape, dim): one row, ragged rows over several blocks, a dim not a multiple of 128.
    let cases: [(&[usize], usize); 4] = [(&[1], 128), (&[3, 37], 200), (&[300], 1024), (&[2, 4, 5], 64)];
    for (lead, dim) in cases {
        for dtype in [DType::F32, DType::BF16] {
            for affine in [true, false] {
                let shape: Vec<usize> = lead.iter().copied().chain([dim]).collect();
                let x = random(&mut rng, dtype, &shape);
                let w = affine.then(|| random(&mut rng, dtype, &[dim]));
                let dy = random(&mut rng, dtype, &shape);
                let eps = 1e-5;
                let (x2, dy2) = (two(&x), two(&dy));
                let w1 = w.as_ref().map_or_else(|| Array1::ones(dim), |w| w.to_f64().into_shape_with_order(dim).expect("1-D"));
                let r = reference_rstd(&x2, eps);
                let (r_column, w_row) = (r.view().insert_axis(ndarray::Axis(1)), w1.view().insert_axis(ndarray::Axis(0)));
                let want_y = (&x2 * &r_column * w_row).into_shape_with_order(shape.clone()).expect("shape");
                let (want_dx, want_dw) = reference_backward(&x2, &w1, &dy2, eps);
                let want_dx = want_dx.into_shape_with_order(shape.clone()).expect("shape");
                let tol = if dtype == DType::BF16 { 2e-2 } else { 2e-5 };
                for backend in [Backend::Interpret, Backend::Cpu] {
                    let what = format!("{shape:?} {dtype} affine={affine} on {backend} (seed {seed})");
                    let (y, rstd) = rms_norm(&x, w.as_ref(), eps, backend).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(max_err(&y, &want_y.clone().into_dyn()) <= tol, "{what}: y off by {:e}", max_err(&y, &want_y.clone().into_dyn()));
                    assert!(max_err(&rstd, &r.clone().into_shape_with_order(lead.to_vec()).expect("lead").into_dyn()) <= tol, "{what}: rstd");
                    let (dx, dw) = rms_norm_backward(&x, w.as_ref(), &dy, &rstd, backend).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(max_err(&dx, &want_dx.clone().into_dyn()) <= 2.0 * tol, "{what}: dx off by {:e}", max_err(&dx, &want_dx.clone().into_dyn()));
                    assert_eq!(dw.is_some(), affine);
                    if let Some(dw) = dw {
                        assert!(max_err(&dw, &want_dw.clone().into_dyn()) <= 2.0 * tol, "{what}: dw off by {:e}", max_err(&dw, &want_dw.clone().into_dyn()));
                    }
                }
            }
        }
    }
}

#[test]
fn no_padding_reaches_an_output() {
    // 37 rows in blocks of 16: the last block's padding is NaN under the checked interpreter.
    let mut rng = StdRng::seed_from_u64(seed());
    let p = RmsNormProblem { rows: 37, dim: 200, dtype: DType::F32, affine: true, eps: 1e-6 };
    let c = RmsNormConfig { block_rows: 16 };
    for op in [RmsNormOp::Forward, RmsNormOp::Backward] {
        let inputs = op.random_inputs(&p, &mut rng);
        let out = op.call(&p, &c).expect("call").interpret_checked(&inputs).expect("runs");
        for (o, want) in out.iter().zip(op.reference(&p, &inputs)) {
            assert!(max_err(o, &want) <= 2e-5, "{op:?}: {:e}", max_err(o, &want));
        }
    }
}

#[test]
fn reference_gradients_agree_with_finite_differences() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (rows, dim, eps) = (3, 5, 1e-3);
    let x = Array2::from_shape_simple_fn((rows, dim), || StandardNormal.sample(&mut rng));
    let w = Array1::from_shape_simple_fn(dim, || StandardNormal.sample(&mut rng));
    let dy = Array2::from_shape_simple_fn((rows, dim), || StandardNormal.sample(&mut rng));
    let loss = |x: &Array2<f64>, w: &Array1<f64>| {
        let r = reference_rstd(x, eps);
        (0..rows).flat_map(|i| (0..dim).map(move |j| (i, j))).map(|(i, j)| dy[[i, j]] * x[[i, j]] * r[i] * w[j]).sum::<f64>()
    };
    let (dx, dw) = reference_backward(&x, &w, &dy, eps);
    common::assert_gradient("dx", |x| loss(x, &w), &x, &dx, 1e-6);
    common::assert_gradient("dw", |w| loss(&x, w), &w, &dw, 1e-6);
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (rows, dim, dtype, affine) in [(4096, 4096, DType::BF16, true), (37, 200, DType::F32, true), (100, 128, DType::BF16, false)] {
        let p = RmsNormProblem { rows, dim, dtype, affine, eps: 1e-6 };
        for op in [RmsNormOp::Forward, RmsNormOp::Backward] {
            for chip in [Chip::V4, Chip::V5e, Chip::V5p, Chip::V6e, Chip::Tpu7x] {
                let module = op::tpu_module(&op, &p, None, chip).unwrap_or_else(|e| panic!("{op:?} {p:?}: {e}"));
                compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{op:?} {p:?} on {chip}: {e}"));
            }
        }
    }
}

#[test]
fn empty_inputs_give_empty_results() {
    for shape in [vec![0, 64], vec![4, 0], vec![0]] {
        let x = HostArray::from(ArrayD::<f32>::zeros(shape.clone()));
        let dim = *shape.last().expect("a dim");
        let w = HostArray::from(ArrayD::<f32>::ones(vec![dim]));
        let (y, rstd) = rms_norm(&x, Some(&w), 1e-6, Backend::Cpu).expect("empty works");
        assert_eq!(y.shape(), shape.as_slice());
        assert_eq!(rstd.shape(), &shape[..shape.len() - 1]);
        let (dx, dw) = rms_norm_backward(&x, Some(&w), &x, &rstd, Backend::Cpu).expect("empty works");
        assert_eq!(dx.shape(), shape.as_slice());
        let dw = dw.expect("a weight gradient");
        assert_eq!(dw.shape(), &[dim]);
        assert!(dw.to_f64().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let x = HostArray::from(ArrayD::<f32>::zeros(vec![4, 8]));
    let scalar = HostArray::from(ArrayD::<f32>::zeros(vec![]));
    let short = HostArray::from(ArrayD::<f32>::zeros(vec![7]));
    let half = HostArray::F16(ArrayD::zeros(vec![4, 8]));
    for (what, result, needle) in [
        ("a scalar", rms_norm(&scalar, None, 1e-6, Backend::Cpu).err(), "at least one"),
        ("a short weight", rms_norm(&x, Some(&short), 1e-6, Backend::Cpu).err(), "the weight must be f32 [8]"),
        ("f16", rms_norm(&half, None, 1e-6, Backend::Cpu).err(), "f32 or bf16"),
        ("NaN eps", rms_norm(&x, None, f64::NAN, Backend::Cpu).err(), "eps must be finite"),
        ("negative eps", rms_norm(&x, None, -1.0, Backend::Cpu).err(), "eps must be finite"),
    ] {
        let e = result.unwrap_or_else(|| panic!("{what} was accepted")).to_string();
        assert!(e.contains(needle), "{what}: {e}");
    }
}
