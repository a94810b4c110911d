//! Layer norm, forward and backward, against f64 on fresh random inputs: ragged row counts,
//! dims that are not multiples of 128, every combination of weight and bias, f32 and bf16, on
//! the interpreter (checked: no padding reaches an output) and PJRT CPU; the f64 gradients
//! against finite differences; compiled by libtpu for every chip; empty and bad inputs.

mod common;

use ndarray::{Array1, Array2, ArrayD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::accuracy::{relative_error, tolerance};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::layer_norm::{layer_norm, layer_norm_backward, reference_backward, reference_stats, LayerNormOp, LayerNormProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

#[test]
fn forward_and_backward_match_f64_on_every_backend() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for (rows, dim) in [(1, 128), (111, 200), (300, 1024), (40, 64)] {
        for dtype in [DType::F32, DType::BF16] {
            for (weight, bias) in [(true, true), (true, false), (false, true), (false, false)] {
                let p = LayerNormProblem { rows, dim, dtype, weight, bias, eps: 1e-5 };
                for o in [LayerNormOp::Forward, LayerNormOp::Backward] {
                    let inputs = o.random_inputs(&p, &mut rng);
                    let want = o.reference(&p, &inputs);
                    // Blocks of 16 rows: several blocks, the last one ragged for 111 and 300 rows.
                    let checked = o.call(&p, &o.fit(&p, torchtpu_kernels::rows::RowsConfig { block_rows: 16 })).expect("call").interpret_checked(&inputs).expect("interprets");
                    let on_cpu = op::run(&o, &p, None, &inputs, Backend::Cpu).expect("runs on PJRT CPU");
                    for (how, outputs) in [("interpreter", checked), ("PJRT CPU", on_cpu)] {
                        assert_eq!(outputs.len(), want.len());
                        for (i, (got, w)) in outputs.iter().zip(&want).enumerate() {
                            // The reductions over rows (dw, db) sum `rows` rounded products.
                            let tol = tolerance(dtype) * if i > 0 && o == LayerNormOp::Backward { (rows as f64).sqrt() } else { 2.0 };
                            let err = relative_error(got, w);
                            assert!(err <= tol, "{o:?} {p:?} output {i} on {how} (seed {seed}): {err:e} > {tol:e}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_host_api_takes_any_leading_shape() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut random = |shape: &[usize]| HostArray::from_f64(DType::F32, &ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(&mut rng)));
    let (x, w, b, dy) = (random(&[2, 3, 50]), random(&[50]), random(&[50]), random(&[2, 3, 50]));
    let (y, mean, rstd) = layer_norm(&x, Some(&w), Some(&b), 1e-5, Backend::Cpu).expect("runs");
    assert_eq!((y.shape(), mean.shape(), rstd.shape()), (&[2, 3, 50][..], &[2, 3][..], &[2, 3][..]));
    let x2 = x.to_f64().into_shape_with_order((6, 50)).expect("rows");
    let (want_mean, _) = reference_stats(&x2, 1e-5);
    assert!(relative_error(&mean, &want_mean.into_shape_with_order(vec![2, 3]).expect("lead")) <= 2e-5);
    let (dx, dw, db) = layer_norm_backward(&x, Some(&w), &dy, &mean, &rstd, Backend::Cpu).expect("runs");
    let w1 = w.to_f64().into_shape_with_order(50).expect("1-D");
    let (want_dx, want_dw, want_db) = reference_backward(&x2, &w1, &dy.to_f64().into_shape_with_order((6, 50)).expect("rows"), 1e-5);
    assert!(relative_error(&dx, &want_dx.into_shape_with_order(vec![2, 3, 50]).expect("shape")) <= 1e-4);
    assert!(relative_error(&dw, &want_dw.into_dyn()) <= 1e-4 && relative_error(&db, &want_db.into_dyn()) <= 1e-4);
}

#[test]
fn reference_gradients_agree_with_finite_differences() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (rows, dim, eps) = (3, 5, 1e-3);
    let x = Array2::from_shape_simple_fn((rows, dim), || StandardNormal.sample(&mut rng));
    let w = Array1::from_shape_simple_fn(dim, || StandardNormal.sample(&mut rng));
    let dy = Array2::from_shape_simple_fn((rows, dim), || StandardNormal.sample(&mut rng));
    // The loss Σ dy·y, with y = x̂·w + b: its bias gradient is Σ dy whatever b is.
    let loss = |x: &Array2<f64>, w: &Array1<f64>| {
        let (mean, rstd) = reference_stats(x, eps);
        (0..rows).flat_map(|i| (0..dim).map(move |j| (i, j))).map(|(i, j)| dy[[i, j]] * (x[[i, j]] - mean[i]) * rstd[i] * w[j]).sum::<f64>()
    };
    let (dx, dw, db) = reference_backward(&x, &w, &dy, eps);
    common::assert_gradient("dx", |x| loss(x, &w), &x, &dx, 1e-5);
    common::assert_gradient("dw", |w| loss(&x, w), &w, &dw, 1e-5);
    for j in 0..dim {
        assert!(approx::abs_diff_eq!(db[j], dy.column(j).sum(), epsilon = 1e-12), "db[{j}]");
    }
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (rows, dim, dtype, weight, bias) in [(4096, 4096, DType::BF16, true, true), (37, 200, DType::F32, true, false), (100, 128, DType::BF16, false, false)] {
        let p = LayerNormProblem { rows, dim, dtype, weight, bias, eps: 1e-5 };
        for o in [LayerNormOp::Forward, LayerNormOp::Backward] {
            for chip in Chip::ALL {
                let module = op::tpu_module(&o, &p, None, chip).unwrap_or_else(|e| panic!("{o:?} {p:?}: {e}"));
                compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{o:?} {p:?} on {chip}: {e}"));
            }
        }
    }
}

#[test]
fn empty_inputs_give_empty_results_and_bad_inputs_clear_errors() {
    for shape in [vec![0, 64], vec![4, 0]] {
        let x = HostArray::from(ArrayD::<f32>::zeros(shape.clone()));
        let dim = shape[1];
        let (y, mean, rstd) = layer_norm(&x, None, None, 1e-5, Backend::Cpu).expect("empty works");
        assert_eq!((y.shape(), mean.shape()), (shape.as_slice(), &shape[..1]));
        let (dx, dw, db) = layer_norm_backward(&x, None, &x, &mean, &rstd, Backend::Cpu).expect("empty works");
        assert_eq!((dx.shape(), dw.shape(), db.shape()), (shape.as_slice(), &[dim][..], &[dim][..]));
    }
    let x = HostArray::from(ArrayD::<f32>::zeros(vec![4, 8]));
    let short = HostArray::from(ArrayD::<f32>::zeros(vec![7]));
    for (what, result, needle) in [
        ("a short bias", layer_norm(&x, None, Some(&short), 1e-5, Backend::Cpu).err(), "the bias must be f32 [8]"),
        ("a NaN eps", layer_norm(&x, None, None, f64::NAN, Backend::Cpu).err(), "eps must be finite"),
        ("f16", layer_norm(&HostArray::F16(ArrayD::zeros(vec![4, 8])), None, None, 1e-5, Backend::Cpu).err(), "f32 or bf16"),
    ] {
        let e = result.unwrap_or_else(|| panic!("{what} was accepted")).to_string();
        assert!(e.contains(needle), "{what}: {e}");
    }
}
