//! Codegen errors: IR the target cannot express, and calls that would fault on a TPU.

use torchtpu_dsl::ir::Loc;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The kernel uses something this target cannot express; `loc` is the Rust expression.
    #[error("{loc}: in kernel `{kernel}`: cannot lower to {target}: {message}")]
    Unsupported { kernel: String, target: &'static str, loc: Loc, message: String },

    /// Blocks a TPU cannot tile, offsets it cannot prove aligned, dtypes it cannot hold; each
    /// violation starts with the Rust line responsible.
    #[error("kernel `{kernel}` does not fit a TPU: {}", violations.join("; "))]
    Tiling { kernel: String, violations: Vec<String> },

    /// A mesh or partition spec that does not fit the program it lays out.
    #[error("sharding: {0}")]
    Sharding(String),

    /// The call itself is invalid (for example an index map that steps past an array).
    #[error(transparent)]
    Dsl(#[from] torchtpu_dsl::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
