//! The kernels people call: flash attention (forward and backward) and matmul, written with
//! `#[tpu_kernel]`, with a Rust API that runs them on any backend.

pub mod flash;
pub mod matmul;
pub mod tuning;

/// The kernels compute on f32 or bf16 inputs (accumulating in f32); `kernel` names the one
/// that refuses anything else.
fn check_float_dtype(kernel: &str, dtype: torchtpu_dsl::DType) -> Result<(), Error> {
    use torchtpu_dsl::DType;
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype(format!("{kernel} takes f32 or bf16, not {other}"))),
    }
}

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
    #[error(transparent)]
    Trace(#[from] torchtpu_dsl::Error),
    #[error(transparent)]
    Lower(#[from] torchtpu_codegen::Error),
}
