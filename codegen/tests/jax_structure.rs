//! Our Mosaic for matmul and flash attention has the structure JAX Pallas gives the same
//! kernels and blocks: window bounds, iteration bounds, dimension semantics, scalar prefetch
//! and scratch counts, and operand order and types. The JAX modules are the reference files
//! in `shared/reference/mosaic/` beside the repository (or `$TORCHTPU_REFERENCE_DIR`).

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_testkernels::{flash::Flash, matmul::Matmul, Example};

fn reference(name: &str) -> String {
    let dir = std::env::var_os("TORCHTPU_REFERENCE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/mosaic"));
    let path = dir.join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reference module {} is required: {e}", path.display()))
}

/// The structural facts of a Mosaic module's kernel function.
#[derive(Debug, PartialEq)]
struct Structure {
    iteration_bounds: String,
    dimension_semantics: String,
    scalar_prefetch: String,
    scratch_operands: String,
    window_bounds: Vec<String>,
    /// Types of the grid and windowed operand arguments, in order (scratch excluded).
    operand_types: Vec<String>,
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let i = s.find(start).unwrap_or_else(|| panic!("`{start}` not in module")) + start.len();
    &s[i..i + s[i..].find(end).expect("terminated")]
}

fn structure(module: &str) -> Structure {
    let header = module.lines().find(|l| l.contains("window_params")).expect("a kernel function");
    let window_bounds = header.split("window_bounds = array<i64: ").skip(1).map(|w| w[..w.find('>').expect("closed")].to_string()).collect::<Vec<_>>();
    let args = between(header, "(", ") attributes");
    let types: Vec<String> = args.split(", %").map(|a| a.split_once(": ").expect("typed argument").1.to_string()).collect();
    let n_grid = types.iter().filter(|t| *t == "i32").count();
    Structure {
        iteration_bounds: between(header, "iteration_bounds = array<i64: ", ">").into(),
        dimension_semantics: between(header, "dimension_semantics = [", "]").into(),
        scalar_prefetch: between(header, "scalar_prefetch = ", " ").into(),
        scratch_operands: between(header, "scratch_operands = ", " ").into(),
        operand_types: types[..n_grid + window_bounds.len()].to_vec(),
        window_bounds,
    }
}

fn ours(example: &dyn Example) -> String {
    let types: Vec<_> = example.random_inputs(&mut StdRng::seed_from_u64(0)).iter().map(HostArray::value_type).collect();
    lower(&example.call().trace(&types).expect("traces"), Target::Mosaic).expect("lowers")
}

#[test]
fn matmul_matches_jax_pallas() {
    let jax = structure(&reference("matmul.mosaic.mlir"));
    let ours = structure(&ours(&Matmul { m: 1024, n: 1024, k: 1024, block: (256, 256, 256), dtype: DType::BF16 }));
    assert_eq!(ours, jax);
    assert_eq!(jax.iteration_bounds, "4, 4, 4");
}

#[test]
fn flash_attention_matches_jax_pallas() {
    let jax = structure(&reference("flash.mosaic.mlir"));
    let flash = Flash { batch: 1, heads: 2, seq: 512, head_dim: 128, block_q: 128, block_k: 128, dtype: DType::F32 };
    let ours = structure(&ours(&flash));
    assert_eq!(ours, jax);
    assert_eq!(jax.window_bounds.len(), 4);
}
