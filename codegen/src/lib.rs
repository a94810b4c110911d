//! Lowering torchtpu kernels: IR → Mosaic (readable and version-stable forms), wrapped in a
//! StableHLO `tpu_custom_call` for the TPU compiler (alone, or sharded over a mesh of devices); IR → portable StableHLO for any PJRT
//! backend; and a cost estimate from the IR.

pub mod artifact;
mod bytecode;
mod compose;
pub mod cost;
pub mod error;
mod mlir;
pub mod mosaic;
pub mod portable;
pub mod spmd;
pub mod stablehlo;

pub use cost::CostEstimate;
pub use error::{Error, Result};
pub use mlir::tensor_type;
pub use mosaic::Form;
pub use spmd::{Mesh, PartitionSpec, SpmdModule, SpmdProgram};

/// What `lower` produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The Mosaic kernel module, readable.
    Mosaic,
    /// The Mosaic kernel module in the serialized `stable_mosaic` form.
    MosaicStable,
    /// A StableHLO module calling the (stable) kernel through `tpu_custom_call`: what we ship.
    TpuStableHlo,
    /// Portable StableHLO (the grid as a while loop) for any PJRT backend: CPU, CUDA.
    PortableStableHlo,
}

/// Lowers a traced call to `target`, as text.
///
/// For the TPU targets the blocks are checked against the TPU's tiling first, so a kernel
/// that only the interpreter and PJRT CPU would run fails here with its `BlockSpec`'s Rust
/// line rather than in libtpu.
pub fn lower(call: &torchtpu_dsl::TracedCall, target: Target) -> Result<String> {
    if target != Target::PortableStableHlo {
        check_tiling(call)?;
    }
    match target {
        Target::Mosaic => mosaic::module(call, Form::Pretty),
        Target::MosaicStable => mosaic::module(call, Form::Stable),
        Target::TpuStableHlo => stablehlo::tpu_custom_call(call, Form::Stable),
        Target::PortableStableHlo => portable::module(call),
    }
}

/// A kernel's TPU module in both its forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpuModule {
    /// StableHLO text: what `lower` prints for [`Target::TpuStableHlo`].
    pub text: String,
    /// The same module as a StableHLO portable artifact (VHLO in MLIR bytecode,
    /// [`artifact`]): what TorchTPU's bridge is given, as JAX gives it.
    pub artifact: Vec<u8>,
}

/// Lowers `call` for a TPU in both forms of [`TpuModule`], checking its blocks as [`lower`]
/// does.
pub fn lower_tpu(call: &torchtpu_dsl::TracedCall) -> Result<TpuModule> {
    check_tiling(call)?;
    let kernel = stablehlo::KernelCall::new(call, Form::Stable)?;
    let name = mlir::symbol(&call.name);
    Ok(TpuModule { text: stablehlo::module_text(&name, &kernel), artifact: artifact::module(&name, &kernel) })
}

/// The SPMD program running `call` (traced on one device's shards) on every device of `mesh`,
/// operand `i` laid out by `inputs[i]` and output `j` by `outputs[j]` (see
/// [`spmd::sharded_module`]); the blocks are checked against the TPU's tiling first, as in
/// [`lower`].
pub fn lower_sharded(call: &torchtpu_dsl::TracedCall, mesh: &Mesh, inputs: &[PartitionSpec], outputs: &[PartitionSpec]) -> Result<SpmdModule> {
    check_tiling(call)?;
    spmd::sharded_module(SpmdProgram::new(mesh), call, inputs, outputs)
}

fn check_tiling(call: &torchtpu_dsl::TracedCall) -> Result<()> {
    let violations = call.tiling_violations();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::Tiling { kernel: call.kernel.name().to_string(), violations })
    }
}
