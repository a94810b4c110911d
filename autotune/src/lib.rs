//! The autotuner: sweeps the block shapes of a kernel on a device through PJRT, or ranks
//! them for a TPU chip without hardware (libtpu compiles + a roofline model), prunes what
//! cannot run (with the reason), and caches the winner.

pub mod cache;
pub mod model;
pub mod problem;
pub mod report;
pub mod space;
pub mod stats;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::{HostArray, TracedCall};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::{Chip, TpuCompiler};

use crate::cache::CacheKey;
use crate::model::{features, predict_tpu_seconds, Features, Surrogate};
pub use crate::problem::Tunable;
pub use crate::report::{Candidate, Outcome, TuneReport};
pub use crate::space::{Config, SearchSpace};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Exec(#[from] torchtpu_exec::Error),
    #[error(transparent)]
    Runtime(#[from] torchtpu_runtime::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where to tune: a device through PJRT, or a TPU generation without hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Pjrt(Backend),
    Chip(Chip),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Pjrt(b) => write!(f, "{b}"),
            Device::Chip(c) => write!(f, "{c}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Pjrt(Backend::Cpu)),
            "cuda" => Ok(Device::Pjrt(Backend::Cuda)),
            "tpu" => Ok(Device::Pjrt(Backend::Tpu)),
            chip => chip
                .parse::<Chip>()
                .map(Device::Chip)
                .map_err(|_| Error::Invalid(format!("unknown device `{s}`; expected cpu, cuda, tpu, or a chip to rank for without hardware: v4, v5e, v5p, v6e, tpu7x"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Every feasible candidate.
    Exhaustive,
    /// `budget` feasible candidates at random.
    Random,
    /// A surrogate model of time over the candidates' cost features, refitted after each
    /// measurement; each step times the candidate it predicts fastest.
    Guided,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Exhaustive => "exhaustive",
            Strategy::Random => "random",
            Strategy::Guided => "guided",
        }
    }
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Strategy> {
        [Strategy::Exhaustive, Strategy::Random, Strategy::Guided]
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown strategy `{s}`; expected exhaustive, random or guided")))
    }
}

/// Progress of a tuning run, for a progress bar.
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub config: &'a Config,
    pub ms: Option<f64>,
}

pub struct TuneOptions<'a> {
    pub strategy: Strategy,
    /// How many candidates to time (`Random`, `Guided`); default a quarter of the feasible,
    /// rounded down.
    pub budget: Option<usize>,
    pub use_cache: bool,
    pub seed: u64,
    /// A candidate whose single run takes longer is abandoned (recorded as failed).
    pub time_limit: Duration,
    /// Device time to aim for per candidate (repetitions adapt to it).
    pub time_per_candidate: Duration,
    pub progress: Option<&'a (dyn Fn(Progress) + Sync)>,
    /// Where results are cached; default [`cache::default_dir`].
    pub cache_dir: Option<std::path::PathBuf>,
    /// Confirmation runs for candidates that cannot be told apart from the fastest.
    pub confirmation: stats::Confirmation,
}

impl Default for TuneOptions<'_> {
    fn default() -> Self {
        TuneOptions {
            strategy: Strategy::Guided,
            budget: None,
            use_cache: true,
            seed: 0,
            time_limit: Duration::from_secs(10),
            time_per_candidate: Duration::from_millis(300),
            progress: None,
            cache_dir: None,
            confirmation: stats::Confirmation::default(),
        }
    }
}

struct Prepared {
    config: Config,
    traced: TracedCall,
    features: Features,
}

/// Builds and traces every candidate; returns those that remain and the pruned with reasons.
fn prepare(t: &dyn Tunable, device: Device, types: &[torchtpu_dsl::ir::ValueType], tables: &[HostArray]) -> (Vec<Prepared>, Vec<Candidate>) {
    let space = t.space();
    let mut ok = Vec::new();
    let mut pruned = Vec::new();
    for config in space.iter() {
        let prune = |reason: String, f: Option<Features>| Candidate { config: config.clone(), outcome: Outcome::Pruned { reason }, features: f, measured_ms: None };
        if let Some(reason) = space.violation(&config) {
            pruned.push(prune(format!("constraint: {reason}"), None));
            continue;
        }
        let mut traced = match t.build(&config).and_then(|c| c.trace(types).map_err(|e| Error::Invalid(e.to_string()))) {
            Ok(tr) => tr,
            Err(e) => {
                pruned.push(prune(format!("does not trace: {e}"), None));
                continue;
            }
        };
        let f = match features(&traced, tables) {
            Ok(f) => f,
            Err(e) => {
                pruned.push(prune(format!("grid: {e}"), None));
                continue;
            }
        };
        if let Device::Chip(chip) = device {
            if let Some(reason) = traced.tiling_violations().into_iter().next() {
                pruned.push(prune(format!("tiling: {reason}"), Some(f)));
                continue;
            }
            match model::vmem_limit(&traced, chip) {
                Ok(limit) => traced.vmem_limit_bytes = limit,
                Err(reason) => {
                    pruned.push(prune(reason, Some(f)));
                    continue;
                }
            }
        }
        ok.push(Prepared { config, traced, features: f });
    }
    (ok, pruned)
}

fn cache_key(t: &dyn Tunable, device: Device, strategy: Strategy, types: &[torchtpu_dsl::ir::ValueType]) -> Result<CacheKey> {
    let traced = t
        .build(&t.default_config())
        .and_then(|c| c.trace(types).map_err(|e| Error::Invalid(e.to_string())))
        .map_err(|e| Error::Invalid(format!("the default config does not trace: {e}")))?;
    let mut ir = traced.body.to_string();
    for op in traced.inputs.iter().chain(&traced.outputs) {
        ir.push_str(&op.index_map.to_string());
    }
    let platform_version = match device {
        Device::Pjrt(b) => torchtpu_exec::client(b)?.platform_version().to_string(),
        Device::Chip(c) => TpuCompiler::shared()?.platform_version(c)?,
    };
    // Locations are in the IR text for error messages; they do not change the kernel.
    let ir: String = ir.lines().map(|l| l.split("    //").next().unwrap_or(l)).collect::<Vec<_>>().join("\n");
    Ok(CacheKey {
        format: cache::FORMAT_VERSION,
        kernel: t.kernel(),
        problem: t.problem(),
        device: device.to_string(),
        platform_version,
        ir_hash: cache::hash(&ir),
        strategy: strategy.name().into(),
    })
}

/// The cache key `tune` would use (to find or inspect the cached file).
pub fn key_for(t: &dyn Tunable, device: Device, strategy: Strategy) -> Result<CacheKey> {
    cache_key(t, device, strategy, &t.operand_types())
}

/// The best config a previous `tune` of `t` on `device` cached (any strategy), if any.
///
/// Kernels' calls ask this for every new shape (the Rust API on every call): the key, which
/// traces the kernel and asks the plugin its version, is made once per problem and process.
pub fn cached_best(t: &dyn Tunable, device: Device) -> Option<Config> {
    type Keys = Mutex<HashMap<(String, String, String), CacheKey>>;
    static KEYS: LazyLock<Keys> = LazyLock::new(Default::default);
    let dir = cache::default_dir();
    let id = (t.kernel(), t.problem(), device.to_string());
    let known = KEYS.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
    let key = match known {
        Some(k) => k,
        None => {
            let k = key_for(t, device, Strategy::Exhaustive).ok()?;
            KEYS.lock().unwrap_or_else(|p| p.into_inner()).insert(id, k.clone());
            k
        }
    };
    // Only the strategy varies between the keys a result may be cached under.
    [Strategy::Exhaustive, Strategy::Guided, Strategy::Random]
        .into_iter()
        .find_map(|s| cache::load(&dir, &CacheKey { strategy: s.name().into(), ..key.clone() }).ok().flatten())
        .map(|r| r.best_config)
}

/// Tunes `t` on `device`.
pub fn tune(t: &dyn Tunable, device: Device, opts: &TuneOptions) -> Result<TuneReport> {
    let start = Instant::now();
    let types = t.operand_types();
    let key = cache_key(t, device, opts.strategy, &types)?;
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(cache::default_dir);
    let mut warnings = Vec::new();
    if opts.use_cache {
        match cache::load(&cache_dir, &key) {
            Ok(Some(mut report)) => {
                report.cache_hit = true;
                report.seconds = start.elapsed().as_secs_f64();
                return Ok(report);
            }
            Ok(None) => {}
            Err(w) => warnings.push(w),
        }
    }
    let tables = t.sample_tables();
    let (prepared, mut candidates) = prepare(t, device, &types, &tables);
    if prepared.is_empty() {
        return Err(Error::Invalid(format!(
            "no feasible configuration of {} {} on {device}:\n{}",
            t.kernel(),
            t.problem(),
            candidates.iter().map(|c| format!("  {}: {:?}", c.config, c.outcome)).collect::<Vec<_>>().join("\n")
        )));
    }
    let (evaluated, decided) = match device {
        Device::Chip(chip) => (rank_for_chip(chip, &prepared, &t.default_config(), opts, &tables)?, None),
        Device::Pjrt(backend) => {
            // Only a device run needs operands (a chip's ranking reads none: no f64 work, no
            // host memory for them).
            torchtpu_dsl::memory::check_types_fit(&types, 2, &format!("tuning {} {} (inputs and outputs)", t.kernel(), t.problem())).map_err(Error::Invalid)?;
            let mut rng = StdRng::seed_from_u64(opts.seed);
            let inputs = t.random_inputs(&mut rng);
            if inputs.iter().map(HostArray::value_type).ne(types.iter().cloned()) {
                return Err(Error::Invalid(format!("{}: random_inputs do not have the operand types", t.kernel())));
            }
            measure(backend, t, &prepared, &inputs, opts, &mut rng)?
        }
    };
    candidates.extend(evaluated);
    let default = t.default_config();
    let fastest = candidates
        .iter()
        .filter_map(|c| c.outcome.ms().map(|ms| (c, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or_else(|| Error::Invalid(format!("every candidate of {} failed on {device}", t.kernel())))?;
    let (best, tied, decision) = match decided {
        Some(d) => {
            let decision = if d.tied.is_empty() {
                format!("separated: the best's 95% interval clears every other candidate's ({} confirmation rounds)", d.rounds)
            } else {
                format!(
                    "tie: {} candidates could not be told apart after {} confirmation rounds; chose the smallest VMEM footprint, then the first in the search space's order",
                    d.tied.len(),
                    d.rounds
                )
            };
            warnings.extend(d.noise_warning);
            let best = candidates.iter().find(|c| c.config == d.best).and_then(|c| c.outcome.ms().map(|ms| (c, ms))).unwrap_or(fastest);
            (best, d.tied, decision)
        }
        None => (fastest, Vec::new(), "predicted: ranked by the roofline model over the candidates libtpu compiles".into()),
    };
    let report = TuneReport {
        kernel: t.kernel(),
        problem: t.problem(),
        device: device.to_string(),
        strategy: opts.strategy.name().into(),
        best_config: best.0.config.clone(),
        best_time_ms: best.1,
        default_time_ms: candidates.iter().find(|c| c.config == default).and_then(|c| c.outcome.ms()),
        default_config: default,
        evaluated: candidates.iter().filter(|c| c.outcome.ms().is_some() || matches!(c.outcome, Outcome::Failed { .. })).count(),
        pruned: candidates.iter().filter(|c| matches!(c.outcome, Outcome::Pruned { .. })).count(),
        cache_hit: false,
        candidates,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
        tied,
        decision,
    };
    if opts.use_cache {
        if let Err(w) = cache::store(&cache_dir, &key, &report) {
            let mut report = report;
            report.warnings.push(w);
            return Ok(report);
        }
    }
    Ok(report)
}

/// Ranks the candidates for `chip` by the roofline model over those libtpu compiles. The
/// exhaustive strategy compiles every candidate (in parallel); the others compile in the
/// model's order (fastest first; ties in the space's order), a batch at a time, and stop at
/// the first batch with a candidate that compiles: the same winner as compiling them all,
/// since the prediction does not depend on the compile, with the slower candidates left
/// [`Outcome::NotEvaluated`] but for `default`, the baseline the report compares against.
fn rank_for_chip(chip: Chip, prepared: &[Prepared], default: &Config, opts: &TuneOptions, tables: &[HostArray]) -> Result<Vec<Candidate>> {
    let compiler = TpuCompiler::shared()?;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let judge = |p: &Prepared, ms: f64| {
        let outcome = match lower(&p.traced, Target::TpuStableHlo) {
            Err(e) => Outcome::Pruned { reason: format!("does not lower: {e}") },
            Ok(module) => match compiler.compile(chip, &module) {
                Ok(c) => Outcome::Predicted { ms, code_size_bytes: c.code_size_bytes },
                Err(e) => Outcome::Pruned { reason: format!("libtpu: {}", compiler_reason(&e.message)) },
            },
        };
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if let Some(cb) = opts.progress {
            cb(Progress { done: n, total: prepared.len(), config: &p.config, ms: outcome.ms() });
        }
        outcome
    };
    let predicted: Vec<f64> = prepared.par_iter().map(|p| predict_tpu_seconds(&p.traced, &p.features, chip, tables) * 1e3).collect();
    let mut outcomes: Vec<Outcome> = vec![Outcome::NotEvaluated; prepared.len()];
    if opts.strategy == Strategy::Exhaustive {
        outcomes = prepared.par_iter().zip(&predicted).map(|(p, &ms)| judge(p, ms)).collect();
    } else {
        let mut order: Vec<usize> = (0..prepared.len()).collect();
        order.sort_by(|&a, &b| predicted[a].total_cmp(&predicted[b]).then(a.cmp(&b)));
        // A batch keeps the cores busy; a small one keeps the compiles past the winner few.
        for batch in order.chunks(rayon::current_num_threads().clamp(1, 8)) {
            let judged: Vec<(usize, Outcome)> = batch.par_iter().map(|&i| (i, judge(&prepared[i], predicted[i]))).collect();
            let compiled = judged.iter().any(|(_, o)| o.ms().is_some());
            for (i, o) in judged {
                outcomes[i] = o;
            }
            if compiled {
                break;
            }
        }
        if let Some(d) = prepared.iter().position(|p| &p.config == default).filter(|&d| outcomes[d] == Outcome::NotEvaluated) {
            outcomes[d] = judge(&prepared[d], predicted[d]);
        }
    }
    Ok(prepared.iter().zip(outcomes).map(|(p, outcome)| Candidate { config: p.config.clone(), outcome, features: Some(p.features), measured_ms: None }).collect())
}

/// The informative head of a compiler message: its first two non-empty lines.
pub fn compiler_reason(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).take(2).collect();
    if lines.is_empty() {
        "rejected".into()
    } else {
        lines.join(" ")
    }
}

/// Times one compiled candidate: one run against the limit, then repetitions adapted to
/// the time target, rotating through the operand sets. The repetitions' times, or why not.
fn time_one(compiled: &Compiled, sets: &[Vec<torchtpu_runtime::Buffer>], opts: &TuneOptions) -> Result<Vec<f64>, String> {
    let first = Instant::now();
    compiled.execute(&sets[0]).map_err(|e| e.to_string())?;
    let once = first.elapsed();
    if once > opts.time_limit {
        return Err(format!("one run took {:.0} ms, over the {} ms limit", once.as_secs_f64() * 1e3, opts.time_limit.as_millis()));
    }
    let reps = ((opts.time_per_candidate.as_secs_f64() / once.as_secs_f64().max(1e-6)) as usize).clamp(5, 25);
    compiled.sample(sets, 1, reps).map_err(|e| e.to_string())
}

/// A timed candidate's outcome from its repetitions.
fn timed(samples: &[f64]) -> Outcome {
    let t = torchtpu_exec::Timing::from_samples(samples.to_vec());
    match stats::Summary::of(samples) {
        Some(s) => Outcome::Timed { median_ms: s.median_ms, spread: t.spread(), ci_low_ms: s.ci_low_ms, ci_high_ms: s.ci_high_ms, samples: s.samples },
        None => Outcome::Failed { reason: "no finite timing".into() },
    }
}

/// How many candidates to time under `opts`.
fn budget(opts: &TuneOptions, feasible: usize) -> usize {
    match opts.strategy {
        Strategy::Exhaustive => feasible,
        _ => opts.budget.unwrap_or(feasible / 4).clamp(1, feasible),
    }
}

fn measure(backend: Backend, t: &dyn Tunable, prepared: &[Prepared], inputs: &[HostArray], opts: &TuneOptions, rng: &mut StdRng) -> Result<(Vec<Candidate>, Option<Decided>)> {
    // A second operand set, so that repeated runs do not all hit warm caches.
    let second = t.random_inputs(rng);
    let n = prepared.len();
    let limit = budget(opts, n);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let default = t.default_config();
    let compile = |idx: &[usize]| -> Vec<(usize, Result<Compiled, String>)> {
        idx.par_iter().map(|&i| (i, Compiled::new(&prepared[i].traced, backend).map_err(|e| e.to_string()))).collect()
    };
    let mut done = 0;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut run = |i: usize, compiled: Result<Compiled, String>, outcomes: &mut Vec<Option<Outcome>>| {
        let outcome = match compiled.and_then(|c| {
            let sets = vec![c.upload(inputs).map_err(|e| e.to_string())?, c.upload(&second).map_err(|e| e.to_string())?];
            time_one(&c, &sets, opts)
        }) {
            Ok(times) => {
                let o = timed(&times);
                samples[i] = times;
                o
            }
            Err(e) => Outcome::Failed { reason: e },
        };
        done += 1;
        if let Some(cb) = opts.progress {
            cb(Progress { done, total: limit, config: &prepared[i].config, ms: outcome.ms() });
        }
        outcomes[i] = Some(outcome);
    };
    match opts.strategy {
        Strategy::Exhaustive | Strategy::Random => {
            let mut order: Vec<usize> = (0..n).collect();
            if opts.strategy == Strategy::Random {
                order.shuffle(rng);
            }
            let chosen = &order[..limit];
            for (i, c) in compile(chosen) {
                run(i, c, &mut outcomes);
            }
        }
        Strategy::Guided => {
            // Seeds: the default, the fewest grid steps, and the most flop-heavy other point.
            let mut seeds: Vec<usize> = Vec::new();
            if let Some(d) = prepared.iter().position(|p| p.config == default) {
                seeds.push(d);
            }
            let fewest = (0..n).min_by(|&a, &b| prepared[a].features.steps.total_cmp(&prepared[b].features.steps)).unwrap_or(0);
            seeds.push(fewest);
            let median_steps = {
                let mut s: Vec<f64> = prepared.iter().map(|p| p.features.steps).collect();
                s.sort_by(f64::total_cmp);
                s[s.len() / 2]
            };
            if let Some(mid) = (0..n).min_by(|&a, &b| (prepared[a].features.steps - median_steps).abs().total_cmp(&(prepared[b].features.steps - median_steps).abs())) {
                seeds.push(mid);
            }
            seeds.dedup();
            seeds.truncate(limit);
            for (i, c) in compile(&seeds) {
                run(i, c, &mut outcomes);
            }
            while outcomes.iter().filter(|o| o.is_some()).count() < limit {
                let samples: Vec<(Features, f64)> = (0..n).filter_map(|i| outcomes[i].as_ref().and_then(Outcome::ms).map(|ms| (prepared[i].features, ms))).collect();
                let surrogate = Surrogate::fit(&samples);
                let next = (0..n).filter(|&i| outcomes[i].is_none()).min_by(|&a, &b| {
                    let score = |i: usize| surrogate.as_ref().map_or(prepared[i].features.steps, |s| s.predict(&prepared[i].features));
                    score(a).total_cmp(&score(b))
                });
                let Some(i) = next else { break };
                for (i, c) in compile(&[i]) {
                    run(i, c, &mut outcomes);
                }
            }
        }
    }
    // The default is always measured: the baseline every result is reported against.
    if let Some(d) = prepared.iter().position(|p| p.config == default) {
        if outcomes[d].is_none() {
            for (i, c) in compile(&[d]) {
                run(i, c, &mut outcomes);
            }
        }
    }
    // Candidates the fastest cannot be told apart from get more runs, until it separates or
    // the rounds end; a tie left is resolved by the rule (smaller VMEM footprint, then the
    // space's order), so that every run that sees the same tie picks the same winner.
    let rule = |i: usize| (prepared[i].features.vmem_bytes, i);
    let time_more = |i: usize, reps: usize| -> Vec<f64> {
        let Ok(c) = Compiled::new(&prepared[i].traced, backend) else { return Vec::new() };
        let (Ok(a), Ok(b)) = (c.upload(inputs), c.upload(&second)) else { return Vec::new() };
        c.sample(&[a, b], 1, reps).unwrap_or_default()
    };
    let verdict = stats::confirm(&mut samples, time_more, rule, opts.confirmation);
    for (i, s) in samples.iter().enumerate() {
        if !s.is_empty() && outcomes[i].as_ref().is_some_and(|o| o.ms().is_some()) {
            outcomes[i] = Some(timed(s));
        }
    }
    let candidates = prepared
        .iter()
        .zip(outcomes)
        .map(|(p, o)| Candidate { config: p.config.clone(), outcome: o.unwrap_or(Outcome::NotEvaluated), features: Some(p.features), measured_ms: None })
        .collect();
    Ok((
        candidates,
        verdict.map(|v| Decided {
            best: prepared[v.ranking.best].config.clone(),
            tied: v.ranking.tied.iter().map(|&i| prepared[i].config.clone()).collect(),
            rounds: v.rounds,
            noise_warning: v.noise_warning,
        }),
    ))
}

/// What confirming decided, by config.
struct Decided {
    best: Config,
    tied: Vec<Config>,
    rounds: usize,
    noise_warning: Option<String>,
}
