//! What the tuner tunes: a kernel at fixed shapes, with block-shape tunables.

use rand::rngs::StdRng;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{HostArray, PallasCall};

use crate::space::{Config, SearchSpace};

/// A kernel at fixed shapes whose block shapes (and other tunables) are open.
pub trait Tunable: Send + Sync {
    /// The kernel's name (part of the cache key).
    fn kernel(&self) -> String;
    /// Shapes and dtypes, e.g. `m1024n1024k1024/f32` (part of the cache key).
    fn problem(&self) -> String;
    fn space(&self) -> SearchSpace;
    /// What a user gets without tuning (Pallas' customary 128 blocks).
    fn default_config(&self) -> Config;
    /// The call at `config`; an error where the config does not fit the problem.
    fn build(&self, config: &Config) -> crate::Result<PallasCall>;
    /// The operands' types (scalar-prefetch arrays, then inputs). Override it where they are
    /// known without allocating the inputs: a cache lookup asks for them on every call.
    fn operand_types(&self) -> Vec<ValueType> {
        self.random_inputs(&mut rand::SeedableRng::seed_from_u64(0)).iter().map(HostArray::value_type).collect()
    }
    /// Scalar-prefetch arrays, then inputs.
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray>;
    /// Scalar-prefetch arrays typical of the problem, for the TPU model to evaluate the index
    /// maps and conditions that read them (a grouped matmul's group ends); none by default,
    /// and then a block they place counts as fetched at every step.
    fn sample_tables(&self) -> Vec<HostArray> {
        Vec::new()
    }
}

/// Powers of two from 64 up to the first one covering `dim` (at most `cap`).
pub fn block_candidates(dim: usize, cap: usize) -> Vec<usize> {
    let top = dim.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(64, cap);
    std::iter::successors(Some(64usize), |b| Some(b * 2)).take_while(|&b| b <= top).collect()
}
