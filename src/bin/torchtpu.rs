//! The `torchtpu` command line: inspect and run the acceptance kernels.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu::dsl::{DType, HostArray, InterpretOptions};
use torchtpu_testkernels::{acceptance_set, find, relative_error, tolerance, Example};

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
            let mut rng = StdRng::seed_from_u64(0);
            let types: Vec<_> = example.random_inputs(&mut rng).iter().map(HostArray::value_type).collect();
            let traced = example.call().trace(&types).map_err(|e| e.to_string())?;
            println!("// {}: grid {:?}, semantics {:?}", example.name(), traced.grid, traced.semantics);
            for op in traced.inputs.iter().chain(&traced.outputs) {
                print!("{}", op.index_map);
            }
            print!("{}", traced.body);
            Ok(true)
        }
        Command::Interpret { kernel, dtype, checked, seed } => {
            let example = lookup(&kernel, dtype)?;
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
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
