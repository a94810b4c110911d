//! torchtpu: Pallas for Rust. Tiled TPU kernels written as Rust functions under
//! [`tpu_kernel`], traced to IR, interpreted on the CPU, lowered to Mosaic and tuned.
//!
//! This crate re-exports the parts; most users want [`prelude`].

pub use torchtpu_dsl as dsl;
pub use torchtpu_dsl::{tpu_fn, tpu_kernel};

/// Everything a kernel author needs: `use torchtpu::prelude::*;`.
pub mod prelude {
    pub use torchtpu_dsl::prelude::*;
}
