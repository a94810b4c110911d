//! Fused linear + cross-entropy against f64 on fresh random inputs: ragged token and vocab blocks,
//! ignored targets, label smoothing, f32 and bf16, on the interpreter (checked) and PJRT CPU; the
//! f64 gradient against finite differences of the f64 loss; compiled by libtpu for every chip.

mod common;

use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::linear_cross_entropy::{reference_logit_gradient, reference_lse, LinearCrossEntropyConfig, LinearCrossEntropyOp, LinearCrossEntropyProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

const OPS: [LinearCrossEntropyOp; 3] = [LinearCrossEntropyOp::Forward, LinearCrossEntropyOp::BackwardDh, LinearCrossEntropyOp::BackwardDw];

#[test]
fn statistics_and_gradients_match_f64_on_every_backend() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    for (tokens, hidden, vocab) in [(1, 8, 3), (37, 64, 300), (64, 128, 1000), (20, 200, 128)] {
        for dtype in [DType::F32, DType::BF16] {
            for label_smoothing in [0.0, 0.1] {
                let p = LinearCrossEntropyProblem { tokens, hidden, vocab, dtype, label_smoothing };
                for o in OPS {
                    let inputs = o.random_inputs(&p, &mut rng);
                    common::assert_matches_f64(&o, &p, LinearCrossEntropyConfig { block_tokens: 16, block_vocab: 128 }, &inputs, dtype, 4.0, seed);
                }
            }
        }
    }
}

/// The smoothed cross-entropy of logits `z`, summed with per-token weights, in f64.
fn loss(z: &Array2<f64>, targets: &[i64], scale: &[f64], eps: f64) -> f64 {
    let lse = reference_lse(z);
    let vocab = z.ncols() as f64;
    (0..z.nrows())
        .map(|i| {
            let Some(t) = usize::try_from(targets[i]).ok() else { return 0.0 };
            let nll = lse[i] - z[[i, t]];
            let smooth = lse[i] - z.row(i).sum() / vocab;
            scale[i] * ((1.0 - eps) * nll + eps * smooth)
        })
        .sum()
}

#[test]
fn the_logit_gradient_is_the_losss() {
    let mut rng = StdRng::seed_from_u64(11);
    let z = Array2::from_shape_simple_fn((4, 6), || StandardNormal.sample(&mut rng));
    let targets = [2, -100, 5, 0];
    let scale = [0.5, 0.0, 0.25, 1.0];
    for eps in [0.0, 0.2] {
        let g = reference_logit_gradient(&z, &targets, &scale, eps);
        common::assert_gradient("d loss / d logits", |z| loss(z, &targets, &scale, eps), &z, &g, 1e-6);
    }
}

#[test]
fn empty_problems_give_what_cross_entropy_gives_and_bad_ones_are_errors() {
    let p = LinearCrossEntropyProblem { tokens: 5, hidden: 0, vocab: 7, dtype: DType::F32, label_smoothing: 0.0 };
    let inputs = LinearCrossEntropyOp::Forward.random_inputs(&p, &mut StdRng::seed_from_u64(0));
    let out = op::run(&LinearCrossEntropyOp::Forward, &p, None, &inputs, Backend::Cpu).expect("hidden 0");
    assert!(out[0].to_f64().iter().all(|&l| (l - 7f64.ln()).abs() < 1e-6), "zero logits: log(vocab)");
    let none = LinearCrossEntropyProblem { tokens: 0, ..p };
    let out = op::run(&LinearCrossEntropyOp::BackwardDw, &none, None, &LinearCrossEntropyOp::BackwardDw.random_inputs(&none, &mut StdRng::seed_from_u64(0)), Backend::Cpu)
        .expect("no tokens");
    assert_eq!(out[0].shape(), [7, 0]);
    assert!(LinearCrossEntropyOp::Forward.check(&LinearCrossEntropyProblem { label_smoothing: 1.5, ..p }).is_err());
    assert!(LinearCrossEntropyOp::Forward.check(&LinearCrossEntropyProblem { dtype: DType::I32, ..p }).is_err());
    let wrong = [HostArray::from_f64(DType::F32, &ndarray::ArrayD::zeros(vec![5, 3]))];
    assert!(op::run(&LinearCrossEntropyOp::Forward, &LinearCrossEntropyProblem { hidden: 4, ..p }, None, &wrong, Backend::Cpu).is_err());
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (tokens, hidden, vocab, dtype) in [(8192, 4096, 128256, DType::BF16), (37, 200, 1000, DType::F32)] {
        let p = LinearCrossEntropyProblem { tokens, hidden, vocab, dtype, label_smoothing: 0.1 };
        for o in OPS {
            for chip in Chip::ALL {
                let module = op::tpu_module(&o, &p, None, chip).unwrap_or_else(|e| panic!("{o:?} {p:?}: {e}"));
                compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{o:?} {p:?} on {chip}: {e}"));
            }
        }
    }
}
