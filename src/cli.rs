//! The `torchtpu` command line: inspect, run, lower, compile-check and tune ops — the
//! registered ones (`torchtpu_kernels::registry`, the very kernels the Rust API and the
//! PyTorch ops run), or a user's own, through [`main_with`] in their crate's binary.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_autotune::{tune, Device, Progress, Strategy, Tunable, TuneOptions};
use torchtpu_codegen::{lower, lower_sharded, lower_tpu, Mesh, PartitionSpec, Target};
use torchtpu_dsl::accuracy::{relative_error, tolerance};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, InterpretOptions, PallasCall, TracedCall};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_kernels::calibration;
use torchtpu_kernels::registry::{self, AnyOp, Selection};
use torchtpu_kernels::tables::{target_of, tuning_device, Table, TableTarget};
use torchtpu_runtime::{Chip, Slice, TpuCompiler};

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
    /// The tpu-stablehlo module as a StableHLO portable artifact (VHLO in MLIR bytecode): what
    /// TorchTPU's bridge is given, as JAX gives it. Binary: redirect it to a file.
    TpuArtifact,
}

impl LowerTarget {
    /// The text target `lower` prints; `None` for the artifact, which is bytes.
    fn text(self) -> Option<Target> {
        match self {
            LowerTarget::Mosaic => Some(Target::Mosaic),
            LowerTarget::MosaicStable => Some(Target::MosaicStable),
            LowerTarget::TpuStablehlo => Some(Target::TpuStableHlo),
            LowerTarget::PortableStablehlo => Some(Target::PortableStableHlo),
            LowerTarget::TpuArtifact => None,
        }
    }
}

/// An SPMD layout: the op, at `--set`'s problem for one device's shards, run on every device
/// of a mesh, its operands and outputs laid out over the mesh's axes.
#[derive(clap::Args)]
struct ShardingArgs {
    /// A device mesh, e.g. `x=2,y=4`: the op becomes a sharded program over its devices, and
    /// `--set` gives the problem of one device's shards.
    #[arg(long)]
    mesh: Option<String>,
    /// A partition spec per operand, then per output, in order (repeat the flag): `x,_` splits
    /// dim 0 over axis x and keeps dim 1 whole; `x+y,_` splits dim 0 over both; a last entry
    /// `sum=y` makes an output a partial sum over y, added up across y.
    #[arg(long = "shard", requires = "mesh")]
    shard: Vec<String>,
}

impl ShardingArgs {
    fn layout(&self) -> Result<Option<(Mesh, Vec<PartitionSpec>)>, String> {
        let Some(mesh) = &self.mesh else { return Ok(None) };
        let mesh: Mesh = mesh.parse().map_err(|e: torchtpu_codegen::Error| e.to_string())?;
        let specs = self.shard.iter().map(|s| s.parse::<PartitionSpec>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
        Ok(Some((mesh, specs)))
    }
}

/// Writes `bytes` to stdout, refusing a terminal (where bytecode would garble the screen).
fn write_binary(bytes: &[u8]) -> Result<(), String> {
    use std::io::{IsTerminal, Write};
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        return Err("the artifact is binary: redirect stdout to a file (`> module.mlirbc`)".into());
    }
    out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| format!("writing the artifact to stdout: {e}"))
}

/// The TPU module of `call`: alone, or the sharded program of `layout`.
fn tpu_module(call: &TracedCall, layout: Option<&(Mesh, Vec<PartitionSpec>)>) -> Result<String, String> {
    match layout {
        None => lower(call, Target::TpuStableHlo),
        Some((mesh, specs)) => {
            let operands = call.operand_types().count().min(specs.len());
            lower_sharded(call, mesh, &specs[..operands], &specs[operands..]).map(|m| m.text)
        }
    }
    .map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// List the registered ops, each with its example problem (what `--set` overrides).
    List,
    /// Print the traced IR of an op and its index maps.
    Ir {
        /// A registered op (see `list`).
        kernel: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem and config fields over the op's example, e.g. `m=256,bm=128`.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
    },
    /// Print an op lowered for the TPU (or the portable form).
    Lower {
        /// A registered op (see `list`).
        kernel: String,
        #[arg(long, value_enum, default_value = "mosaic")]
        target: LowerTarget,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem and config fields over the op's example.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// With --target tpu-stablehlo: the sharded program over a mesh.
        #[command(flatten)]
        sharding: ShardingArgs,
    },
    /// Compile ops with the real TPU compiler (libtpu, no TPU needed), each with the chip's
    /// tuned config, one line per op and chip (or slice, for a sharded program).
    Check {
        /// A registered op; omit with --all.
        kernel: Option<String>,
        /// Every registered op at its example problem, in f32 and bf16.
        #[arg(long, conflicts_with = "kernel")]
        all: bool,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem and config fields over the op's example.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// Comma-separated chips: v4, v5e, v5p, v6e, tpu7x (a sharded program takes --slices).
        #[arg(long, value_delimiter = ',', default_value = "v4,v5e,v5p,v6e,tpu7x", conflicts_with = "mesh")]
        chips: Vec<String>,
        #[command(flatten)]
        sharding: ShardingArgs,
        /// With --mesh: the multi-chip slices to compile the sharded program for (default
        /// v5e:2x2, v5e:2x4, v6e:2x2, v5p:2x2x1, tpu7x:2x2x1).
        #[arg(long, value_delimiter = ',', requires = "mesh")]
        slices: Vec<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run an op on a backend with random inputs; check it against its f64 reference and time it.
    Run {
        /// A registered op (see `list`).
        kernel: String,
        #[arg(long, default_value = "cpu")]
        backend: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem and config fields over the op's example, e.g. `m=1024,n=1024,k=1024,bm=256`.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// Seed for the random inputs (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tune a registered op's block shapes on a device (cpu, cuda, tpu) or rank them for a TPU
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
        /// Times measured elsewhere (on the chip a deviceless ranking is for), a JSON object
        /// of config to milliseconds (`{"bm=512,bn=512,bk=512": 0.81, ...}`): shown beside
        /// the ranking's times, in the plot, and summarized as their agreement.
        #[arg(long)]
        measured: Option<std::path::PathBuf>,
    },
    /// Regenerate the ops' tuned tables (`<dir>/<target>.json`): deviceless ranking
    /// for TPU chips, measured on the PJRT CPU plugin for `cpu`.
    Tables {
        /// Targets to regenerate: cpu, v4, v5e, v5p, v6e, tpu7x.
        #[arg(long, value_delimiter = ',', default_value = "cpu,v4,v5e,v5p,v6e,tpu7x")]
        targets: Vec<String>,
        /// Where the tables live.
        /// Where the tables live (default: the ops' table directory).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Retune only these kernels (e.g. flash_attention_dkv), keeping the tables' other entries.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
    /// Score the TPU model against published per-config TPU timings: for each published
    /// problem, whether the model's pick among the configs the source searched is the
    /// measured winner, its regret, and predicted ÷ measured for the winner.
    Calibrate {
        /// The datasets (default: the repository's `autotune/calibration`).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// Which candidates libtpu judges (the rest count as feasible): all, measured (only
        /// the configs a real chip ran) or none.
        #[arg(long, default_value = "all")]
        compile: String,
        /// Print every problem, not only the misses.
        #[arg(long)]
        verbose: bool,
        /// One JSON object (every problem and the summaries) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run an op on the CPU interpreter with random inputs and check it against its f64 reference.
    Interpret {
        /// A registered op (see `list`).
        kernel: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Problem and config fields over the op's example.
        #[arg(long, value_delimiter = ',')]
        set: Vec<String>,
        /// Poison uninitialized memory and report reads of it.
        #[arg(long)]
        checked: bool,
        /// Seed for the random inputs (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

/// An op at the problem (and config) its `--dtype` and `--set` settings select.
struct Selected {
    op: &'static dyn AnyOp,
    problem: serde_json::Value,
    config: Option<serde_json::Value>,
}

impl Selected {
    fn new(ops: &Ops, kernel: &str, dtype: Dtype, set: &[String]) -> Result<Selected, String> {
        let op = registry::find_in(ops.ops, kernel).map_err(|e| format!("{e}; see `{} list`", ops.program))?;
        let Selection { problem, config } = registry::select(op, Some(dtype.into()), &parse_settings(set)?).map_err(|e| e.to_string())?;
        Ok(Selected { op, problem, config })
    }

    /// `op problem-fields` (and ` @ config-fields` when a config was set).
    fn name(&self) -> String {
        let config = self.config.as_ref().map_or(String::new(), |c| format!(" @ {}", registry::describe(c)));
        format!("{} {}{config}", self.op.name(), registry::describe(&self.problem))
    }

    fn dtype(&self) -> DType {
        serde_json::from_value(self.problem["dtype"].clone()).unwrap_or(DType::F32)
    }

    /// The call with the config it uses on `target` (unless one was set), and its operand types.
    fn call(&self, target: Option<TableTarget>) -> Result<(PallasCall, Vec<ValueType>), String> {
        self.op.call(&self.problem, self.config.as_ref(), target).map_err(|e| e.to_string())
    }

    /// The call with the config it uses on `target` (unless one was set), traced.
    fn trace(&self, target: Option<TableTarget>) -> Result<TracedCall, String> {
        let (call, types) = self.call(target)?;
        call.trace(&types).map_err(|e| e.to_string())
    }

    /// Random operands of `types`: an error, before anything is allocated, when the inputs,
    /// outputs and f64 reference (about three times the inputs) cannot fit this machine's memory.
    fn inputs(&self, types: &[ValueType], seed: u64) -> Result<Vec<HostArray>, String> {
        torchtpu_dsl::memory::check_types_fit(types, 3, &format!("`{}` (inputs, outputs and the f64 reference)", self.name()))?;
        self.op.random_inputs(&self.problem, &mut StdRng::seed_from_u64(seed)).map_err(|e| e.to_string())
    }

    /// How far `outputs` are from the f64 reference: the largest relative and absolute errors,
    /// and the dtype's tolerance on the relative one.
    fn accuracy(&self, inputs: &[HostArray], outputs: &[HostArray]) -> Result<Accuracy, String> {
        let reference = self.op.reference(&self.problem, inputs).map_err(|e| e.to_string())?;
        if reference.len() != outputs.len() {
            return Err(format!("{} gave {} outputs; its reference {}", self.name(), outputs.len(), reference.len()));
        }
        let relative = outputs.iter().zip(&reference).map(|(o, r)| relative_error(o, r)).fold(0.0f64, f64::max);
        let absolute = outputs.iter().zip(&reference).flat_map(|(o, r)| o.to_f64().iter().zip(r.iter()).map(|(a, b)| (a - b).abs()).collect::<Vec<_>>()).fold(0.0f64, f64::max);
        Ok(Accuracy { relative, absolute, tolerance: tolerance(self.dtype()) })
    }
}

/// An op's outputs against its f64 reference.
struct Accuracy {
    relative: f64,
    absolute: f64,
    tolerance: f64,
}

/// A `--measured` file: a JSON object of config to milliseconds.
fn read_measured(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the measured times {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} must be a JSON object of config to milliseconds, like {{\"bq=512,bk=512\": 1.25}}: {e}", path.display()))
}

fn parse_settings(set: &[String]) -> Result<Vec<(String, String)>, String> {
    set.iter().map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.to_string())).ok_or_else(|| format!("`{kv}`: settings are key=value"))).collect()
}

/// Runs an op on a backend: its outputs vs the reference, and a median time.
fn run_selected(sel: &Selected, backend: Backend, seed: u64, json: bool) -> Result<bool, String> {
    let (call, types) = sel.call(target_of(backend))?;
    let traced = call.trace(&types).map_err(|e| e.to_string())?;
    let inputs = sel.inputs(&types, seed)?;
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
        let t = Instant::now();
        let compiled = Compiled::new(&traced, backend).map_err(|e| e.to_string())?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let outputs = compiled.run(&inputs).map_err(|e| e.to_string())?;
        let buffers = compiled.upload(&inputs).map_err(|e| e.to_string())?;
        let timing = compiled.time(&[buffers], 2, 10).map_err(|e| e.to_string())?;
        (outputs, compile_ms, timing.median_ms)
    };
    let Accuracy { relative: rel, absolute: abs, tolerance: tol } = sel.accuracy(&inputs, &outputs)?;
    let ok = rel <= tol;
    let name = sel.name();
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

/// The op `torchtpu tune` tunes: the registered one the ops' calls run, at its example problem
/// with `set` over it, so that its cached result is the one their calls find.
fn tunable(ops: &Ops, kernel: &str, dtype: Dtype, set: &[String], device: Device) -> Result<Box<dyn Tunable>, String> {
    let sel = Selected::new(ops, kernel, dtype, set)?;
    if sel.config.is_some() {
        return Err(format!("`tune` searches the config; set only problem fields of `{kernel}`"));
    }
    sel.op.tunable(&sel.problem, torchtpu_kernels::tables::target_of_device(device)).map_err(|e| e.to_string())
}

/// Compiles each selection for each slice (with its chip's tuned config, unless one was set):
/// alone on a chip's smallest slice, or as the sharded program of `layout`. Prints a line (or
/// JSON object) per pair; true if all compiled.
fn check(selections: Vec<Selected>, slices: &[Slice], layout: Option<(Mesh, Vec<PartitionSpec>)>, json: bool) -> Result<bool, String> {
    let compiler = TpuCompiler::shared().map_err(|e| e.to_string())?;
    let mut all_ok = true;
    for sel in selections {
        let name = sel.name();
        for slice in slices {
            let chip = slice.chip;
            let (target, width) = if layout.is_some() { (slice.to_string(), 11) } else { (chip.to_string(), 6) };
            let module = sel.trace(Some(TableTarget::Chip(chip))).and_then(|t| tpu_module(&t, layout.as_ref()));
            let partitions = layout.as_ref().map_or(1, |(mesh, _)| mesh.devices());
            let result = module.and_then(|m| if layout.is_some() { compiler.compile_spmd(slice, partitions, &m) } else { compiler.compile(chip, &m) }.map_err(|e| e.to_string()));
            all_ok &= result.is_ok();
            if json {
                let line = match &result {
                    Ok(c) => {
                        serde_json::json!({"kernel": name, "chip": chip.name(), "slice": slice.to_string(), "devices": partitions, "ok": true, "error": null, "code_size_bytes": c.code_size_bytes, "flops_per_device": c.cost("flops")})
                    }
                    Err(e) => serde_json::json!({"kernel": name, "chip": chip.name(), "slice": slice.to_string(), "devices": partitions, "ok": false, "error": e}),
                };
                println!("{line}");
            } else {
                match &result {
                    Ok(c) if layout.is_some() => println!(
                        "ok    {target:<width$} {name}  ({partitions} devices, {} bytes of code, {:.3e} flops per device)",
                        c.code_size_bytes,
                        c.cost("flops").unwrap_or(f64::NAN)
                    ),
                    Ok(c) => println!("ok    {target:<width$} {name}  ({} bytes of code)", c.code_size_bytes),
                    Err(e) => println!("FAIL  {target:<width$} {name}: {e}"),
                }
            }
        }
    }
    Ok(all_ok)
}

fn run(ops: &Ops, cli: Cli) -> Result<bool, String> {
    match cli.command {
        Command::List => {
            for op in ops.ops {
                println!("{}  {}", op.name(), registry::describe(&op.example()));
            }
            Ok(true)
        }
        Command::Ir { kernel, dtype, set } => {
            let sel = Selected::new(ops, &kernel, dtype, &set)?;
            let traced = sel.trace(None)?;
            println!("// {}: grid {:?}, semantics {:?}", sel.name(), traced.grid, traced.semantics);
            for op in traced.inputs.iter().chain(&traced.outputs) {
                print!("{}", op.index_map);
            }
            print!("{}", traced.body);
            Ok(true)
        }
        Command::Lower { kernel, target, dtype, set, sharding } => {
            let sel = Selected::new(ops, &kernel, dtype, &set)?;
            let traced = sel.trace(None)?;
            match (sharding.layout()?, target.text()) {
                (None, Some(text)) => print!("{}", lower(&traced, text).map_err(|e| e.to_string())?),
                (None, None) => write_binary(&lower_tpu(&traced).map_err(|e| e.to_string())?.artifact)?,
                (Some(_), _) if !matches!(target, LowerTarget::TpuStablehlo) => return Err("--mesh lowers the sharded TPU program: pass --target tpu-stablehlo".into()),
                (Some(layout), _) => print!("{}", tpu_module(&traced, Some(&layout))?),
            }
            Ok(true)
        }
        Command::Check { kernel, all, dtype, set, chips, sharding, slices, json } => {
            let selections = match (kernel, all) {
                (_, true) => {
                    let mut v = Vec::new();
                    for op in ops.ops {
                        for d in [Dtype::F32, Dtype::Bf16] {
                            v.push(Selected::new(ops, op.name(), d, &set)?);
                        }
                    }
                    v
                }
                (Some(k), false) => vec![Selected::new(ops, &k, dtype, &set)?],
                (None, false) => return Err("name an op, or pass --all".into()),
            };
            let layout = sharding.layout()?;
            let slices = match &layout {
                None => chips.iter().map(|c| c.parse::<Chip>().map(Slice::smallest).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?,
                Some(_) if slices.is_empty() => Slice::multi_chip_examples(),
                Some(_) => slices.iter().map(|s| s.parse::<Slice>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?,
            };
            check(selections, &slices, layout, json)
        }
        Command::Run { kernel, backend, dtype, set, seed, json } => {
            let backend: Backend = backend.parse().map_err(|e: torchtpu_exec::Error| e.to_string())?;
            let sel = Selected::new(ops, &kernel, dtype, &set)?;
            run_selected(&sel, backend, seed.unwrap_or_else(|| rand::rng().random()), json)
        }
        Command::Tune { kernel, device, dtype, set, strategy, budget, json, plot, no_cache, measured } => {
            let measured = measured.map(|path| read_measured(&path)).transpose()?;
            let device: Device = device.parse().map_err(|e: torchtpu_autotune::Error| e.to_string())?;
            let strategy: Strategy = strategy.parse().map_err(|e: torchtpu_autotune::Error| e.to_string())?;
            let problem = tunable(ops, &kernel, dtype, &set, device)?;
            // Drawn only when stderr is a terminal (indicatif hides it otherwise).
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(indicatif::ProgressStyle::with_template("[{pos}/{len}] {bar:30} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            let progress = |p: Progress| {
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
                bar.set_message(format!("{}  {}", p.config, p.ms.map_or("-".to_string(), |m| format!("{m:.3} ms"))));
            };
            let opts = TuneOptions { strategy, budget, use_cache: !no_cache, progress: Some(&progress), ..TuneOptions::default() };
            let mut report = tune(problem.as_ref(), device, &opts).map_err(|e| e.to_string())?;
            bar.finish_and_clear();
            if let Some(measured) = &measured {
                if report.cache_hit {
                    report.warnings.push("the result came from the cache, which keeps no candidates to compare with the measured times: tune with --no-cache".into());
                }
                report.attach_measurements(measured)?;
            }
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
                if !report.decision.is_empty() {
                    println!("decided: {}", report.decision);
                }
                if let Some(a) = report.agreement() {
                    println!("{}", torchtpu_autotune::report::agreement_line(&a));
                }
            }
            if let Some(path) = plot {
                let picture = report.plot_svg()?;
                std::fs::write(&path, picture).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(true)
        }
        Command::Tables { targets, dir, kernels } => {
            if let Some(unknown) = kernels.iter().find(|k| registry::find_in(ops.ops, k).is_err()) {
                return Err(registry::find_in(ops.ops, unknown).err().map(|e| e.to_string()).unwrap_or_default());
            }
            let dir = dir.unwrap_or_else(|| ops.tables_dir.into());
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
                for op in ops.ops.iter().filter(|o| kernels.is_empty() || kernels.iter().any(|k| k == o.name())) {
                    for (bucket, problem) in op.table_jobs(target) {
                        // A chip's winner is the model's fastest that compiles: ranking in the
                        // model's order finds it without compiling every candidate.
                        let strategy = if matches!(target, TableTarget::Chip(_)) { Strategy::Guided } else { Strategy::Exhaustive };
                        let opts = TuneOptions { strategy, use_cache: false, ..TuneOptions::default() };
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
        Command::Calibrate { data, compile, verbose, json } => {
            let compile = match compile.as_str() {
                "all" => calibration::Compile::All,
                "measured" => calibration::Compile::Measured,
                "none" => calibration::Compile::None,
                other => return Err(format!("--compile `{other}`: expected all, measured or none")),
            };
            let dir = data.unwrap_or_else(torchtpu_kernels::calibration::default_dir);
            let datasets = calibration::load(&dir).map_err(|e| e.to_string())?;
            let score = calibration::score(&datasets, compile).map_err(|e| e.to_string())?;
            print!("{}", calibration::report(&score, verbose, json));
            Ok(true)
        }
        Command::Interpret { kernel, dtype, set, checked, seed } => {
            let sel = Selected::new(ops, &kernel, dtype, &set)?;
            let seed = seed.unwrap_or_else(|| rand::rng().random());
            let (call, types) = sel.call(None)?;
            let inputs = sel.inputs(&types, seed)?;
            let start = Instant::now();
            let outputs = call.interpret_with(&inputs, InterpretOptions { checked }).map_err(|e| e.to_string())?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let Accuracy { relative: worst, tolerance: tol, .. } = sel.accuracy(&inputs, &outputs)?;
            let ok = worst <= tol;
            println!(
                "{}: {} in {ms:.2} ms (seed {seed}, checked: {checked}), max relative error {worst:.2e} (tolerance {tol:.0e})",
                sel.name(),
                if ok { "ok" } else { "MISMATCH" }
            );
            Ok(ok)
        }
    }
}

/// The ops a command line serves: its program name (for messages), the ops, and where
/// `tables` writes their tuned tables by default.
pub struct Ops {
    pub program: &'static str,
    pub ops: &'static [&'static dyn AnyOp],
    pub tables_dir: &'static str,
}

/// The `torchtpu` command line over the shipped ops.
pub fn main() -> ExitCode {
    main_with(&Ops { program: "torchtpu", ops: registry::ops(), tables_dir: "kernels/tables" })
}

/// The `torchtpu` command line over `ops`: a user's crate serves its own ops with a binary
/// whose `main` calls this.
pub fn main_with(ops: &Ops) -> ExitCode {
    // Rust ignores SIGPIPE, so `torchtpu lower ... | head` would panic on a closed pipe;
    // a command-line tool should just stop, as `cat` does.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(ops, cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
