//! The fused gated projection `act(x·W_gateᵀ)·(x·W_upᵀ)` against f64 on fresh random inputs:
//! ragged rows, columns and K, every activation, with and without the saved projections, f32 and
//! bf16, on the interpreter (checked) and PJRT CPU; compiled by libtpu for every chip.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::DType;
use torchtpu_exec::Backend;
use torchtpu_kernels::glu::Activation;
use torchtpu_kernels::glu_linear::{GluLinearConfig, GluLinearOp, GluLinearProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_runtime::{Chip, TpuCompiler};

#[test]
fn matches_f64_on_every_backend() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    for (rows, n, k) in [(1, 128, 64), (37, 300, 200), (64, 256, 384)] {
        for dtype in [DType::F32, DType::BF16] {
            for (activation, save) in [(Activation::Silu, false), (Activation::Gelu, true), (Activation::GeluTanh, false)] {
                let p = GluLinearProblem { rows, n, k, dtype, activation, save };
                let inputs = GluLinearOp.random_inputs(&p, &mut rng);
                common::assert_matches_f64(&GluLinearOp, &p, GluLinearConfig { bm: 16, bn: 128, bk: 128 }, &inputs, dtype, 4.0, seed);
            }
        }
    }
}

#[test]
fn empty_and_bad_problems() {
    let p = GluLinearProblem { rows: 3, n: 5, k: 0, dtype: DType::F32, activation: Activation::Silu, save: true };
    let out = op::run(&GluLinearOp, &p, None, &GluLinearOp.random_inputs(&p, &mut StdRng::seed_from_u64(0)), Backend::Cpu).expect("k = 0");
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|o| o.shape() == [3, 5] && o.to_f64().iter().all(|&v| v == 0.0)), "no K: zero projections, act(0)·0 = 0");
    assert!(GluLinearOp.check(&GluLinearProblem { dtype: DType::I32, ..p }).is_err());
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (rows, n, k, dtype, save) in [(4096, 11008, 4096, DType::BF16, false), (4096, 11008, 4096, DType::BF16, true), (37, 300, 200, DType::F32, true)] {
        let p = GluLinearProblem { rows, n, k, dtype, activation: Activation::GeluTanh, save };
        for chip in Chip::ALL {
            let module = op::tpu_module(&GluLinearOp, &p, None, chip).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{p:?} on {chip}: {e}"));
        }
    }
}
