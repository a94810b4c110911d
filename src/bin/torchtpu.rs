//! The `torchtpu` command line: inspect, run, lower and compile-check the built-in kernels.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu::dsl::{DType, HostArray, InterpretOptions, TracedCall};
use torchtpu_codegen::{lower, Target};
use torchtpu_runtime::{Chip, TpuCompiler};
use torchtpu_autotune::{tune, Device, Progress, Strategy, TuneOptions, Tunable};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_kernels::registry;
use torchtpu_kernels::tables::{tuning_device, Table, TableTarget};
use torchtpu_testkernels::{acceptance_set, configure, find, relative_error, tolerance, Example, FAMILIES};

#[derive(Parser)]
#[command(name = "torchtpu", version, about = "Pallas for Rust: trace, interpret and inspect TPU kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> DType {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LowerTarget {
    /// The Mosaic kernel module, readable.
    Mosaic,
    /// The Mosaic module in the version-stable serialized form.
    MosaicStable,
    /// The StableHLO module with the kernel in a `tpu_custom_call`: what runs on a TPU.
    TpuStablehlo,
    /// Portable StableHLO (the grid as a while loop): what runs on PJRT CPU and CUDA.
    PortableStablehlo,
}

impl From<LowerTarget> for Target {
    fn from(t: LowerTarget) -> Target {
        match t {
            LowerTarget::Mosaic => Target::Mosaic,
            LowerTarget::MosaicStable => Target::MosaicStable,
            LowerTarget::TpuStablehlo => Target::TpuStableHlo,
            LowerTarget::PortableStablehlo => Target::PortableStableHlo,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in kernels (name/dtype/shape/blocks).
    List,
    /// Print the traced IR of a kernel and its index maps.
    Ir {
        /// A full name from `list`, or a kernel family such as `matmul`.
        kernel: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
    },
    /// Print a kernel lowered for the TPU.
    Lower {
        /// A full name from `list`, or a kernel family such as `matmul`.
        kernel: String,
        #[arg(long, value_enum, default_value = "mosaic")]
        target: LowerTarget,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
    },
    /// Compile kernels with the real TPU compiler (libtpu, no TPU needed), one line per kernel and chip.
    Check {
        /// A full name from `list`, or a kernel family; omit with --all.
        kernel: Option<String>,
        /// Every built-in kernel, in every dtype.
        #[arg(long, conflicts_with = "kernel")]
        all: bool,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Comma-separated chips: v4, v5e, v5p, v6e, tpu7x.
        #[arg(long, value_delimiter = ',', default_value = "v4,v5e,v5p,v6e,tpu7x")]
        chips: Vec<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a kernel on a backend with random inputs; check it against its f64 reference and time it.
    Run {
        /// A kernel family (see `list`), or a full name from `list`.
        kernel: String,
        #[arg(long, default_value = "cpu")]
        backend: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Shape and block settings over the family's defaults, e.g. `m=1024,n=1024,k=1024,bm=256`.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// Seed for the random inputs (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tune a shipped kernel's block shapes on a device (cpu, cuda, tpu) or rank them for a TPU
    /// chip without one; the result is cached where the ops' calls at that shape find it.
    Tune {
        /// A shipped op: `matmul`, `flash_attention`, `flash_attention_dkv`, `flash_attention_dq`.
        kernel: String,
        /// cpu, cuda, tpu, or a chip to rank for without hardware: v4, v5e, v5p, v6e, tpu7x.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem fields over the op's example, e.g. `m=4096,n=1024` (matmul: m, n, k, batch,
        /// transpose_b; attention: batch, heads, kv_heads, q_len, kv_len, head_dim, causal).
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// exhaustive, random or guided.
        #[arg(long, default_value = "guided")]
        strategy: String,
        /// Candidates to time (random, guided); default a quarter of the feasible.
        #[arg(long)]
        budget: Option<usize>,
        /// Print the summary as JSON (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Write an SVG plot of time per configuration.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Ignore and do not update the on-disk cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Regenerate the shipped kernels' tuned tables (kernels/tables/*.json): deviceless ranking
    /// for TPU chips, measured on the PJRT CPU plugin for `cpu`.
    Tables {
        /// Targets to regenerate: cpu, v4, v5e, v5p, v6e, tpu7x.
        #[arg(long, value_delimiter = ',', default_value = "cpu,v4,v5e,v5p,v6e,tpu7x")]
        targets: Vec<String>,
        /// Where the tables live.
        #[arg(long, default_value = "kernels/tables")]
        dir: std::path::PathBuf,
        /// Retune only these kernels (e.g. flash_attention_dkv), keeping the tables' other entries.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
    /// Run a kernel on the CPU interpreter with random inputs and check it against its f64 reference.
    Interpret {
        /// A full name from `list`, or a kernel family such as `flash_attention`.
        kernel: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Poison uninitialized memory and report reads of it.
        #[arg(long)]
        checked: bool,
        /// Seed for the random inputs (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn lookup(kernel: &str, dtype: Dtype) -> Result<Box<dyn Example>, String> {
    find(kernel, dtype.into()).ok_or_else(|| format!("no kernel `{kernel}` in {}; see `torchtpu list`", DType::from(dtype)))
}

fn parse_settings(set: &[String]) -> Result<Vec<(String, usize)>, String> {
    set.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("`{kv}`: settings are key=value"))?;
            let v = v.trim().parse::<usize>().map_err(|_| format!("`{kv}`: `{v}` is not a non-negative integer"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// Runs an example on a backend: its output vs the reference, and a median time.
fn run_example(example: &dyn Example, backend: Backend, seed: u64, json: bool) -> Result<bool, String> {
    trace(example)?;
    check_memory(example)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs = example.random_inputs(&mut rng);
    let call = example.call();
    let (outputs, compile_ms, time_ms) = if backend == Backend::Interpret {
        let mut times = Vec::new();
        let mut outputs = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            outputs = call.interpret(&inputs).map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        (outputs, 0.0, torchtpu_exec::Timing::from_samples(times).median_ms)
    } else {
        let types: Vec<_> = inputs.iter().map(HostArray::value_type).collect();
        let t = Instant::now();
        let compiled = Compiled::new(&call.trace(&types).map_err(|e| e.to_string())?, backend).map_err(|e| e.to_string())?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let outputs = compiled.run(&inputs).map_err(|e| e.to_string())?;
        let buffers = compiled.upload(&inputs).map_err(|e| e.to_string())?;
        let timing = compiled.time(&[buffers], 2, 10).map_err(|e| e.to_string())?;
        (outputs, compile_ms, timing.median_ms)
    };
    let reference = example.reference(&inputs);
    let tol = tolerance(example.dtype());
    let rel = outputs.iter().zip(&reference).map(|(o, r)| relative_error(o, r)).fold(0.0f64, f64::max);
    let abs = outputs
        .iter()
        .zip(&reference)
        .flat_map(|(o, r)| o.to_f64().iter().zip(r.iter()).map(|(a, b)| (a - b).abs()).collect::<Vec<_>>())
        .fold(0.0f64, f64::max);
    let ok = rel <= tol;
    let name = example.name();
    if json {
        let line = serde_json::json!({
            "kernel": name, "backend": backend.name(), "max_abs_err": abs, "max_rel_err": rel,
            "tolerance": tol, "ok": ok, "time_ms": time_ms, "compile_ms": compile_ms, "seed": seed,
        });
        println!("{line}");
    } else {
        println!(
            "{name} on {backend}: {} (max abs error {abs:.3e}, relative {rel:.2e}, tolerance {tol:.0e}); {time_ms:.3} ms per run{}; seed {seed}",
            if ok { "ok" } else { "MISMATCH" },
            if backend == Backend::Interpret { String::new() } else { format!(", compiled in {compile_ms:.0} ms") }
        );
    }
    Ok(ok)
}

/// The op `torchtpu tune` tunes: the shipped one the ops' calls run, at its example problem
/// with `set` over it, so that its cached result is the one their calls find.
fn tunable(kernel: &str, dtype: DType, set: &[String]) -> Result<Box<dyn Tunable>, String> {
    let op = registry::find(kernel).map_err(|e| e.to_string())?;
    let settings = set
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.to_string())).ok_or_else(|| format!("`{kv}`: settings are key=value")))
        .collect::<Result<Vec<_>, _>>()?;
    let problem = registry::problem_with(op, Some(dtype), &settings).map_err(|e| e.to_string())?;
    op.tunable(&problem).map_err(|e| e.to_string())
}

/// An error, before anything is allocated, when an example's inputs, outputs and f64
/// reference (about three times its inputs) cannot fit this machine's memory.
fn check_memory(example: &dyn Example) -> Result<(), String> {
    torchtpu_dsl::memory::check_types_fit(&example.operand_types(), 3, &format!("`{}` (inputs, outputs and the f64 reference)", example.name()))
}

fn trace(example: &dyn Example) -> Result<TracedCall, String> {
    example.call().trace(&example.operand_types()).map_err(|e| e.to_string())
}

/// Compiles each kernel for each chip and prints a line (or JSON object) per pair; true if all compiled.
fn check(examples: Vec<Box<dyn Example>>, chips: &[String], json: bool) -> Result<bool, String> {
    let chips: Vec<Chip> = chips.iter().map(|c| c.parse::<Chip>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let compiler = TpuCompiler::shared().map_err(|e| e.to_string())?;
    let mut all_ok = true;
    for example in examples {
        let module = trace(example.as_ref()).and_then(|t| lower(&t, Target::TpuStableHlo).map_err(|e| e.to_string()));
        for &chip in &chips {
            let result = module.clone().and_then(|m| compiler.compile(chip, &m).map_err(|e| e.to_string()));
            all_ok &= result.is_ok();
            let name = example.name();
            if json {
                let line = match &result {
                    Ok(c) => serde_json::json!({"kernel": name, "chip": chip.name(), "ok": true, "error": null, "code_size_bytes": c.code_size_bytes}),
                    Err(e) => serde_json::json!({"kernel": name, "chip": chip.name(), "ok": false, "error": e}),
                };
                println!("{line}");
            } else {
                match &result {
                    Ok(c) => println!("ok    {chip:<6} {name}  ({} bytes of code)", c.code_size_bytes),
                    Err(e) => println!("FAIL  {chip:<6} {name}: {e}"),
                }
            }
        }
    }
    Ok(all_ok)
}

fn run(cli: Cli) -> Result<bool, String> {
    match cli.command {
        Command::List => {
            for e in acceptance_set() {
                println!("{}", e.name());
            }
            Ok(true)
        }
        Command::Ir { kernel, dtype } => {
            let example = lookup(&kernel, dtype)?;
            let traced = trace(example.as_ref())?;
            println!("// {}: grid {:?}, semantics {:?}", example.name(), traced.grid, traced.semantics);
            for op in traced.inputs.iter().chain(&traced.outputs) {
                print!("{}", op.index_map);
            }
            print!("{}", traced.body);
            Ok(true)
        }
        Command::Lower { kernel, target, dtype } => {
            let example = lookup(&kernel, dtype)?;
            print!("{}", lower(&trace(example.as_ref())?, target.into()).map_err(|e| e.to_string())?);
            Ok(true)
        }
        Command::Check { kernel, all, dtype, chips, json } => {
            let examples = match (kernel, all) {
                (_, true) => acceptance_set(),
                (Some(k), false) => vec![lookup(&k, dtype)?],
                (None, false) => return Err("name a kernel, or pass --all".into()),
            };
            check(examples, &chips, json)
        }
        Command::Run { kernel, backend, dtype, set, seed, json } => {
            let backend: Backend = backend.parse().map_err(|e: torchtpu_exec::Error| e.to_string())?;
            let settings = parse_settings(&set)?;
            let example = if settings.is_empty() && !FAMILIES.iter().any(|(f, _)| *f == kernel) {
                lookup(&kernel, dtype)?
            } else {
                configure(&kernel, dtype.into(), &settings)?
            };
            run_example(example.as_ref(), backend, seed.unwrap_or_else(|| rand::rng().random()), json)
        }
        Command::Tune { kernel, device, dtype, set, strategy, budget, json, plot, no_cache } => {
            let device: Device = device.parse().map_err(|e: torchtpu_autotune::Error| e.to_string())?;
            let strategy: Strategy = strategy.parse().map_err(|e: torchtpu_autotune::Error| e.to_string())?;
            let problem = tunable(&kernel, dtype.into(), &set)?;
            let progress = |p: Progress| {
                let ms = p.ms.map_or("-".to_string(), |m| format!("{m:.3} ms"));
                eprint!("\r\x1b[2K[{}/{}] {}  {ms}", p.done, p.total, p.config);
            };
            let opts = TuneOptions { strategy, budget, use_cache: !no_cache, progress: Some(&progress), ..TuneOptions::default() };
            let report = tune(problem.as_ref(), device, &opts).map_err(|e| e.to_string())?;
            eprintln!();
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            if json {
                eprint!("{}", report.table());
                println!("{}", report.summary_json());
            } else {
                print!("{}", report.table());
                let unit = if matches!(device, Device::Chip(_)) { " (predicted)" } else { "" };
                println!(
                    "{} {} on {device}: best {} at {:.4} ms{unit}; default {} at {}; {} evaluated, {} pruned, {:.1} s{}",
                    report.kernel,
                    report.problem,
                    report.best_config,
                    report.best_time_ms,
                    report.default_config,
                    report.default_time_ms.map_or("(not feasible)".into(), |d| format!("{d:.4} ms ({:.2}x slower)", d / report.best_time_ms)),
                    report.evaluated,
                    report.pruned,
                    report.seconds,
                    if report.cache_hit { " (from the cache)" } else { "" },
                );
            }
            if let Some(path) = plot {
                std::fs::write(&path, report.svg()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(true)
        }
        Command::Tables { targets, dir, kernels } => {
            if let Some(unknown) = kernels.iter().find(|k| registry::find(k).is_err()) {
                return Err(registry::find(unknown).err().map(|e| e.to_string()).unwrap_or_default());
            }
            for name in targets {
                let target = TableTarget::parse(&name).map_err(|e| e.to_string())?;
                let device = tuning_device(target);
                let path = dir.join(format!("{name}.json"));
                let mut table: Table = if kernels.is_empty() {
                    Default::default()
                } else {
                    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {} to update it: {e}", path.display()))?;
                    serde_json::from_str(&text).map_err(|e| format!("{} is not a valid table: {e}", path.display()))?
                };
                for op in registry::ops().iter().filter(|o| kernels.is_empty() || kernels.iter().any(|k| k == o.name())) {
                    for (bucket, problem) in op.table_jobs(target) {
                        let opts = TuneOptions { strategy: Strategy::Exhaustive, use_cache: false, ..TuneOptions::default() };
                        let report = tune(problem.as_ref(), device, &opts).map_err(|e| format!("{name} {bucket}: {e}"))?;
                        eprintln!("{name:>6} {} {bucket}: {} ({:.4} ms, default {:?})", op.name(), report.best_config, report.best_time_ms, report.default_time_ms);
                        let config: serde_json::Map<String, serde_json::Value> = report.best_config.0.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
                        table.entry(op.name().to_string()).or_default().insert(bucket, config.into());
                    }
                }
                let text = serde_json::to_string_pretty(&table).map_err(|e| e.to_string())?;
                std::fs::write(&path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(true)
        }
        Command::Interpret { kernel, dtype, checked, seed } => {
            let example = lookup(&kernel, dtype)?;
            check_memory(example.as_ref())?;
            let seed = seed.unwrap_or_else(|| rand::rng().random());
            let mut rng = StdRng::seed_from_u64(seed);
            let inputs = example.random_inputs(&mut rng);
            let start = Instant::now();
            let outputs = example.call().interpret_with(&inputs, InterpretOptions { checked }).map_err(|e| e.to_string())?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let tol = tolerance(example.dtype());
            let errors: Vec<f64> = outputs.iter().zip(example.reference(&inputs)).map(|(o, r)| relative_error(o, &r)).collect();
            let worst = errors.iter().fold(0.0f64, |a, &b| a.max(b));
            let ok = worst <= tol;
            println!("{}: {} in {ms:.2} ms (seed {seed}, checked: {checked}), max relative error {worst:.2e} (tolerance {tol:.0e})", example.name(), if ok { "ok" } else { "MISMATCH" });
            Ok(ok)
        }
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `torchtpu lower ... | head` would panic on a closed pipe;
    // a command-line tool should just stop, as `cat` does.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
