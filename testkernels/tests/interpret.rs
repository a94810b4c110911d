//! Every acceptance kernel, interpreted, against its f64 reference on fresh random inputs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::{DType, InterpretOptions};
use torchtpu_testkernels::{acceptance_set, flash, matmul, relative_error, tolerance, Example};

/// A fresh seed per run, printed so that a failure can be replayed with `TORCHTPU_SEED`.
fn seeded_rng() -> (StdRng, u64) {
    let seed = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    (StdRng::seed_from_u64(seed), seed)
}

fn check(example: &dyn Example, checked: bool) {
    let (mut rng, seed) = seeded_rng();
    let inputs = example.random_inputs(&mut rng);
    let outputs = example.call().interpret_with(&inputs, InterpretOptions { checked }).unwrap_or_else(|e| panic!("{} (checked: {checked}): {e}", example.name()));
    let reference = example.reference(&inputs);
    assert_eq!(outputs.len(), reference.len(), "{}", example.name());
    for (i, (out, r)) in outputs.iter().zip(&reference).enumerate() {
        let err = relative_error(out, r);
        let tol = tolerance(example.dtype());
        assert!(err <= tol, "{} output {i} (checked: {checked}, seed {seed}): relative error {err:e} > {tol:e}", example.name());
    }
}

#[test]
fn acceptance_kernels_match_their_references() {
    for example in acceptance_set() {
        check(example.as_ref(), false);
    }
}

#[test]
fn acceptance_kernels_pass_checked_mode() {
    for example in acceptance_set() {
        check(example.as_ref(), true);
    }
}

#[test]
fn flash_attention_long_sequence_batch_one() {
    for dtype in [DType::F32, DType::BF16] {
        check(&flash::Flash { batch: 1, heads: 2, seq: 1024, head_dim: 64, block_q: 128, block_k: 128, dtype }, true);
    }
}

#[test]
fn flash_attention_single_block_and_uneven_blocks() {
    check(&flash::Flash { batch: 1, heads: 1, seq: 40, head_dim: 16, block_q: 128, block_k: 128, dtype: DType::F32 }, true);
    check(&flash::Flash { batch: 3, heads: 2, seq: 130, head_dim: 16, block_q: 32, block_k: 64, dtype: DType::F32 }, true);
}

#[test]
fn matmul_ragged_in_every_dim() {
    for dtype in [DType::F32, DType::BF16] {
        check(&matmul::Matmul { m: 1, n: 1, k: 1, block: (8, 128, 128), dtype }, true);
        check(&matmul::Matmul { m: 129, n: 257, k: 513, block: (64, 128, 256), dtype }, true);
    }
}
