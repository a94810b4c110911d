//! Gated linear units (SwiGLU, GeGLU exact and tanh), forward and backward, against f64 on
//! fresh random inputs: ragged blocks in both dims, f32 and bf16, on the interpreter (checked)
//! and PJRT CPU; the f64 derivatives against finite differences; compiled by libtpu for every chip.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::accuracy::{relative_error, tolerance};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::glu::{libm_erf, reference_activation, Activation, GluConfig, GluOp, GluProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

const ACTIVATIONS: [Activation; 3] = [Activation::Silu, Activation::Gelu, Activation::GeluTanh];

#[test]
fn forward_and_backward_match_f64_on_every_backend() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    for (rows, dim) in [(1, 128), (37, 300), (64, 1024)] {
        for dtype in [DType::F32, DType::BF16] {
            for activation in ACTIVATIONS {
                let p = GluProblem { rows, dim, dtype, activation };
                for o in [GluOp::Forward, GluOp::Backward] {
                    // Gates in [-4, 4): both tails of the activations.
                    let inputs: Vec<HostArray> = o.random_inputs(&p, &mut rng).iter().map(|a| HostArray::from_f64(dtype, &(a.to_f64() * 4.0))).collect();
                    let want = o.reference(&p, &inputs);
                    let small = o.fit(&p, GluConfig { block_rows: 16, block_cols: 128 });
                    let checked = o.call(&p, &small).expect("call").interpret_checked(&inputs).expect("interprets");
                    let on_cpu = op::run(&o, &p, None, &inputs, Backend::Cpu).expect("runs on PJRT CPU");
                    for (how, outputs) in [("interpreter", checked), ("PJRT CPU", on_cpu)] {
                        for (i, (got, w)) in outputs.iter().zip(&want).enumerate() {
                            let err = relative_error(got, w);
                            assert!(err <= 2.0 * tolerance(dtype), "{o:?} {p:?} output {i} on {how} (seed {seed}): {err:e}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn reference_derivatives_agree_with_finite_differences() {
    let h = 1e-6;
    for activation in ACTIVATIONS {
        for x in [-5.0, -2.5, -1.0, -0.3, 0.0, 0.4, 1.0, 2.2, 5.0] {
            let fd = (reference_activation(activation, x + h).0 - reference_activation(activation, x - h).0) / (2.0 * h);
            let derivative = reference_activation(activation, x).1;
            assert!(approx::abs_diff_eq!(fd, derivative, epsilon = 1e-8), "{activation:?} at {x}: {fd} vs {derivative}");
        }
    }
    // The series erf against values known to 1e-15 (Abramowitz and Stegun, table 7.1).
    for (x, erf) in [(0.5, 0.520_499_877_813_047), (1.0, 0.842_700_792_949_715), (2.0, 0.995_322_265_018_953), (3.5, 0.999_999_256_901_628)] {
        assert!(approx::abs_diff_eq!(libm_erf(x), erf, epsilon = 1e-12) && approx::abs_diff_eq!(libm_erf(-x), -erf, epsilon = 1e-12), "erf({x}) = {}", libm_erf(x));
    }
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for activation in ACTIVATIONS {
        // The last two take the heuristic (no table bucket): whole rows of 11008 and 16384.
        for (rows, dim, dtype) in [(2048, 4096, DType::BF16), (37, 300, DType::F32), (4096, 11008, DType::F32), (4096, 16384, DType::BF16)] {
            let p = GluProblem { rows, dim, dtype, activation };
            for o in [GluOp::Forward, GluOp::Backward] {
                for chip in Chip::ALL {
                    let module = op::tpu_module(&o, &p, None, chip).unwrap_or_else(|e| panic!("{o:?} {p:?}: {e}"));
                    compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{o:?} {p:?} on {chip}: {e}"));
                }
            }
        }
    }
}
