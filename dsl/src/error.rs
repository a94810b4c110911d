//! Errors of the kernel language: tracing, call specs, inputs and the interpreter's checks.

use crate::ir::Loc;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The kernel body or an index map did something ill-typed; `loc` is the Rust expression.
    #[error("{loc}: in kernel `{kernel}`: {message}")]
    Trace { kernel: String, loc: Loc, message: String },

    /// The IR broke an invariant (found by the verifier).
    #[error("{loc}: in `{func}`: invalid IR: {message}")]
    Verify { func: String, loc: Loc, message: String },

    /// The `PallasCall` does not fit the kernel (grid, block specs, scratch, out shapes).
    #[error("kernel `{kernel}`: {message}")]
    Spec { kernel: String, message: String },

    /// The arrays passed to a call do not fit it.
    #[error("kernel `{kernel}`: bad input: {message}")]
    Input { kernel: String, message: String },

    /// An index map sent a block past the end of its array.
    #[error("kernel `{kernel}`: at grid index {grid_index:?}, the index map of `{operand}` returned block {block:?}, which starts past the array's shape {array_shape:?}")]
    BlockOutOfRange { kernel: String, operand: String, grid_index: Vec<usize>, block: Vec<i64>, array_shape: Vec<usize> },

    /// A load read scratch or output memory that nothing had written (checked mode).
    #[error("{loc}: kernel `{kernel}` at grid index {grid_index:?}: read of uninitialized memory in `{operand}` {region}")]
    UninitializedRead { kernel: String, operand: String, grid_index: Vec<usize>, loc: Loc, region: String },

    /// Checked mode: NaN that checked mode put in input padding or unwritten memory (the
    /// inputs had none) reached an output, so a TPU would have written garbage there.
    #[error("{loc}: kernel `{kernel}` at grid index {grid_index:?}: output `{operand}` block {block:?} holds NaN inside the array, and the inputs hold none: it came from the padding past an input's edge (poisoned in checked mode) or from memory nothing wrote; mask partial blocks (iota + select against the length) before they reach a sum or dot")]
    PoisonReachedOutput { kernel: String, operand: String, grid_index: Vec<usize>, block: Vec<usize>, loc: Loc },

    /// A dynamic slice stepped outside its ref.
    #[error("{loc}: kernel `{kernel}` at grid index {grid_index:?}: out-of-bounds access to `{operand}`: {detail}")]
    OutOfBounds { kernel: String, operand: String, grid_index: Vec<usize>, loc: Loc, detail: String },

    /// Two programs that may run at once wrote the same output block.
    #[error("kernel `{kernel}`: race on output `{operand}` block {block:?}: written by grid index {first:?} and by grid index {second:?}, which run in parallel (make the axis that differs `arbitrary`, or give them different blocks)")]
    Race { kernel: String, operand: String, block: Vec<usize>, first: Vec<usize>, second: Vec<usize> },

    /// The arrays of a call do not fit this machine's memory (or its address space).
    #[error("kernel `{kernel}`: {message}")]
    TooLarge { kernel: String, message: String },

    /// A value computed by the interpreter broke a rule the IR cannot state (division by zero, a loop bound).
    #[error("{loc}: kernel `{kernel}` at grid index {grid_index:?}: {message}")]
    Runtime { kernel: String, grid_index: Vec<usize>, loc: Loc, message: String },
}
