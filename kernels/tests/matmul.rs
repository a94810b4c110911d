//! Matmul against f64 on fresh random inputs: A·B and A·Bᵀ, batched, ragged in every dim,
//! f32 and bf16; interpreter (checked) and PJRT CPU; compiled by libtpu for every chip.

use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_codegen::{stablehlo, Form};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::matmul::{call, matmul, reference, shape_of, MatmulOptions, MatmulShape};
use torchtpu_runtime::{Chip, TpuCompiler};

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    HostArray::from_f64(dtype, &ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng)))
}

fn operand_shapes(s: MatmulShape, t: bool) -> (Vec<usize>, Vec<usize>) {
    let b = if t { vec![s.n, s.k] } else { vec![s.k, s.n] };
    match s.batch {
        None => (vec![s.m, s.k], b),
        Some(x) => (vec![x, s.m, s.k], [vec![x], b].concat()),
    }
}

#[test]
fn matches_f64_on_every_backend_and_layout() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes = [
        (MatmulShape { batch: None, m: 1, n: 1, k: 1 }, None),
        (MatmulShape { batch: None, m: 129, n: 257, k: 513 }, Some((64, 128, 256))),
        (MatmulShape { batch: Some(3), m: 100, n: 60, k: 200 }, Some((64, 128, 128))),
        (MatmulShape { batch: Some(1), m: 256, n: 256, k: 256 }, None),
    ];
    for (shape, block) in shapes {
        for dtype in [DType::F32, DType::BF16] {
            for transpose_b in [false, true] {
                let (sa, sb) = operand_shapes(shape, transpose_b);
                let (a, b) = (random(&mut rng, dtype, &sa), random(&mut rng, dtype, &sb));
                let want = reference(&a.to_f64(), &b.to_f64(), transpose_b);
                let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                let tol = if dtype == DType::BF16 { 1e-2 } else { 2e-5 };
                for backend in [Backend::Interpret, Backend::Cpu] {
                    let got = matmul(&a, &b, MatmulOptions { transpose_b, block }, backend).unwrap_or_else(|e| panic!("{shape:?}: {e}")).to_f64();
                    let err = got.iter().zip(want.iter()).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
                    assert!(err <= tol, "{shape:?} {dtype} transpose_b={transpose_b} on {backend} (seed {seed}): {err:e}");
                }
                // Checked mode: padding is NaN, so any leak of it into a valid output shows.
                let c = call(shape, dtype, MatmulOptions { transpose_b, block }).expect("call");
                let out = c.interpret_checked(&[a.clone(), b.clone()]).expect("checked");
                assert!(out[0].to_f64().iter().all(|x| x.is_finite()), "{shape:?}: NaN leaked");
            }
        }
    }
}

#[test]
fn bad_operands_are_clear_errors() {
    let z = |shape: &[usize]| HostArray::from(ArrayD::<f32>::zeros(shape.to_vec()));
    let err = shape_of(&z(&[4, 5]), &z(&[6, 7]), false).expect_err("K");
    assert!(err.to_string().contains("contracting dims differ"), "{err}");
    let err = shape_of(&z(&[2, 4, 5]), &z(&[3, 5, 7]), false).expect_err("batch");
    assert!(err.to_string().contains("one batch size"), "{err}");
    let err = shape_of(&z(&[4, 5]), &HostArray::from(ArrayD::<i32>::zeros(vec![5, 7])), false).expect_err("dtype");
    assert!(err.to_string().contains("differ in dtype"), "{err}");
}

#[test]
fn compiles_with_libtpu_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let mut failures = Vec::new();
    for (shape, dtype, t) in [
        (MatmulShape { batch: None, m: 1000, n: 1000, k: 1000 }, DType::BF16, false),
        (MatmulShape { batch: Some(4), m: 512, n: 384, k: 300 }, DType::F32, true),
        (MatmulShape { batch: None, m: 8, n: 4096, k: 128 }, DType::BF16, true),
    ] {
        let (sa, sb) = operand_shapes(shape, t);
        let types = [torchtpu_dsl::ir::ValueType::new(dtype, sa), torchtpu_dsl::ir::ValueType::new(dtype, sb)];
        let traced = call(shape, dtype, MatmulOptions { transpose_b: t, block: None }).expect("call").trace(&types).expect("traces");
        let module = stablehlo::tpu_custom_call(&traced, Form::Stable).expect("lowers");
        for chip in Chip::ALL {
            if let Err(e) = compiler.compile(chip, &module) {
                failures.push(format!("{shape:?} {dtype} transpose_b={t} on {chip}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
