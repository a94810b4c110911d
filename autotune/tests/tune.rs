//! The tuner end to end: on the PJRT CPU plugin, without hardware for a TPU chip, the
//! cache, and pruning with reasons. Needs the plugins `scripts/setup.sh` installs.

use std::time::Duration;

use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::{cache, key_for, tune, Config, Device, Outcome, SearchSpace, Strategy, Tunable, TuneOptions, TuneReport};
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{DType, HostArray, PallasCall};
use torchtpu_exec::Backend;
use torchtpu_runtime::Chip;
use torchtpu_testkernels::{matmul::Matmul, Example};

/// The acceptance matmul at fixed M, N, K; tunables `bm`, `bn`, `bk`.
struct MatmulProblem {
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
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
        SearchSpace::new().param("bm", block_candidates(self.m, 1024)).param("bn", block_candidates(self.n, 1024)).param("bk", block_candidates(self.k, 1024))
    }
    fn default_config(&self) -> Config {
        Config(vec![("bm".into(), 128), ("bn".into(), 128), ("bk".into(), 128)])
    }
    fn build(&self, config: &Config) -> torchtpu_autotune::Result<PallasCall> {
        Ok(self.example(config).call())
    }
    fn random_inputs(&self, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        self.example(&self.default_config()).random_inputs(rng)
    }
}

fn quick(dir: &std::path::Path, strategy: Strategy) -> TuneOptions<'static> {
    TuneOptions { strategy, time_per_candidate: Duration::from_millis(15), cache_dir: Some(dir.to_path_buf()), ..TuneOptions::default() }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("torchtpu-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn exhaustive_on_cpu_then_answered_from_the_cache_and_surviving_corruption() {
    let dir = temp_dir("cache");
    let p = MatmulProblem { m: 256, n: 256, k: 256, dtype: DType::F32 };
    let first = tune(&p, Device::Pjrt(Backend::Cpu), &quick(&dir, Strategy::Exhaustive)).expect("tunes");
    assert!(!first.cache_hit);
    assert_eq!(first.candidates.len(), 27);
    assert_eq!(first.evaluated, 27, "{}", first.table());
    let fastest = first
        .candidates
        .iter()
        .filter(|c| c.outcome.ms().is_some())
        .min_by(|a, b| a.outcome.ms().unwrap_or(f64::MAX).total_cmp(&b.outcome.ms().unwrap_or(f64::MAX)))
        .expect("timed");
    // The fastest median wins, unless the fastest could not be told apart from others: then
    // the tie rule picks among them.
    if first.tied.is_empty() {
        assert_eq!(first.best_config, fastest.config, "{}", first.decision);
    } else {
        assert!(first.tied.contains(&first.best_config) && first.tied.contains(&fastest.config), "{}\n{}", first.decision, first.table());
    }
    assert!(!first.decision.is_empty());
    assert!(first.default_time_ms.is_some());

    let second = tune(&p, Device::Pjrt(Backend::Cpu), &quick(&dir, Strategy::Exhaustive)).expect("cached");
    assert!(second.cache_hit);
    assert!(second.seconds < 1.0, "a cache hit took {} s", second.seconds);
    assert_eq!(second.best_config, first.best_config);

    let key = key_for(&p, Device::Pjrt(Backend::Cpu), Strategy::Exhaustive).expect("key");
    std::fs::write(cache::location(&dir, &key), "{ not json").expect("corrupts");
    let third = tune(&p, Device::Pjrt(Backend::Cpu), &quick(&dir, Strategy::Random)).expect("random tunes");
    assert!(!third.cache_hit);
    let fourth = tune(&p, Device::Pjrt(Backend::Cpu), &quick(&dir, Strategy::Exhaustive)).expect("survives a corrupt cache");
    assert!(!fourth.cache_hit);
    assert!(fourth.warnings.iter().any(|w| w.contains("ignoring corrupt tuning cache")), "{:?}", fourth.warnings);
    let fifth = tune(&p, Device::Pjrt(Backend::Cpu), &quick(&dir, Strategy::Exhaustive)).expect("cached again");
    assert!(fifth.cache_hit);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guided_times_no_more_than_its_budget() {
    let dir = temp_dir("guided");
    let p = MatmulProblem { m: 256, n: 256, k: 512, dtype: DType::F32 };
    let opts = TuneOptions { budget: Some(6), use_cache: false, ..quick(&dir, Strategy::Guided) };
    let r = tune(&p, Device::Pjrt(Backend::Cpu), &opts).expect("tunes");
    let timed = r.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Timed { .. })).count();
    // The budget, plus the default when the search did not reach it.
    assert!(timed <= 7, "timed {timed}:\n{}", r.table());
    assert!(r.candidates.iter().filter(|c| c.outcome == Outcome::NotEvaluated).count() >= 36 - 7);
}

#[test]
fn ranks_for_a_tpu_chip_without_hardware() {
    let dir = temp_dir("v5e");
    let p = MatmulProblem { m: 2048, n: 2048, k: 2048, dtype: DType::BF16 };
    let r = tune(&p, Device::Chip(Chip::V5e), &TuneOptions { use_cache: false, ..quick(&dir, Strategy::Exhaustive) }).expect("ranks");
    let predicted = r.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Predicted { .. })).count();
    assert!(predicted >= 20, "{}", r.table());
    assert_eq!(predicted + r.pruned, r.candidates.len(), "every candidate is ranked or pruned:\n{}", r.table());
    // 1024-wide bf16 blocks double-buffered with an f32 accumulator exceed v5e's 16 MiB:
    // our model or the compiler says so.
    let big = r.candidates.iter().find(|c| c.config.to_string() == "bm=1024,bn=1024,bk=1024").expect("in the space");
    assert!(matches!(&big.outcome, Outcome::Pruned { reason } if reason.contains("VMEM") || reason.contains("E1001")), "{:?}", big.outcome);
    // Bigger tiles move fewer bytes: the best beats the 128 default by the model.
    assert!(r.speedup().is_some_and(|s| s > 1.5), "{}", r.table());
}

#[test]
fn ranking_in_the_models_order_finds_the_exhaustive_winner() {
    let dir = temp_dir("v6e-order");
    let p = MatmulProblem { m: 2048, n: 2048, k: 2048, dtype: DType::F32 };
    let all = tune(&p, Device::Chip(Chip::V6e), &TuneOptions { use_cache: false, ..quick(&dir, Strategy::Exhaustive) }).expect("ranks");
    let ordered = tune(&p, Device::Chip(Chip::V6e), &TuneOptions { use_cache: false, ..quick(&dir, Strategy::Guided) }).expect("ranks");
    assert_eq!(ordered.best_config, all.best_config, "{}\n{}", all.table(), ordered.table());
    assert_eq!(ordered.best_time_ms, all.best_time_ms);
    let compiled = |r: &TuneReport| r.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Predicted { .. })).count();
    assert!(compiled(&ordered) < compiled(&all), "{} of {}", compiled(&ordered), compiled(&all));
    // What was not compiled is said so, not dropped.
    assert_eq!(ordered.candidates.len(), all.candidates.len());
    assert!(ordered.candidates.iter().any(|c| matches!(c.outcome, Outcome::NotEvaluated)));
}

/// A copy kernel whose block widths include ones that break the TPU's tiling.
struct Ragged;

#[tpu_kernel]
fn copy(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load());
}

impl Tunable for Ragged {
    fn kernel(&self) -> String {
        "copy".into()
    }
    fn problem(&self) -> String {
        "64x1024/f32".into()
    }
    fn space(&self) -> SearchSpace {
        SearchSpace::new()
            .param("rows", [8, 12, 64])
            .param("cols", [100, 128, 1024])
            .constraint(|c| (c.value("rows") == 64 && c.value("cols") == 100).then(|| "an example constraint".into()))
    }
    fn default_config(&self) -> torchtpu_autotune::Config {
        torchtpu_autotune::Config(vec![("rows".into(), 8), ("cols".into(), 128)])
    }
    fn build(&self, c: &torchtpu_autotune::Config) -> torchtpu_autotune::Result<PallasCall> {
        let (r, k) = (c.value("rows"), c.value("cols"));
        Ok(PallasCall::new(copy::kernel())
            .grid([64usize.div_ceil(r), 1024usize.div_ceil(k)])
            .in_specs([BlockSpec::new([r, k], |[i, j]| (i, j))])
            .out_specs([BlockSpec::new([r, k], |[i, j]| (i, j))])
            .out_shapes([[64, 1024]]))
    }
    fn random_inputs(&self, _: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        vec![HostArray::from(ndarray::Array2::<f32>::zeros((64, 1024)))]
    }
}

#[test]
fn pruned_candidates_keep_their_reasons() {
    let dir = temp_dir("ragged");
    let r = tune(&Ragged, Device::Chip(Chip::V6e), &TuneOptions { use_cache: false, ..quick(&dir, Strategy::Exhaustive) }).expect("ranks");
    let reason = |cfg: &str| match &r.candidates.iter().find(|c| c.config.to_string() == cfg).expect("present").outcome {
        Outcome::Pruned { reason } => reason.clone(),
        other => panic!("{cfg} was not pruned: {other:?}"),
    };
    assert!(reason("rows=8,cols=100").contains("tiling") && reason("rows=8,cols=100").contains("multiple of 128"));
    assert!(reason("rows=12,cols=128").contains("multiple of 8"));
    assert!(reason("rows=64,cols=100").contains("an example constraint"));
    assert!(matches!(r.candidates.iter().find(|c| c.config.to_string() == "rows=64,cols=1024").expect("present").outcome, Outcome::Predicted { .. }));
}

#[test]
fn concurrent_writers_never_leave_a_torn_cache_file() {
    let dir = temp_dir("concurrent");
    let p = MatmulProblem { m: 128, n: 128, k: 128, dtype: DType::F32 };
    let report = tune(&p, Device::Chip(Chip::V5e), &TuneOptions { use_cache: false, ..quick(&dir, Strategy::Exhaustive) }).expect("ranks");
    let key = key_for(&p, Device::Chip(Chip::V5e), Strategy::Exhaustive).expect("key");
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..20 {
                    cache::store(&dir, &key, &report).expect("stores");
                    // Every read sees a whole file: the old one or the new one.
                    assert_eq!(cache::load(&dir, &key).expect("never torn").expect("present").best_config, report.best_config);
                }
            });
        }
    });
    let leftovers = std::fs::read_dir(&dir).expect("exists").filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tmp"))).count();
    assert_eq!(leftovers, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
