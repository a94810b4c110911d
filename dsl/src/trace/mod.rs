//! Tracing: turning a kernel's Rust code into IR as it runs on typed handles.

pub(crate) mod builder;
pub mod control;
pub(crate) mod ops;
pub mod refs;
pub mod values;

pub use ops::broadcast_shapes;
