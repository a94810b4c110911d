//! PJRT from Rust: our own C API declarations, plugin discovery and loading, and deviceless
//! TPU compilation through libtpu.

pub mod client;
pub mod error;
pub mod ffi;
pub mod locate;
pub mod plugin;
pub mod tpu;

pub use client::{BorrowedBuffer, Buffer, Client, ElementType, Executable};
pub use error::{Error, Result};
pub use plugin::Plugin;
pub use torchtpu_hw::UnknownChip;
pub use tpu::{Chip, CompileError, CompiledModule, Slice, SourceLocation, TpuCompiler};
