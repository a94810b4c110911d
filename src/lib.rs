//! torchtpu: Pallas for Rust. Tiled TPU kernels written as Rust functions under
//! [`tpu_kernel`], traced to IR, interpreted on the CPU, lowered to Mosaic, compiled with the
//! real TPU compiler, run through PJRT, tuned, and shipped as ops.
//!
//! This crate re-exports the parts, so that a kernel author depends on it alone: [`dsl`] (the
//! kernel language, tracing, the interpreter), [`codegen`] (lowering), [`runtime`] (PJRT and
//! libtpu), [`exec`] (running on a backend), [`autotune`], and [`kernels`] (the op layer, the
//! registry and the shipped ops). Most users want [`prelude`].

pub mod cli;

pub use torchtpu_autotune as autotune;
pub use torchtpu_codegen as codegen;
pub use torchtpu_dsl as dsl;
pub use torchtpu_dsl::{tpu_fn, tpu_kernel};
pub use torchtpu_exec as exec;
pub use torchtpu_kernels as kernels;
pub use torchtpu_runtime as runtime;

// What an op's signature names: its problem and config derive serde's traits (with
// `#[serde(crate = "torchtpu::serde")]`), its reference returns ndarray arrays, its random
// inputs take rand's generator. Re-exported so that torchtpu is the one dependency.
pub use ndarray;
pub use rand;
pub use serde;
pub use serde_json;

/// Everything a kernel author needs: `use torchtpu::prelude::*;` — the kernel language, and
/// what it takes to make a kernel an op, run it and tune it.
pub mod prelude {
    pub use torchtpu_autotune::SearchSpace;
    pub use torchtpu_dsl::ir::ValueType;
    pub use torchtpu_dsl::prelude::*;
    pub use torchtpu_exec::Backend;
    pub use torchtpu_kernels::op::{Op, Tuning};
    pub use torchtpu_kernels::registry::{AnyOp, Registered};
    pub use torchtpu_kernels::tables::TableTarget;
    pub use torchtpu_runtime::Chip;
}
