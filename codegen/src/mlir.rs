//! MLIR spellings shared by the Mosaic and StableHLO emitters.

use half::{bf16, f16};
use torchtpu_dsl::ir::{Loc, MemorySpace, RefType, ValueType};
use torchtpu_dsl::DType;

fn dims(shape: &[usize]) -> String {
    shape.iter().map(|d| format!("{d}x")).collect()
}

/// `f32`, or `vector<8x128xf32>` for a tile.
pub fn value_type(t: &ValueType) -> String {
    if t.shape.is_empty() {
        t.dtype.mlir_name().to_string()
    } else {
        format!("vector<{}{}>", dims(&t.shape), t.dtype.mlir_name())
    }
}

pub fn memref_type(r: &RefType) -> String {
    let (space, element) = match r.space {
        MemorySpace::Vmem => ("vmem", r.dtype.mlir_name()),
        MemorySpace::Smem => ("smem", r.dtype.mlir_name()),
        MemorySpace::Any => ("any", r.dtype.mlir_name()),
        MemorySpace::Semaphore => ("semaphore_mem", "!tpu.dma_semaphore"),
    };
    format!("memref<{}{element}, #tpu.memory_space<{space}>>", dims(&r.shape))
}

pub fn tensor_type(t: &ValueType) -> String {
    format!("tensor<{}{}>", dims(&t.shape), t.dtype.mlir_name())
}

/// A float literal MLIR parses back to the same value of `dtype` (hex bits when not finite).
pub fn float_literal(x: f64, dtype: DType) -> String {
    if x.is_finite() {
        return format!("{x:.9e}");
    }
    match dtype {
        DType::BF16 => format!("0x{:04X}", bf16::from_f64(x).to_bits()),
        DType::F16 => format!("0x{:04X}", f16::from_f64(x).to_bits()),
        _ => format!("0x{:08X}", (x as f32).to_bits()),
    }
}

/// ` loc("file":line:col)`, appended to every op so compiler messages name the Rust line.
pub fn loc(l: Loc) -> String {
    format!(" loc(\"{}\":{}:{})", l.file.replace('\\', "\\\\").replace('"', "\\\""), l.line, l.column)
}

/// `name` with anything MLIR would not take in a symbol replaced by `_`.
pub fn symbol(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}
