//! Element types a kernel can hold in a ref or a tile.

use std::fmt;

use half::{bf16, f16};

/// The dtype of a value or a ref, as the IR sees it (serialized as its short name, `bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    I8,
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I8)
    }

    /// Whether a TPU holds this dtype in VMEM and vector registers. Mosaic cannot load f16
    /// on any chip (libtpu: "Invalid vector type for load"; `exec/tests/conformance.rs`).
    pub fn on_tpu(self) -> bool {
        self != DType::F16
    }

    /// Size of one element in memory, in bytes (bool is stored as one byte).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 | DType::Bool => 1,
        }
    }

    /// The MLIR spelling, shared by the printer and the code generators.
    pub fn mlir_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::Bool => "i1",
        }
    }

    /// The accumulator dtype `dot` produces for operands of this dtype.
    pub fn dot_accumulator(self) -> Option<DType> {
        match self {
            DType::F32 | DType::BF16 | DType::F16 => Some(DType::F32),
            DType::I32 | DType::I8 => Some(DType::I32),
            DType::Bool => None,
        }
    }

    /// Rounds an f64 to the nearest value this dtype can hold, returned as f64.
    pub fn round(self, x: f64) -> f64 {
        match self {
            DType::F32 => x as f32 as f64,
            DType::BF16 => bf16::from_f64(x).to_f64(),
            DType::F16 => f16::from_f64(x).to_f64(),
            DType::I32 => x as i32 as f64,
            DType::I8 => x as i8 as f64,
            DType::Bool => (x != 0.0) as i32 as f64,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::Bool => "bool",
        };
        f.write_str(name)
    }
}

/// A Rust type that can be the element type of a `Ref`, `Tile` or `Scalar`.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}

/// Numeric elements: arithmetic works on them (bool is not one).
pub trait Numeric: Element {}

/// Elements `dot` takes, with the type it accumulates in: f32 for floats, i32 for integers.
pub trait DotOperand: Numeric {
    type Acc: Numeric;
}

/// Floating-point elements: these get `exp`, `log` and the like.
pub trait Float: DotOperand<Acc = f32> {}

/// Integer elements: these get bitwise ops.
pub trait Int: DotOperand<Acc = i32> {}

macro_rules! element {
    ($t:ty, $d:ident, $($marker:ident),*) => {
        impl Element for $t { const DTYPE: DType = DType::$d; }
        $(impl $marker for $t {})*
    };
}
element!(f32, F32, Float, Numeric);
element!(bf16, BF16, Float, Numeric);
element!(f16, F16, Float, Numeric);
element!(i32, I32, Int, Numeric);
element!(i8, I8, Int, Numeric);
element!(bool, Bool,);

/// The element of a DMA semaphore scratch (`&mut Scratch<DmaSemaphore>`, declared in the call
/// with `DmaSemaphores::new(n)`): only copies and waits use it. Its count is held as an i32.
#[derive(Clone, Copy, Debug)]
pub struct DmaSemaphore;

impl Element for DmaSemaphore {
    const DTYPE: DType = DType::I32;
}

impl DotOperand for f32 {
    type Acc = f32;
}
impl DotOperand for bf16 {
    type Acc = f32;
}
impl DotOperand for f16 {
    type Acc = f32;
}
impl DotOperand for i32 {
    type Acc = i32;
}
impl DotOperand for i8 {
    type Acc = i32;
}
