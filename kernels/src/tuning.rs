//! The shipped kernels as autotuner problems, shape buckets, and the tuned tables: JSON per
//! target (`cpu` and each TPU chip) from buckets to block configs, made by `torchtpu tables`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use rand::rngs::StdRng;
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::{Config, SearchSpace, Tunable};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, PallasCall};
use torchtpu_runtime::Chip;

use crate::flash::{self, AttentionOptions, AttentionShape, FlashPass};
use crate::matmul::{self, MatmulOptions, MatmulShape};
use crate::Error;

/// What a table is for: the CPU through PJRT, or one TPU generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableTarget {
    Cpu,
    Chip(Chip),
}

impl TableTarget {
    pub fn name(self) -> &'static str {
        match self {
            TableTarget::Cpu => "cpu",
            TableTarget::Chip(c) => c.name(),
        }
    }

    pub const ALL: [TableTarget; 6] =
        [TableTarget::Cpu, TableTarget::Chip(Chip::V4), TableTarget::Chip(Chip::V5e), TableTarget::Chip(Chip::V5p), TableTarget::Chip(Chip::V6e), TableTarget::Chip(Chip::Tpu7x)];
}

/// `n` rounded up to a power of two within [lo, hi].
fn bucket(n: usize, lo: usize, hi: usize) -> usize {
    n.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(lo, hi)
}

/// Matmul bucket: each dim rounded up to a power of two, with the dtype and layout.
pub fn matmul_bucket(s: MatmulShape, dtype: DType, transpose_b: bool) -> String {
    format!("m{}n{}k{}/{dtype}{}", bucket(s.m, 128, 8192), bucket(s.n, 128, 8192), bucket(s.k, 128, 8192), if transpose_b { "/nt" } else { "" })
}

/// Attention bucket: the longer sequence rounded up to a power of two, head dim, mask, dtype.
pub fn flash_bucket(s: AttentionShape, dtype: DType, causal: bool) -> String {
    format!("s{}d{}/{}/{dtype}", bucket(s.q_len.max(s.kv_len), 128, 16384), s.head_dim, if causal { "causal" } else { "full" })
}

/// The matmul at one shape, its blocks open.
pub struct MatmulTunable {
    pub shape: MatmulShape,
    pub dtype: DType,
    pub transpose_b: bool,
}

impl Tunable for MatmulTunable {
    fn kernel(&self) -> String {
        "kernels.matmul".into()
    }
    fn problem(&self) -> String {
        format!("{:?}/{}/{}", self.shape, self.dtype, if self.transpose_b { "nt" } else { "nn" })
    }
    fn space(&self) -> SearchSpace {
        let s = self.shape;
        SearchSpace::new().param("bm", block_candidates(s.m, 1024)).param("bn", block_candidates(s.n, 1024)).param("bk", block_candidates(s.k, 1024))
    }
    fn default_config(&self) -> Config {
        Config(vec![("bm".into(), 128), ("bn".into(), 128), ("bk".into(), 128)])
    }
    fn build(&self, c: &Config) -> torchtpu_autotune::Result<PallasCall> {
        let opts = MatmulOptions { transpose_b: self.transpose_b, block: Some((c.value("bm"), c.value("bn"), c.value("bk"))) };
        matmul::call(self.shape, self.dtype, opts).map_err(|e| torchtpu_autotune::Error::Invalid(e.to_string()))
    }
    fn operand_types(&self) -> Vec<ValueType> {
        matmul::operand_types(self.shape, self.dtype, self.transpose_b)
    }
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        self.operand_types().iter().map(|t| random(rng, t.dtype, &t.shape)).collect()
    }
}

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    use rand::Rng;
    let a = ndarray::ArrayD::from_shape_simple_fn(shape.to_vec(), || rng.random_range(-1.0..1.0));
    HostArray::from_f64(dtype, &a)
}

/// One attention kernel (forward, or one of the two backward kernels) at one shape, its
/// blocks open.
pub struct FlashTunable {
    pub pass: FlashPass,
    pub shape: AttentionShape,
    pub dtype: DType,
    pub causal: bool,
}

impl Tunable for FlashTunable {
    fn kernel(&self) -> String {
        format!("kernels.{}", self.pass.table_key())
    }
    fn problem(&self) -> String {
        format!("{:?}/{}/{}", self.shape, self.dtype, if self.causal { "causal" } else { "full" })
    }
    fn space(&self) -> SearchSpace {
        SearchSpace::new().param("bq", block_candidates(self.shape.q_len, 2048)).param("bk", block_candidates(self.shape.kv_len, 2048))
    }
    fn default_config(&self) -> Config {
        Config(vec![("bq".into(), 128), ("bk".into(), 128)])
    }
    fn build(&self, c: &Config) -> torchtpu_autotune::Result<PallasCall> {
        let opts = AttentionOptions { causal: self.causal, sm_scale: None, block: Some((c.value("bq"), c.value("bk"))) };
        let call = match self.pass {
            FlashPass::Forward => flash::forward_call(self.shape, self.dtype, opts, false),
            pass => flash::backward_call(pass, self.shape, self.dtype, opts, false),
        };
        call.map_err(|e| torchtpu_autotune::Error::Invalid(e.to_string()))
    }
    fn operand_types(&self) -> Vec<ValueType> {
        match self.pass {
            FlashPass::Forward => flash::forward_operand_types(self.shape, self.dtype, false),
            _ => flash::backward_operand_types(self.shape, self.dtype, false),
        }
    }
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        // Random floats (for the backward, o, dO and lse need only be finite for timing, not
        // a consistent forward); the i32 operands are segment ids, all one segment.
        self.operand_types()
            .iter()
            .map(|t| if t.dtype == DType::I32 { HostArray::from(ndarray::ArrayD::<i32>::zeros(t.shape.clone())) } else { random(rng, t.dtype, &t.shape) })
            .collect()
    }
}

/// The tables shipped in the crate, one JSON file per target.
const TABLES: [(&str, &str); 6] = [
    ("cpu", include_str!("../tables/cpu.json")),
    ("v4", include_str!("../tables/v4.json")),
    ("v5e", include_str!("../tables/v5e.json")),
    ("v5p", include_str!("../tables/v5p.json")),
    ("v6e", include_str!("../tables/v6e.json")),
    ("tpu7x", include_str!("../tables/tpu7x.json")),
];

/// A target's table: kernel → bucket → config (`bm=..,bn=..`).
pub type Table = BTreeMap<String, BTreeMap<String, String>>;

/// A target's table, parsed once per process.
pub fn table(target: TableTarget) -> Result<&'static Table, Error> {
    static PARSED: OnceLock<Vec<(&'static str, Result<Table, String>)>> = OnceLock::new();
    let parsed = PARSED.get_or_init(|| {
        TABLES.iter().map(|&(name, text)| (name, serde_json::from_str(text).map_err(|e| format!("the {name} table is not valid JSON: {e}")))).collect()
    });
    match parsed.iter().find(|(n, _)| *n == target.name()) {
        Some((_, Ok(t))) => Ok(t),
        Some((_, Err(e))) => Err(Error::Table(e.clone())),
        None => Err(Error::Table(format!("no table for {}", target.name()))),
    }
}

fn parse_config(s: &str) -> Option<Vec<(String, usize)>> {
    s.split(',').map(|kv| kv.split_once('=').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))).collect()
}

/// The tuned block for `kernel` at `bucket` on `target`, if the table has one.
pub fn tuned(target: TableTarget, kernel: &str, bucket: &str) -> Option<Vec<(String, usize)>> {
    table(target).ok()?.get(kernel)?.get(bucket).and_then(|c| parse_config(c))
}

/// The table a backend uses: the CPU's for the CPU and the interpreter, a chip's for a TPU
/// (`$TORCHTPU_TPU_CHIP`, default v5e); none for CUDA.
pub fn target_of(backend: torchtpu_exec::Backend) -> Option<TableTarget> {
    use torchtpu_exec::Backend;
    match backend {
        Backend::Cpu | Backend::Interpret => Some(TableTarget::Cpu),
        Backend::Cuda => None,
        Backend::Tpu => {
            let chip = std::env::var("TORCHTPU_TPU_CHIP").ok().and_then(|c| c.parse().ok()).unwrap_or(Chip::V5e);
            Some(TableTarget::Chip(chip))
        }
    }
}

/// The device `torchtpu tune` tunes for a target (whose cache [`choose`] reads).
pub fn tuning_device(target: TableTarget) -> torchtpu_autotune::Device {
    match target {
        TableTarget::Cpu => torchtpu_autotune::Device::Pjrt(torchtpu_exec::Backend::Cpu),
        TableTarget::Chip(c) => torchtpu_autotune::Device::Chip(c),
    }
}

/// Which tuned config a call uses: a cached tuning result for the exact problem (what
/// `torchtpu tune` wrote on this machine), else its bucket's table entry, else none (the
/// kernel's safe default).
pub fn choose(target: Option<TableTarget>, kernel: &str, bucket: &str, problem: &dyn Tunable) -> Option<Vec<(String, usize)>> {
    let target = target?;
    torchtpu_autotune::cached_best(problem, tuning_device(target)).map(|c| c.0).or_else(|| tuned(target, kernel, bucket))
}

/// The problems `torchtpu tables` tunes for each target: one per bucket.
pub fn table_problems(target: TableTarget) -> Vec<(String, String, Box<dyn Tunable>)> {
    let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
    let sizes: &[usize] = if target == TableTarget::Cpu { &[512, 1024, 2048] } else { &[512, 1024, 2048, 4096] };
    let mut out: Vec<(String, String, Box<dyn Tunable>)> = Vec::new();
    for &dtype in dtypes {
        for &n in sizes {
            let shape = MatmulShape { batch: None, m: n, n, k: n };
            out.push(("matmul".into(), matmul_bucket(shape, dtype, false), Box::new(MatmulTunable { shape, dtype, transpose_b: false })));
        }
        for &seq in sizes {
            for causal in [true, false] {
                let heads = if target == TableTarget::Cpu { 4 } else { 8 };
                let shape = AttentionShape { batch: 1, heads, kv_heads: heads, q_len: seq, kv_len: seq, head_dim: 128 };
                for pass in FlashPass::ALL {
                    out.push((pass.table_key().into(), flash_bucket(shape, dtype, causal), Box::new(FlashTunable { pass, shape, dtype, causal })));
                }
            }
        }
    }
    out
}
