//! The kernels people call — flash attention (forward and backward), matmul, RMS and layer norm, gated linear units — written
//! with `#[tpu_kernel]`, each an [`op::Op`], with a Rust API that runs them on any backend.

pub mod blocks;
pub mod calibration;
pub mod flash;
pub mod glu;
pub mod glu_linear;
pub mod gmm;
pub mod layer_norm;
pub mod linear_cross_entropy;
pub mod masking;
pub mod matmul;
pub mod op;
pub mod paged_attention;
pub mod quantized_matmul;
pub mod registry;
pub mod ring_attention;
pub mod rms_norm;
pub mod rope;
pub mod rows;
pub mod tables;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("bad shape: {0}")]
    Shape(String),
    #[error("unsupported dtype: {0}")]
    Dtype(String),
    #[error(transparent)]
    Exec(Box<torchtpu_exec::Error>),
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
    Trace(Box<torchtpu_dsl::Error>),
    #[error(transparent)]
    Lower(Box<torchtpu_codegen::Error>),
}

// The errors of the layers below, boxed: a kernel's `Result` stays small on the happy path.
macro_rules! boxed_from {
    ($($variant:ident: $error:ty),*) => {$(
        impl From<$error> for Error {
            fn from(e: $error) -> Error {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(Exec: torchtpu_exec::Error, Trace: torchtpu_dsl::Error, Lower: torchtpu_codegen::Error);
