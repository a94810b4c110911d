//! Block-shape sweeps on the PJRT CPU plugin for matmul (1024³ f32) and causal flash
//! attention (1×8×2048×128 f32): every candidate timed (exhaustive), then the guided search
//! on the same problem, side by side, with the share of candidates it timed and how close
//! it came to the exhaustive optimum. Prints each sweep's table.

use std::time::Duration;

use torchtpu_autotune::{tune, Config, Device, Outcome, Strategy, Tunable, TuneOptions};
use torchtpu_dsl::HostArray;
use torchtpu_exec::{Backend, Compiled, Timing};
use torchtpu_kernels::flash::{FlashOp, FlashPass};
use torchtpu_kernels::matmul::MatmulOp;
use torchtpu_kernels::op::{Op, Tuning};

/// Median times of `configs`, measured in alternation so that machine noise hits all alike.
fn interleaved(problem: &dyn Tunable, configs: &[&Config], rounds: usize) -> Vec<f64> {
    let inputs = problem.random_inputs(&mut rand::SeedableRng::seed_from_u64(7));
    let types: Vec<_> = inputs.iter().map(HostArray::value_type).collect();
    let runs: Vec<(Compiled, Vec<_>)> = configs
        .iter()
        .map(|c| {
            let compiled = Compiled::new(&problem.build(c).expect("builds").trace(&types).expect("traces"), Backend::Cpu).expect("compiles");
            let buffers = compiled.upload(&inputs).expect("uploads");
            (compiled, buffers)
        })
        .collect();
    let mut samples = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, (compiled, buffers)) in runs.iter().enumerate() {
            samples[i].push(compiled.time(std::slice::from_ref(buffers), 0, 1).expect("runs").median_ms);
        }
    }
    samples.into_iter().map(|s| Timing::from_samples(s).median_ms).collect()
}

fn sweep(name: &str, problem: &dyn Tunable) {
    let opts = |strategy| TuneOptions { strategy, use_cache: false, time_per_candidate: Duration::from_millis(200), ..TuneOptions::default() };
    let exhaustive = tune(problem, Device::Pjrt(Backend::Cpu), &opts(Strategy::Exhaustive)).expect("exhaustive sweep");
    println!("== {name}: exhaustive ==\n{}", exhaustive.table());
    let guided = tune(problem, Device::Pjrt(Backend::Cpu), &opts(Strategy::Guided)).expect("guided search");
    let feasible = guided.candidates.iter().filter(|c| !matches!(c.outcome, Outcome::Pruned { .. })).count();
    let timed = guided.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Timed { .. })).count();
    // The three contenders side by side, in alternation: the ratios are from one loop.
    let t = interleaved(problem, &[&exhaustive.best_config, &guided.best_config, &exhaustive.default_config], 15);
    println!(
        "{name}: exhaustive best {} {:.3} ms; guided best {} {:.3} ms ({:+.1}% of the optimum, timing {timed} of {feasible} candidates, {:.0}%); default {} {:.3} ms ({:.2}x slower than the best)\n",
        exhaustive.best_config,
        t[0],
        guided.best_config,
        t[1],
        (t[1] / t[0] - 1.0) * 100.0,
        100.0 * timed as f64 / feasible as f64,
        exhaustive.default_config,
        t[2],
        t[2] / t[0],
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one sweep.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wanted("matmul") {
        sweep("matmul 1024^3 f32", &Tuning::new(MatmulOp, MatmulOp.example()).expect("the example is valid"));
    }
    if wanted("flash") {
        let op = FlashOp(FlashPass::Forward);
        sweep("flash attention 1x8x2048x128 causal f32", &Tuning::new(op, op.example()).expect("the example is valid"));
    }
}
