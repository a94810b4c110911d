//! Host arrays to device buffers and back, for every dtype (row-major, little-endian).

use half::{bf16, f16};
use ndarray::ArrayD;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray};
use torchtpu_runtime::{Buffer, Client, ElementType};

use crate::{Error, Result};

pub(crate) fn element_type(d: DType) -> ElementType {
    match d {
        DType::F32 => ElementType::F32,
        DType::BF16 => ElementType::BF16,
        DType::F16 => ElementType::F16,
        DType::I32 => ElementType::I32,
        DType::I8 => ElementType::I8,
        DType::Bool => ElementType::Pred,
    }
}

fn bytes<T: Copy>(a: &ArrayD<T>, to_le: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    a.iter().flat_map(|&x| to_le(x)).collect()
}

/// Copies `a` to the client's device.
pub fn upload(client: &Client, a: &HostArray) -> Result<Buffer> {
    Ok(client.buffer(&to_bytes(a), element_type(a.dtype()), a.shape())?)
}

/// `a`'s elements, row-major, little-endian.
pub fn to_bytes(a: &HostArray) -> Vec<u8> {
    match a {
        HostArray::F32(x) => bytes(x, |v| v.to_le_bytes().to_vec()),
        HostArray::BF16(x) => bytes(x, |v| v.to_bits().to_le_bytes().to_vec()),
        HostArray::F16(x) => bytes(x, |v| v.to_bits().to_le_bytes().to_vec()),
        HostArray::I32(x) => bytes(x, |v| v.to_le_bytes().to_vec()),
        HostArray::I8(x) => bytes(x, |v| v.to_le_bytes().to_vec()),
        HostArray::Bool(x) => bytes(x, |v| vec![v as u8]),
    }
}

fn array<T>(shape: &[usize], data: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(shape.to_vec(), data).map_err(|e| Error::Input(format!("device output does not fit {shape:?}: {e}")))
}

/// Copies a device buffer holding an array of type `t` back to the host.
pub fn download(b: &Buffer, t: &ValueType) -> Result<HostArray> {
    from_bytes(&b.to_host(t.size_bytes())?, t)
}

/// An array of type `t` from its row-major, little-endian bytes.
pub fn from_bytes(raw: &[u8], t: &ValueType) -> Result<HostArray> {
    if raw.len() != t.size_bytes() {
        return Err(Error::Input(format!("{} bytes do not make a {t} ({} bytes)", raw.len(), t.size_bytes())));
    }
    let shape = &t.shape;
    Ok(match t.dtype {
        DType::F32 => HostArray::F32(array(shape, raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())?),
        DType::BF16 => HostArray::BF16(array(shape, raw.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())?),
        DType::F16 => HostArray::F16(array(shape, raw.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())?),
        DType::I32 => HostArray::I32(array(shape, raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())?),
        DType::I8 => HostArray::I8(array(shape, raw.iter().map(|&v| v as i8).collect())?),
        DType::Bool => HostArray::Bool(array(shape, raw.iter().map(|&v| v != 0).collect())?),
    })
}
