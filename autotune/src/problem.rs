//! What the tuner tunes: a kernel at fixed shapes, with block-shape tunables.

use rand::rngs::StdRng;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, PallasCall};
use torchtpu_testkernels::{flash::Flash, matmul::Matmul, Example};

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
}

/// Powers of two from 64 up to the first one covering `dim` (at most `cap`).
pub fn block_candidates(dim: usize, cap: usize) -> Vec<usize> {
    let top = dim.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(64, cap);
    std::iter::successors(Some(64usize), |b| Some(b * 2)).take_while(|&b| b <= top).collect()
}

/// `C = A·B` at fixed M, N, K; tunables `bm`, `bn`, `bk`.
pub struct MatmulProblem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
}

impl MatmulProblem {
    fn example(&self, c: &Config) -> Matmul {
        Matmul { m: self.m, n: self.n, k: self.k, block: (c.value("bm"), c.value("bn"), c.value("bk")), dtype: self.dtype }
    }
}

impl Tunable for MatmulProblem {
    fn kernel(&self) -> String {
        "matmul".into()
    }
    fn problem(&self) -> String {
        format!("m{}n{}k{}/{}", self.m, self.n, self.k, self.dtype)
    }
    fn space(&self) -> SearchSpace {
        SearchSpace::new()
            .param("bm", block_candidates(self.m, 1024))
            .param("bn", block_candidates(self.n, 1024))
            .param("bk", block_candidates(self.k, 1024))
    }
    fn default_config(&self) -> Config {
        Config(vec![("bm".into(), 128), ("bn".into(), 128), ("bk".into(), 128)])
    }
    fn build(&self, config: &Config) -> crate::Result<PallasCall> {
        Ok(self.example(config).call())
    }
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        self.example(&self.default_config()).random_inputs(rng)
    }
}

/// Causal flash attention at fixed shapes; tunables `bq`, `bk`.
pub struct FlashProblem {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl FlashProblem {
    fn example(&self, c: &Config) -> Flash {
        Flash { batch: self.batch, heads: self.heads, seq: self.seq, head_dim: self.head_dim, block_q: c.value("bq"), block_k: c.value("bk"), dtype: self.dtype }
    }
}

impl Tunable for FlashProblem {
    fn kernel(&self) -> String {
        "flash_attention".into()
    }
    fn problem(&self) -> String {
        format!("b{}h{}s{}d{}/causal/{}", self.batch, self.heads, self.seq, self.head_dim, self.dtype)
    }
    fn space(&self) -> SearchSpace {
        SearchSpace::new().param("bq", block_candidates(self.seq, 2048)).param("bk", block_candidates(self.seq, 2048))
    }
    fn default_config(&self) -> Config {
        Config(vec![("bq".into(), 128), ("bk".into(), 128)])
    }
    fn build(&self, config: &Config) -> crate::Result<PallasCall> {
        Ok(self.example(config).call())
    }
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        self.example(&self.default_config()).random_inputs(rng)
    }
}
