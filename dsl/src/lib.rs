//! The torchtpu kernel language.
//!
//! Kernels are Rust functions under [`tpu_kernel`]; calling them on typed handles
//! ([`Ref`], [`Tile`], [`Scalar`]...) records IR ([`ir`]). A [`PallasCall`] gives a kernel
//! its grid and block specs; [`PallasCall::trace`] produces a [`TracedCall`] for the code
//! generators, and [`PallasCall::interpret`] runs it on the CPU.

pub mod accuracy;
mod addressing;
pub mod call;
pub mod dtype;
pub mod elementwise;
pub mod error;
pub mod host;
pub mod interpret;
pub mod ir;
pub mod kernel;
pub mod memory;
mod printer;
pub mod random;
pub mod scalar;
pub mod trace;
pub mod verify;

pub use call::{
    sublanes, BlockIndex, BlockOperand, BlockSpec, DmaSemaphores, Operand, PallasCall, RefLayout, ScratchOperand, ScratchSpec, Semantics, Smem, TracedCall, Vmem, LANES,
    MIN_SUBLANES,
};
pub use dtype::{DType, DmaSemaphore, DotOperand, Element, Float, Int, Numeric};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use host::{HostArray, HostElement};
pub use interpret::InterpretOptions;
pub use kernel::{KernelDef, ParamKind, ParamSig};
pub use torchtpu_macros::{tpu_fn, tpu_kernel};
pub use trace::refs::{async_copy, ds, full, zeros, AsyncCopy, Fill, IntoIndex, Ix, Prefetch, Ref, Scratch, Storable, Window};
pub use trace::values::{
    concatenate, dot, dot_nt, dot_tn, iota, maximum, minimum, num_programs, pow, prng_random_bits, prng_seed, program_id, random_bits_at, random_key, random_uniform, select,
    Scalar, Tile,
};

/// Everything a kernel author needs: `use torchtpu_dsl::prelude::*;`.
pub mod prelude {
    pub use crate::call::Semantics::{Arbitrary, Parallel};
    pub use crate::{
        async_copy, bf16, concatenate, dot, dot_nt, dot_tn, ds, f16, full, iota, maximum, minimum, num_programs, pow, prng_random_bits, prng_seed, program_id, random_bits_at,
        random_key, random_uniform, select, tpu_fn, tpu_kernel, zeros, BlockSpec, DType, DmaSemaphore, DmaSemaphores, Element, Float, HostArray, PallasCall, Prefetch, Ref, Scalar,
        Scratch, Semantics, Smem, Tile, Vmem,
    };
}
