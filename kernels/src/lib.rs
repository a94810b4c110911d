//! The kernels people call — flash attention (forward and backward), matmul, RMS norm — written
//! with `#[tpu_kernel]`, each an [`op::Op`], with a Rust API that runs them on any backend.

pub mod flash;
pub mod matmul;
pub mod op;
pub mod registry;
pub mod rms_norm;
pub mod tables;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("bad shape: {0}")]
    Shape(String),
    #[error("unsupported dtype: {0}")]
    Dtype(String),
    #[error(transparent)]
    Exec(#[from] torchtpu_exec::Error),
    #[error("out of memory: {0}")]
    Memory(String),
    #[error("tuned table: {0}")]
    Table(String),
    #[error("config: {0}")]
    Config(String),
    /// An op name, a setting or a problem that does not describe anything registered.
    #[error("{0}")]
    Argument(String),
    #[error(transparent)]
    Trace(#[from] torchtpu_dsl::Error),
    #[error(transparent)]
    Lower(#[from] torchtpu_codegen::Error),
}
