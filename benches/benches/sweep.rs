//! Block-shape sweeps on the PJRT CPU plugin for matmul (1024³ f32) and causal flash
//! attention (1×8×2048×128 f32): every candidate timed (exhaustive), then the guided search
//! on the same problem, side by side, with the share of candidates it timed and how close
//! it came to the exhaustive optimum. Prints each sweep's table.

use std::time::Duration;

use torchtpu_autotune::{tune, Device, FlashProblem, MatmulProblem, Outcome, Strategy, Tunable, TuneOptions};
use torchtpu_dsl::DType;
use torchtpu_exec::Backend;

fn sweep(name: &str, problem: &dyn Tunable) {
    let opts = |strategy| TuneOptions { strategy, use_cache: false, time_per_candidate: Duration::from_millis(200), ..TuneOptions::default() };
    let exhaustive = tune(problem, Device::Pjrt(Backend::Cpu), &opts(Strategy::Exhaustive)).expect("exhaustive sweep");
    println!("== {name}: exhaustive ==\n{}", exhaustive.table());
    let guided = tune(problem, Device::Pjrt(Backend::Cpu), &opts(Strategy::Guided)).expect("guided search");
    let feasible = guided.candidates.iter().filter(|c| !matches!(c.outcome, Outcome::Pruned { .. })).count();
    let timed = guided.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Timed { .. })).count();
    // The guided winner, measured in the exhaustive sweep: same run, same conditions.
    let guided_best_in_sweep = exhaustive.candidates.iter().find(|c| c.config == guided.best_config).and_then(|c| c.outcome.ms()).unwrap_or(f64::NAN);
    println!(
        "{name}: exhaustive best {} {:.3} ms (default {:.3} ms, {:.2}x); guided best {} ({:.3} ms in the sweep, {:+.1}% of the optimum), timing {timed} of {feasible} candidates ({:.0}%)\n",
        exhaustive.best_config,
        exhaustive.best_time_ms,
        exhaustive.default_time_ms.unwrap_or(f64::NAN),
        exhaustive.speedup().unwrap_or(f64::NAN),
        guided.best_config,
        guided_best_in_sweep,
        (guided_best_in_sweep / exhaustive.best_time_ms - 1.0) * 100.0,
        100.0 * timed as f64 / feasible as f64,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one sweep.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wanted("matmul") {
        sweep("matmul 1024^3 f32", &MatmulProblem { m: 1024, n: 1024, k: 1024, dtype: DType::F32 });
    }
    if wanted("flash") {
        sweep("flash attention 1x8x2048x128 causal f32", &FlashProblem { batch: 1, heads: 8, seq: 2048, head_dim: 128, dtype: DType::F32 });
    }
}
