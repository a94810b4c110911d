//! The interpreter's values: dtype-tagged ndarrays. Floats of every width are held as f32
//! rounded to their dtype after each op, integers as i32 wrapped to theirs, so each op is
//! written once per storage class while results match the narrow dtype bit for bit.

use half::{bf16, f16};
use ndarray::ArrayD;

use crate::dtype::DType;
use crate::host::HostArray;

#[derive(Clone, Debug)]
pub(crate) enum Data {
    F(ArrayD<f32>),
    I(ArrayD<i32>),
    B(ArrayD<bool>),
}

#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub dtype: DType,
    pub data: Data,
}

/// A bf16's bits held as f32, exactly: NaN payloads included (`half` quiets signalling NaNs,
/// which would change the bits a bitcast reads).
pub(crate) fn bf16_from_bits(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The bf16 bits of a held value: exact for what `bf16_from_bits` holds, rounded otherwise.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() && b & 0xffff == 0 {
        return (b >> 16) as u16;
    }
    bf16::from_f32(x).to_bits()
}

pub(crate) fn round_f32(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16_from_bits(bf16_bits(x)),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

pub(crate) fn wrap_i32(dtype: DType, x: i32) -> i32 {
    match dtype {
        DType::I8 => x as i8 as i32,
        _ => x,
    }
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        match &self.data {
            Data::F(a) => a.shape(),
            Data::I(a) => a.shape(),
            Data::B(a) => a.shape(),
        }
    }

    /// Builds from f32 storage, rounding to `dtype`.
    pub fn float(dtype: DType, mut a: ArrayD<f32>) -> Tensor {
        if matches!(dtype, DType::BF16 | DType::F16) {
            a.mapv_inplace(|x| round_f32(dtype, x));
        }
        Tensor { dtype, data: Data::F(a) }
    }

    /// Builds from i32 storage, wrapping to `dtype`.
    pub fn int(dtype: DType, mut a: ArrayD<i32>) -> Tensor {
        if dtype == DType::I8 {
            a.mapv_inplace(|x| wrap_i32(dtype, x));
        }
        Tensor { dtype, data: Data::I(a) }
    }

    pub fn boolean(a: ArrayD<bool>) -> Tensor {
        Tensor { dtype: DType::Bool, data: Data::B(a) }
    }

    /// A tensor of `shape` filled with `value` (NaN poisons floats; ints get i32::MIN-like patterns).
    pub fn filled(dtype: DType, shape: &[usize], value: f64) -> Tensor {
        match dtype {
            d if d.is_float() => Tensor::float(d, ArrayD::from_elem(shape, value as f32)),
            d if d.is_int() => Tensor::int(d, ArrayD::from_elem(shape, if value.is_nan() { i32::MIN } else { value as i32 })),
            _ => Tensor::boolean(ArrayD::from_elem(shape, value != 0.0 && !value.is_nan())),
        }
    }

    pub fn from_host(a: &HostArray) -> Tensor {
        match a {
            HostArray::F32(x) => Tensor { dtype: DType::F32, data: Data::F(x.clone()) },
            HostArray::BF16(x) => Tensor { dtype: DType::BF16, data: Data::F(x.mapv(|v| bf16_from_bits(v.to_bits()))) },
            HostArray::F16(x) => Tensor { dtype: DType::F16, data: Data::F(x.mapv(|v| v.to_f32())) },
            HostArray::I32(x) => Tensor { dtype: DType::I32, data: Data::I(x.clone()) },
            HostArray::I8(x) => Tensor { dtype: DType::I8, data: Data::I(x.mapv(i32::from)) },
            HostArray::Bool(x) => Tensor { dtype: DType::Bool, data: Data::B(x.clone()) },
        }
    }

    pub fn into_host(self) -> HostArray {
        match (self.dtype, self.data) {
            (DType::BF16, Data::F(x)) => HostArray::BF16(x.mapv(|v| bf16::from_bits(bf16_bits(v)))),
            (DType::F16, Data::F(x)) => HostArray::F16(x.mapv(f16::from_f32)),
            (_, Data::F(x)) => HostArray::F32(x),
            (DType::I8, Data::I(x)) => HostArray::I8(x.mapv(|v| v as i8)),
            (_, Data::I(x)) => HostArray::I32(x),
            (_, Data::B(x)) => HostArray::Bool(x),
        }
    }

    /// The value of a rank-0 i32 tensor (block indices, dynamic offsets, loop bounds).
    pub fn scalar_i64(&self) -> Option<i64> {
        match &self.data {
            Data::I(a) if a.ndim() == 0 => a.first().map(|&v| v as i64),
            _ => None,
        }
    }

    pub fn scalar_bool(&self) -> Option<bool> {
        match &self.data {
            Data::B(a) if a.ndim() == 0 => a.first().copied(),
            _ => None,
        }
    }
}
