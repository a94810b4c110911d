//! Rotary position embedding, forward and backward, against f64 on fresh random inputs: ragged
//! sequence blocks, head dims below and above a lane tile, batched and shared positions, f32 and
//! bf16, on the interpreter (checked) and PJRT CPU; the f64 backward against finite differences
//! of the forward; compiled by libtpu for every chip.

mod common;

use ndarray::{Array3, Array4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::op::{self, Op};
use torchtpu_kernels::rope::{reference, RopeOp, RopeProblem};
use torchtpu_kernels::rows::RowsConfig;
use torchtpu_runtime::{Chip, TpuCompiler};

#[test]
fn forward_and_backward_match_f64_on_every_backend() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    for (batch, heads, seq, dim, shared_positions) in [(1, 1, 1, 2, true), (2, 3, 37, 64, false), (1, 2, 100, 128, true), (2, 1, 24, 256, false)] {
        for dtype in [DType::F32, DType::BF16] {
            let p = RopeProblem { batch, heads, seq, dim, dtype, shared_positions };
            for o in [RopeOp::Forward, RopeOp::Backward] {
                let inputs = o.random_inputs(&p, &mut rng);
                common::assert_matches_f64(&o, &p, RowsConfig { block_rows: 16 }, &inputs, dtype, 2.0, seed);
            }
        }
    }
}

#[test]
fn the_backward_is_the_gradient_of_the_forward() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut normal = |shape: (usize, usize, usize, usize)| Array4::from_shape_simple_fn(shape, || StandardNormal.sample(&mut rng));
    let (x, dy) = (normal((2, 2, 3, 6)), normal((2, 2, 3, 6)));
    let angles = Array3::from_shape_fn((2, 3, 6), |(b, s, j)| (b + 1) as f64 * 0.3 * s as f64 + j as f64);
    let (cos, sin) = (angles.mapv(f64::cos), angles.mapv(f64::sin));
    let loss = |x: &Array4<f64>| (reference(x, &cos, &sin, false) * &dy).sum();
    common::assert_gradient("rope's dx", loss, &x, &reference(&dy, &cos, &sin, true), 1e-6);
}

#[test]
fn odd_dims_and_other_dtypes_are_errors() {
    let p = RopeProblem { batch: 1, heads: 1, seq: 8, dim: 7, dtype: DType::F32, shared_positions: true };
    assert!(RopeOp::Forward.check(&p).expect_err("odd").to_string().contains("even"));
    assert!(RopeOp::Forward.check(&RopeProblem { dim: 8, dtype: DType::I32, ..p }).is_err());
    let empty = RopeProblem { seq: 0, dim: 8, ..p };
    let out = op::run(&RopeOp::Forward, &empty, None, &RopeOp::Forward.random_inputs(&empty, &mut StdRng::seed_from_u64(0)), Backend::Cpu).expect("empty");
    assert_eq!(out[0].shape(), [1, 1, 0, 8]);
    let wrong = [HostArray::from_f64(DType::F32, &ndarray::ArrayD::zeros(vec![1, 1, 8, 6]))];
    assert!(op::run(&RopeOp::Forward, &RopeProblem { dim: 8, ..p }, None, &wrong, Backend::Cpu).is_err());
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (seq, dim, dtype, shared_positions) in [(4096, 128, DType::BF16, true), (37, 64, DType::F32, false), (100, 256, DType::BF16, false)] {
        let p = RopeProblem { batch: 2, heads: 4, seq, dim, dtype, shared_positions };
        for o in [RopeOp::Forward, RopeOp::Backward] {
            for chip in Chip::ALL {
                let module = op::tpu_module(&o, &p, None, chip).unwrap_or_else(|e| panic!("{o:?} {p:?}: {e}"));
                compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{o:?} {p:?} on {chip}: {e}"));
            }
        }
    }
}
