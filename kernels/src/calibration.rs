//! Published per-config TPU timings of kernels like ours, and how well the TPU model ranks
//! them. Each file of `autotune/calibration/` cites its source and holds problems, each with
//! the configs a real chip ran and their times. For a problem, the model ranks the configs the
//! source searched over (the measured ones; for an autotuning cache that keeps only the
//! winner, the space that cache was searched over too), mapped onto our kernel's config;
//! libtpu prunes the configs it cannot compile for our kernel; the model's pick is compared
//! with the measured winner.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use torchtpu_autotune::model::{features, predict_tpu_seconds, vmem_estimate};
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::{DType, HostArray, TracedCall};
use torchtpu_runtime::{Chip, TpuCompiler};

use crate::flash::{AttentionShape, FlashConfig, FlashOp, FlashPass, FlashProblem};
use crate::gmm::{group_ends, GroupedConfig, GroupedOp, GroupedProblem};
use crate::matmul::{MatmulConfig, MatmulOp, MatmulProblem, MatmulShape};
use crate::op::{call_for, Op};
use crate::tables::TableTarget;
use crate::Error;

/// The calibration data shipped in the repository.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../autotune/calibration")
}

/// One source's timings on one chip.
#[derive(Clone, Debug, Deserialize)]
pub struct Dataset {
    pub source: String,
    pub chip: String,
    /// `matmul`, `ragged_dot` (a forward grouped matmul, megablox's grid: our `gmm`) or
    /// `flash_attention`.
    pub kernel: String,
    /// Which problems the model's fitted constants were chosen on (`calibration`), and which
    /// it never saw (`holdout`): a problem's own `split`, else this.
    #[serde(default)]
    pub split: Option<Split>,
    /// The candidates an autotuning cache searched: values per config field, each at most its
    /// dim; with `long_dim`, a dim at least that long takes blocks of at least `long_min_block`.
    #[serde(default)]
    pub space: Option<SourceSpace>,
    /// Passes over every input and output in HBM that the source's timing includes beyond the
    /// kernel (tokamax times its layout transposes with it: a read and a write of each, 2);
    /// added to the prediction at the chip's HBM bandwidth.
    #[serde(default)]
    pub extra_hbm_passes: f64,
    /// The scoped VMEM the source's kernel ran with: `default` where it set no
    /// `vmem_limit_bytes` (the chip's default scoped VMEM); absent, the limit our tuner
    /// chooses. A config that does not fit the source's limit was never a candidate there, so
    /// our kernel is judged at the same limit.
    #[serde(default)]
    pub vmem_limit: Option<SourceVmemLimit>,
    pub problems: Vec<Entry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceVmemLimit {
    Default,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Calibration,
    Holdout,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SourceSpace {
    pub values: BTreeMap<String, Vec<usize>>,
    #[serde(default)]
    pub long_dim: Option<usize>,
    #[serde(default)]
    pub long_min_block: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Entry {
    pub problem: Value,
    pub measured: Vec<Measurement>,
    #[serde(default)]
    pub split: Option<Split>,
    /// The timing method's own floor dominates (Python dispatch around a microsecond kernel):
    /// ranked, but left out of predicted ÷ measured.
    #[serde(default)]
    pub dispatch_bound: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Measurement {
    pub config: Value,
    /// `None` where the source reports a failure.
    pub seconds: Option<f64>,
}

/// One of our ops at one problem, a config open.
#[derive(Clone, Debug)]
enum Ours {
    Matmul(MatmulProblem),
    Flash(FlashProblem),
    /// With the problem's group ends, which the model reads as the kernel's index maps do.
    Grouped(GroupedProblem, Vec<i32>),
}

/// One of our configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum OurConfig {
    Matmul { bm: usize, bn: usize, bk: usize },
    Flash { bq: usize, bk: usize, bkc: usize },
}

impl OurConfig {
    /// The config without how a block is computed (the kv sub-block): what the published
    /// config is compared on, since the source's kernel splits its blocks its own way.
    fn blocks(self) -> OurConfig {
        match self {
            OurConfig::Flash { bq, bk, .. } => OurConfig::Flash { bq, bk, bkc: 0 },
            other => other,
        }
    }
}

impl std::fmt::Display for OurConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OurConfig::Matmul { bm, bn, bk } => write!(f, "bm={bm},bn={bn},bk={bk}"),
            OurConfig::Flash { bq, bk, bkc: 0 } => write!(f, "bq={bq},bk={bk}"),
            OurConfig::Flash { bq, bk, bkc } => write!(f, "bq={bq},bk={bk},bkc={bkc}"),
        }
    }
}

fn field(v: &Value, name: &str) -> Result<usize, String> {
    v.get(name).and_then(Value::as_u64).map(|n| n as usize).ok_or_else(|| format!("no whole number `{name}` in {v}"))
}

fn dtype(v: &Value) -> Result<DType, String> {
    match v.get("dtype").and_then(Value::as_str) {
        Some("bf16") => Ok(DType::BF16),
        Some("f32") => Ok(DType::F32),
        other => Err(format!("dtype {other:?} is not one we calibrate (bf16, f32)")),
    }
}

impl Ours {
    fn of(kernel: &str, p: &Value) -> Result<Ours, String> {
        match kernel {
            "ragged_dot" => {
                if p.get("mode").and_then(Value::as_str) != Some("gmm") {
                    return Err("a ragged dot other than the forward one (gmm)".into());
                }
                let sizes: Vec<i64> = p
                    .get("group_sizes")
                    .and_then(Value::as_array)
                    .ok_or("no `group_sizes` list")?
                    .iter()
                    .map(|v| v.as_i64().ok_or("a group size that is not a whole number"))
                    .collect::<Result<_, _>>()?;
                let problem = GroupedProblem { m: field(p, "m")?, k: field(p, "k")?, n: field(p, "n")?, groups: field(p, "num_groups")?, dtype: dtype(p)?, transpose_rhs: false };
                if sizes.len() != problem.groups {
                    return Err(format!("{} group sizes for {} groups", sizes.len(), problem.groups));
                }
                let ends = group_ends(&sizes, problem.m).map_err(|e| e.to_string())?;
                Ok(Ours::Grouped(problem, ends))
            }
            "matmul" => {
                let variant = p.get("variant").and_then(Value::as_str).unwrap_or("plain");
                let transpose_b = match variant {
                    "plain" | "relu" => false,
                    "transpose_rhs" => true,
                    other => return Err(format!("matmul variant `{other}`")),
                };
                let shape = MatmulShape { batch: None, m: field(p, "m")?, n: field(p, "n")?, k: field(p, "k")? };
                Ok(Ours::Matmul(MatmulProblem { shape, dtype: dtype(p)?, transpose_b }))
            }
            "flash_attention" => {
                if field(p, "v_head_dim")? != field(p, "head_dim")? {
                    return Err("a value head dim unlike the query's".into());
                }
                let shape = AttentionShape {
                    batch: field(p, "batch")?,
                    heads: field(p, "q_heads")?,
                    kv_heads: field(p, "kv_heads")?,
                    q_len: field(p, "q_seq")?,
                    kv_len: field(p, "kv_seq")?,
                    head_dim: field(p, "head_dim")?,
                };
                let causal = p.get("causal").and_then(Value::as_bool).ok_or("no bool `causal`")?;
                Ok(Ours::Flash(FlashProblem { causal, ..FlashProblem::plain(shape, dtype(p)?) }))
            }
            other => Err(format!("kernel `{other}` has no counterpart among our ops")),
        }
    }

    /// The source's config as ours (a sub-block of the source's kernel has no counterpart).
    fn config(&self, c: &Value) -> Result<OurConfig, String> {
        match self {
            Ours::Matmul(_) | Ours::Grouped(..) => {
                let get = |a: &str, b: &str| field(c, a).or_else(|_| field(c, b)).map_err(|_| format!("no whole number `{a}` (or `{b}`) in {c}"));
                Ok(OurConfig::Matmul { bm: get("bm", "tile_m")?, bn: get("bn", "tile_n")?, bk: get("bk", "tile_k")? })
            }
            Ours::Flash(_) => Ok(OurConfig::Flash { bq: field(c, "block_q")?, bk: field(c, "block_kv")?, bkc: 0 }),
        }
    }

    /// The problem dim each of the source's config fields blocks.
    fn dim_of(&self, name: &str) -> Option<usize> {
        match self {
            Ours::Matmul(p) => match name {
                "bm" | "tile_m" => Some(p.shape.m),
                "bn" | "tile_n" => Some(p.shape.n),
                "bk" | "tile_k" => Some(p.shape.k),
                _ => None,
            },
            Ours::Grouped(p, _) => match name {
                "tile_m" => Some(p.m),
                "tile_n" => Some(p.n),
                "tile_k" => Some(p.k),
                _ => None,
            },
            Ours::Flash(p) => match name {
                "block_q" => Some(p.shape.q_len),
                "block_kv" | "block_kv_compute" => Some(p.shape.kv_len),
                _ => None,
            },
        }
    }

    /// Whether our op's own search space holds `c` (a tunable the space lacks holds 0 only)
    /// and its constraints accept it.
    fn in_our_space(&self, c: OurConfig) -> bool {
        let holds = |space: torchtpu_autotune::SearchSpace, pairs: &[(&str, usize)]| {
            let values = |n: &str| space.params().iter().find(|(name, _)| name == n).map(|(_, vals)| vals.clone());
            let value_of = |n: &str| pairs.iter().find(|(p, _)| *p == n).map_or(0, |&(_, v)| v);
            let point = torchtpu_autotune::Config(space.params().iter().map(|(n, _)| (n.clone(), value_of(n))).collect());
            pairs.iter().all(|&(n, v)| values(n).map_or(v == 0, |vals| vals.contains(&v))) && space.violation(&point).is_none()
        };
        match (self, c) {
            (Ours::Matmul(p), OurConfig::Matmul { bm, bn, bk }) => holds(MatmulOp.space(p), &[("bm", bm), ("bn", bn), ("bk", bk)]),
            (Ours::Flash(p), OurConfig::Flash { bq, bk, bkc }) => holds(FlashOp(FlashPass::Forward).space(p), &[("bq", bq), ("bk", bk), ("bkc", bkc)]),
            (Ours::Grouped(p, _), OurConfig::Matmul { bm, bn, bk }) => holds(GroupedOp::Gmm.space(p), &[("bm", bm), ("bn", bn), ("bk", bk)]),
            _ => false,
        }
    }

    /// Our kernel at `c` for `chip`, with the VMEM limit our tuner chooses, or `limit`.
    fn traced(&self, c: OurConfig, chip: Chip, limit: Option<u64>) -> Result<TracedCall, Error> {
        fn at<O: Op>(op: &O, p: &O::Problem, c: &O::Config, chip: Chip, limit: Option<u64>) -> Result<TracedCall, Error> {
            let call = call_for(op, p, Some(c), Some(TableTarget::Chip(chip)))?;
            let call = match limit {
                Some(bytes) => call.vmem_limit_bytes(bytes),
                None => call,
            };
            Ok(call.trace(&op.operand_types(p))?)
        }
        match (self, c) {
            (Ours::Matmul(p), OurConfig::Matmul { bm, bn, bk }) => at(&MatmulOp, p, &MatmulConfig { bm, bn, bk }, chip, limit),
            (Ours::Flash(p), OurConfig::Flash { bq, bk, bkc }) => at(&FlashOp(FlashPass::Forward), p, &FlashConfig { bq, bk, bkc }, chip, limit),
            (Ours::Grouped(p, _), OurConfig::Matmul { bm, bn, bk }) => at(&GroupedOp::Gmm, p, &GroupedConfig { bm, bk, bn }, chip, limit),
            _ => Err(Error::Config(format!("config {c} is not one of this op's"))),
        }
    }

    /// `c` and, where our op offers it, the same blocks computed another way (attention's kv
    /// blocks whole or in sub-blocks).
    fn ways_to_compute(&self, c: OurConfig) -> Vec<OurConfig> {
        let space = match self {
            Ours::Flash(p) => FlashOp(FlashPass::Forward).space(p),
            Ours::Matmul(_) | Ours::Grouped(..) => return vec![c],
        };
        let widths = space.params().iter().find(|(n, _)| n == "bkc").map_or(vec![0], |(_, v)| v.clone());
        match c {
            OurConfig::Flash { bq, bk, .. } => {
                let ways: Vec<OurConfig> = widths.into_iter().map(|bkc| OurConfig::Flash { bq, bk, bkc }).filter(|&w| self.in_our_space(w)).collect();
                if ways.is_empty() {
                    vec![c.blocks()]
                } else {
                    ways
                }
            }
            other => vec![other],
        }
    }

    /// The scalar-prefetch tables of the problem, for the model (a grouped matmul's ends).
    fn tables(&self) -> Vec<HostArray> {
        match self {
            Ours::Grouped(_, ends) => vec![HostArray::from(ndarray::Array1::from(ends.clone()).into_dyn())],
            _ => Vec::new(),
        }
    }

    /// Bytes of the inputs and outputs a caller sees (attention: q, k, v and o).
    fn io_bytes(&self) -> f64 {
        let f = |n: usize| n as f64;
        match self {
            Ours::Matmul(p) => {
                let s = p.shape;
                (f(s.m) * f(s.k) + f(s.k) * f(s.n) + f(s.m) * f(s.n)) * f(p.dtype.size_bytes())
            }
            Ours::Grouped(p, _) => (f(p.m) * f(p.k) + f(p.groups) * f(p.k) * f(p.n) + f(p.m) * f(p.n)) * f(p.dtype.size_bytes()),
            Ours::Flash(p) => {
                let s = p.shape;
                2.0 * (f(s.batch) * f(s.heads) * f(s.q_len) + f(s.batch) * f(s.kv_heads) * f(s.kv_len)) * f(s.head_dim) * f(p.dtype.size_bytes())
            }
        }
    }

    /// The same kernel at `c` on a problem of one group of heads and at most two blocks
    /// along each dim: libtpu's verdict depends on the blocks, head dim, dtype and mask, which
    /// scoped VMEM holds, and on whether a dim has more than one block (a grid of one step is
    /// not double-buffered), not on how many steps there are.
    fn compile_key(&self, c: OurConfig) -> Ours {
        match (self, c) {
            (Ours::Matmul(p), OurConfig::Matmul { bm, bn, bk }) => {
                let s = p.shape;
                let two = |b: usize| b.saturating_mul(2);
                Ours::Matmul(MatmulProblem { shape: MatmulShape { m: s.m.min(two(bm)), n: s.n.min(two(bn)), k: s.k.min(two(bk)), ..s }, ..*p })
            }
            (Ours::Flash(p), OurConfig::Flash { bq, bk, .. }) => {
                let s = p.shape;
                let group = (s.heads / s.kv_heads.max(1)).max(1);
                let len = s.q_len.max(s.kv_len).min(bq.max(bk).saturating_mul(2));
                // Two batches where there are several, so that a grid of one block per
                // sequence still has more than one step.
                Ours::Flash(FlashProblem { shape: AttentionShape { batch: s.batch.min(2), heads: group, kv_heads: 1, q_len: len, kv_len: len, ..s }, ..*p })
            }
            (other, _) => other.clone(),
        }
    }
}

/// Every config the source searched for this problem, as ours.
fn source_candidates(ours: &Ours, space: &SourceSpace) -> Vec<OurConfig> {
    let mut fields: Vec<(&String, Vec<usize>)> = Vec::new();
    for (name, values) in &space.values {
        let Some(dim) = ours.dim_of(name) else { continue };
        let long = space.long_dim.is_some_and(|l| dim >= l);
        let min = if long { space.long_min_block.unwrap_or(0) } else { 0 };
        fields.push((name, values.iter().copied().filter(|&v| v <= dim && v >= min).collect()));
    }
    let mut configs = vec![serde_json::Map::new()];
    for (name, values) in fields {
        configs = configs.into_iter().flat_map(|c| values.iter().map(move |&v| with(c.clone(), name, v))).collect();
    }
    let mut out: Vec<OurConfig> = configs.into_iter().filter_map(|c| ours.config(&Value::Object(c)).ok()).collect();
    out.sort();
    out.dedup();
    out
}

fn with(mut m: serde_json::Map<String, Value>, name: &str, v: usize) -> serde_json::Map<String, Value> {
    m.insert(name.to_string(), Value::from(v));
    m
}

/// What became of the measured winner.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WinnerFate {
    /// Feasible and ranked.
    Ranked,
    /// Our op's search space does not hold it.
    OutsideOurSpace,
    /// libtpu (or tracing) rejects it for our kernel: the reason.
    Rejected(String),
}

/// The model against one published problem.
#[derive(Clone, Debug, Serialize)]
pub struct ProblemScore {
    pub file: String,
    #[serde(serialize_with = "chip_name")]
    pub chip: Chip,
    pub split: Split,
    pub problem: String,
    pub winner: String,
    pub winner_seconds: f64,
    pub winner_fate: WinnerFate,
    /// The model's pick among the feasible candidates.
    pub pick: Option<String>,
    pub hit: bool,
    /// Measured time of the pick over the winner's, where the source measured the pick.
    pub regret: Option<f64>,
    /// Where the model ranks the winner among the feasible candidates (1 = its pick).
    pub winner_rank: Option<usize>,
    /// The best measured time among the model's three best over the winner's, where the
    /// source measured one of them (for a source that kept only its winner: 1 when the
    /// winner is among them).
    pub top3_regret: Option<f64>,
    /// Pairs of configs the source measured (both feasible for us, timed apart) that the
    /// model orders as the chip did, of all such pairs.
    pub pairs_in_order: (usize, usize),
    /// Predicted ÷ measured for the winner (none for dispatch-bound timings).
    pub ratio: Option<f64>,
    pub candidates: usize,
    pub feasible: usize,
}

fn chip_name<S: serde::Serializer>(c: &Chip, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

/// A problem the scorer could not map onto our ops.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub file: String,
    pub problem: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Score {
    pub problems: Vec<ProblemScore>,
    pub skipped: Vec<Skipped>,
}

/// Aggregates over a set of problems.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub problems: usize,
    pub hits: usize,
    pub top1: f64,
    pub median_regret: Option<f64>,
    /// Problems whose source timed the pick (all of a full sweep; for a source that kept only
    /// its winner, the hits alone, each a regret of 1).
    pub regrets: usize,
    pub median_ratio: Option<f64>,
    /// Winners whose predicted ÷ measured lies within 0.7–1.4, of those with a ratio.
    pub ratios_in_band: (usize, usize),
    pub min_ratio: Option<f64>,
    pub max_ratio: Option<f64>,
    pub winners_outside_space: usize,
    pub winners_rejected: usize,
    /// Problems whose winner is among the model's three best.
    pub top3: f64,
    pub median_top3_regret: Option<f64>,
    /// Measured pairs the model orders as the chip did, of all (within each problem).
    pub pairs_in_order: (usize, usize),
    /// Spearman's rank correlation of predicted and measured winner times across the
    /// problems: whether the model orders problems by time as the chip does.
    pub spearman: Option<f64>,
}

/// Spearman's rank correlation of `a` and `b` (ties share their mean rank); none for fewer
/// than three pairs or a constant side.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut start = 0;
        while start < order.len() {
            let mut end = start + 1;
            while end < order.len() && v[order[end]] == v[order[start]] {
                end += 1;
            }
            for &i in &order[start..end] {
                r[i] = (start + end - 1) as f64 / 2.0 + 1.0;
            }
            start = end;
        }
        r
    }
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() as f64 + 1.0) / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - mean) * (y - mean)).sum();
    let var = |r: &[f64]| r.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
    let denominator = (var(&ra) * var(&rb)).sqrt();
    (denominator > 0.0).then(|| cov / denominator)
}

fn median(v: Vec<f64>) -> Option<f64> {
    torchtpu_autotune::stats::Summary::of(&v).map(|s| s.median_ms)
}

impl Summary {
    pub fn of<'a>(scores: impl IntoIterator<Item = &'a ProblemScore>) -> Summary {
        let s: Vec<&ProblemScore> = scores.into_iter().collect();
        let ratios: Vec<f64> = s.iter().filter_map(|p| p.ratio).collect();
        let hits = s.iter().filter(|p| p.hit).count();
        Summary {
            problems: s.len(),
            hits,
            top1: if s.is_empty() { 0.0 } else { hits as f64 / s.len() as f64 },
            median_regret: median(s.iter().filter_map(|p| p.regret).collect()),
            regrets: s.iter().filter(|p| p.regret.is_some()).count(),
            median_ratio: median(ratios.clone()),
            ratios_in_band: (ratios.iter().filter(|r| (0.7..=1.4).contains(*r)).count(), ratios.len()),
            min_ratio: ratios.iter().copied().reduce(f64::min),
            max_ratio: ratios.iter().copied().reduce(f64::max),
            winners_outside_space: s.iter().filter(|p| p.winner_fate == WinnerFate::OutsideOurSpace).count(),
            winners_rejected: s.iter().filter(|p| matches!(p.winner_fate, WinnerFate::Rejected(_))).count(),
            top3: if s.is_empty() { 0.0 } else { s.iter().filter(|p| p.winner_rank.is_some_and(|r| r <= 3)).count() as f64 / s.len() as f64 },
            median_top3_regret: median(s.iter().filter_map(|p| p.top3_regret).collect()),
            pairs_in_order: s.iter().fold((0, 0), |(a, b), p| (a + p.pairs_in_order.0, b + p.pairs_in_order.1)),
            spearman: {
                let timed: Vec<(f64, f64)> = s.iter().filter_map(|p| p.ratio.map(|r| (r * p.winner_seconds, p.winner_seconds))).collect();
                spearman(&timed.iter().map(|t| t.0).collect::<Vec<_>>(), &timed.iter().map(|t| t.1).collect::<Vec<_>>())
            },
        }
    }
}

/// Reads every `*.json` dataset in `dir`, in name order.
pub fn load(dir: &Path) -> Result<Vec<(String, Dataset)>, Error> {
    let bad = |what: String| Error::Argument(format!("calibration data {}: {what}", dir.display()));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("cannot list it: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let text = std::fs::read_to_string(&p).map_err(|e| bad(format!("{name}: {e}")))?;
            let d: Dataset = serde_json::from_str(&text).map_err(|e| bad(format!("{name} is not a dataset: {e}")))?;
            Ok((name, d))
        })
        .collect()
}

/// Whether libtpu compiles our kernel at a config: by chip, the compiled problem
/// ([`Ours::compile_key`]) with its VMEM limit, and config.
type Verdicts = HashMap<(Chip, String, OurConfig), Result<(), String>>;

/// Which candidates libtpu is asked about; the others are judged by the VMEM estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compile {
    /// Every candidate in our space.
    All,
    /// Only the configs a real chip ran (a quick check that they run for our kernels too).
    Measured,
    None,
}

/// Scores the model on `datasets`; libtpu decides which of the candidates `compile` names our
/// kernel can run.
pub fn score(datasets: &[(String, Dataset)], compile: Compile) -> Result<Score, Error> {
    struct Job {
        file: String,
        chip: Chip,
        split: Split,
        label: String,
        ours: Ours,
        measured: Vec<(OurConfig, f64)>,
        winner: (OurConfig, f64),
        candidates: Vec<OurConfig>,
        dispatch_bound: bool,
        extra_seconds: f64,
        /// The source's VMEM limit (none: ours).
        limit: Option<u64>,
    }
    impl Job {
        /// The VMEM limit `c` is judged at: the source's, except for blocks the source ran,
        /// which fit its kernel there and get the limit our tuner would give our kernel.
        fn limit_for(&self, c: OurConfig) -> Option<u64> {
            if self.measured.iter().any(|m| m.0.blocks() == c.blocks()) {
                None
            } else {
                self.limit
            }
        }

        /// What libtpu's verdict on `c` is filed under, beside the chip and config: the
        /// compiled problem and its VMEM limit.
        fn verdict_name(&self, c: OurConfig) -> String {
            format!("{:?} {:?}", self.ours.compile_key(c), self.limit_for(c))
        }
    }
    let mut out = Score::default();
    let mut jobs = Vec::new();
    for (file, d) in datasets {
        let skip = |problem: &Value, reason: String| Skipped { file: file.clone(), problem: problem.to_string(), reason };
        let chip: Chip = match d.chip.parse() {
            Ok(c) => c,
            Err(e) => {
                out.skipped.push(skip(&Value::Null, e.to_string()));
                continue;
            }
        };
        for e in &d.problems {
            let ours = match Ours::of(&d.kernel, &e.problem) {
                Ok(o) => o,
                Err(r) => {
                    out.skipped.push(skip(&e.problem, r));
                    continue;
                }
            };
            let measured: Result<Vec<(OurConfig, f64)>, String> =
                e.measured.iter().filter_map(|m| m.seconds.filter(|s| s.is_finite() && *s > 0.0).map(|s| ours.config(&m.config).map(|c| (c, s)))).collect();
            let measured = match measured {
                Ok(m) => m,
                Err(r) => {
                    out.skipped.push(skip(&e.problem, r));
                    continue;
                }
            };
            let Some(winner) = measured.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) else {
                out.skipped.push(skip(&e.problem, "no finite measured time".into()));
                continue;
            };
            let mut candidates: Vec<OurConfig> = measured.iter().map(|&(c, _)| c).collect();
            if let Some(space) = &d.space {
                candidates.extend(source_candidates(&ours, space));
            }
            candidates = candidates.into_iter().flat_map(|c| ours.ways_to_compute(c)).collect();
            candidates.sort();
            candidates.dedup();
            let split = e.split.or(d.split).unwrap_or(Split::Holdout);
            let label = e.problem.to_string();
            let extra_seconds = d.extra_hbm_passes * ours.io_bytes() / chip.hbm_bytes_per_second();
            let limit = d.vmem_limit.map(|SourceVmemLimit::Default| chip.default_scoped_vmem_bytes());
            jobs.push(Job { file: file.clone(), chip, split, label, ours, measured, winner, candidates, dispatch_bound: e.dispatch_bound, extra_seconds, limit });
        }
    }
    let mut verdicts = Verdicts::new();
    if compile != Compile::None {
        let compiler = TpuCompiler::shared().map_err(|e| Error::Argument(format!("libtpu: {e}")))?;
        let mut wanted: Vec<(Chip, String, Ours, OurConfig, Option<u64>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for j in &jobs {
            let asked: Vec<OurConfig> = match compile {
                Compile::Measured => j.measured.iter().flat_map(|m| j.ours.ways_to_compute(m.0)).collect(),
                _ => j.candidates.clone(),
            };
            for c in asked {
                let name = j.verdict_name(c);
                if j.ours.in_our_space(c) && seen.insert((j.chip, name.clone(), c)) {
                    wanted.push((j.chip, name, j.ours.compile_key(c), c, j.limit_for(c)));
                }
            }
        }
        let results: Vec<_> = wanted
            .par_iter()
            .map(|(chip, name, key, c, limit)| {
                let verdict = key
                    .traced(*c, *chip, *limit)
                    .map_err(|e| e.to_string())
                    .and_then(|t| lower(&t, Target::TpuStableHlo).map_err(|e| e.to_string()))
                    .and_then(|m| compiler.compile(*chip, &m).map(|_| ()).map_err(|e| torchtpu_autotune::compiler_reason(&e.message)));
                ((*chip, name.clone(), *c), verdict)
            })
            .collect();
        verdicts.extend(results);
    }
    let scored: Vec<ProblemScore> = jobs
        .par_iter()
        .map(|j| {
            let trace = |c: OurConfig| j.ours.traced(c, j.chip, j.limit_for(c)).map_err(|e| e.to_string());
            let tables = j.ours.tables();
            let seconds = |traced: &TracedCall| -> Result<f64, String> {
                let f = features(traced, &tables).map_err(|e| e.to_string())?;
                Ok(predict_tpu_seconds(traced, &f, j.chip, &tables) + j.extra_seconds)
            };
            // Feasible (libtpu's verdict, else the VMEM estimate's), then predicted: one trace.
            let judge = |c: OurConfig| -> Result<f64, String> {
                if !j.ours.in_our_space(c) {
                    return Err("outside our space".into());
                }
                let by_libtpu = verdicts.get(&(j.chip, j.verdict_name(c), c));
                if let Some(Err(reason)) = by_libtpu {
                    return Err(reason.clone());
                }
                let traced = trace(c)?;
                if by_libtpu.is_none() {
                    // The VMEM estimate against the limit the call carries (the source's, or
                    // the one our tuner sets) says what could not have run there.
                    let room = traced.vmem_limit_bytes.unwrap_or(j.chip.default_scoped_vmem_bytes());
                    let need = vmem_estimate(&traced);
                    if need > room as f64 {
                        return Err(format!("VMEM estimate {:.1} MiB > {:.0} MiB", need / 1048576.0, room as f64 / 1048576.0));
                    }
                }
                seconds(&traced)
            };
            let (winner, winner_seconds) = j.winner;
            // Every candidate judged once; the winner's ways of computing its blocks are among them.
            let judged: Vec<(OurConfig, Result<f64, String>)> = j.candidates.iter().map(|&c| (c, judge(c))).collect();
            let mut ranked: Vec<(OurConfig, f64)> = judged.iter().filter_map(|(c, r)| r.as_ref().ok().map(|&t| (*c, t))).collect();
            ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
            let winner_fate = if !j.ours.ways_to_compute(winner).iter().any(|&c| j.ours.in_our_space(c)) {
                WinnerFate::OutsideOurSpace
            } else if ranked.iter().any(|(c, _)| c.blocks() == winner.blocks()) {
                WinnerFate::Ranked
            } else {
                let reasons: Vec<String> = judged.iter().filter(|(c, _)| c.blocks() == winner.blocks()).filter_map(|(_, r)| r.as_ref().err().cloned()).collect();
                WinnerFate::Rejected(reasons.join("; "))
            };
            let winner_predicted = ranked.iter().filter(|(c, _)| c.blocks() == winner.blocks()).map(|&(_, t)| t).reduce(f64::min);
            let pick = ranked.first().map(|&(c, _)| c);
            let measured_of = |c: OurConfig| j.measured.iter().filter(|m| m.0.blocks() == c.blocks()).map(|m| m.1).reduce(f64::min);
            let ratio = if j.dispatch_bound { None } else { winner_predicted.or_else(|| trace(winner).and_then(|t| seconds(&t)).ok()).map(|p| p / winner_seconds) };
            let predicted_of = |c: OurConfig| ranked.iter().filter(|(r, _)| r.blocks() == c.blocks()).map(|&(_, t)| t).reduce(f64::min);
            let winner_rank = ranked.iter().position(|(c, _)| c.blocks() == winner.blocks()).map(|r| r + 1);
            let top3_regret = ranked.iter().take(3).filter_map(|&(c, _)| measured_of(c)).reduce(f64::min).map(|t| t / winner_seconds);
            let timed: Vec<(f64, f64)> = j.measured.iter().filter_map(|m| predicted_of(m.0).map(|p| (p, m.1))).collect();
            let mut pairs_in_order = (0, 0);
            for (i, a) in timed.iter().enumerate() {
                for b in &timed[i + 1..] {
                    if a.1 != b.1 {
                        pairs_in_order.1 += 1;
                        if (a.0 < b.0) == (a.1 < b.1) {
                            pairs_in_order.0 += 1;
                        }
                    }
                }
            }
            ProblemScore {
                file: j.file.clone(),
                chip: j.chip,
                split: j.split,
                problem: j.label.clone(),
                winner: winner.to_string(),
                winner_seconds,
                winner_fate,
                pick: pick.map(|c| c.to_string()),
                hit: pick.map(OurConfig::blocks) == Some(winner.blocks()),
                regret: pick.and_then(measured_of).map(|t| t / winner_seconds),
                winner_rank,
                top3_regret,
                pairs_in_order,
                ratio,
                candidates: j.candidates.len(),
                feasible: ranked.len(),
            }
        })
        .collect();
    out.problems = scored;
    Ok(out)
}

impl Score {
    /// Summaries per (file, split), then per (chip, split), then per split.
    pub fn summaries(&self) -> Vec<(String, Summary)> {
        let mut groups: BTreeMap<String, Vec<&ProblemScore>> = BTreeMap::new();
        for p in &self.problems {
            let split = format!("{:?}", p.split).to_lowercase();
            groups.entry(format!("1 {} [{split}]", p.file)).or_default().push(p);
            groups.entry(format!("2 {} [{split}]", p.chip)).or_default().push(p);
            groups.entry(format!("3 all [{split}]")).or_default().push(p);
        }
        groups.into_iter().map(|(k, v)| (k.split_once(' ').map_or(k.clone(), |(_, name)| name.to_string()), Summary::of(v))).collect()
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The score as text (summaries, then the misses, or with `verbose` every problem) or JSON.
pub fn report(score: &Score, verbose: bool, json: bool) -> String {
    let summaries = score.summaries();
    if json {
        let value = serde_json::json!({ "summaries": summaries.iter().map(|(k, s)| serde_json::json!({"group": k, "summary": s})).collect::<Vec<_>>(), "problems": score.problems, "skipped": score.skipped });
        return serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{:<44} {:>8} {:>7} {:>12} {:>7} {:>11} {:>9} {:>6} {:>8} {:>9} {:>13} {:>8} {:>8}\n",
        "group", "problems", "top-1", "regret (n)", "top-3", "top-3 regr.", "pairs", "rho", "pred/ms", "in 0.7-1.4", "ratio range", "outside", "rejected"
    ));
    for (name, s) in &summaries {
        out.push_str(&format!(
            "{:<44} {:>8} {:>6.0}% {:>12} {:>6.0}% {:>11} {:>9} {:>6} {:>8} {:>4}/{:<4} {:>6}-{:<6} {:>8} {:>8}\n",
            name,
            s.problems,
            s.top1 * 100.0,
            format!("{} ({})", opt(s.median_regret, 3), s.regrets),
            s.top3 * 100.0,
            opt(s.median_top3_regret, 3),
            format!("{}/{}", s.pairs_in_order.0, s.pairs_in_order.1),
            opt(s.spearman, 2),
            opt(s.median_ratio, 2),
            s.ratios_in_band.0,
            s.ratios_in_band.1,
            opt(s.min_ratio, 2),
            opt(s.max_ratio, 2),
            s.winners_outside_space,
            s.winners_rejected
        ));
    }
    out.push_str("\n(regret: median measured time of the pick over the winner's, over the n problems whose source timed the pick; sources that kept only their winner time it only on a hit; top-3: the winner among the model's three best, and the best measured of those over the winner; pairs: measured pairs within a problem the model orders as the chip did; rho: Spearman's rank correlation of predicted and measured winner times across problems; pred/ms: median predicted / measured for the winners)\n\n");
    for p in score.problems.iter().filter(|p| verbose || !p.hit) {
        let fate = match &p.winner_fate {
            WinnerFate::Ranked => String::new(),
            WinnerFate::OutsideOurSpace => " [winner outside our space]".into(),
            WinnerFate::Rejected(r) => format!(" [winner rejected: {}]", r.chars().take(100).collect::<String>()),
        };
        out.push_str(&format!(
            "{} {} {}: winner {} ({:.4} ms), pick {} ({} of {} feasible), ratio {}{fate}\n",
            if p.hit { "hit " } else { "MISS" },
            p.chip,
            p.problem,
            p.winner,
            p.winner_seconds * 1e3,
            p.pick.as_deref().unwrap_or("-"),
            p.feasible,
            p.candidates,
            opt(p.ratio, 2)
        ));
    }
    for s in &score.skipped {
        out.push_str(&format!("skipped {} {}: {}\n", s.file, s.problem, s.reason));
    }
    out
}
