//! Arrays on the host, tagged with their dtype: what callers pass in and get back.

use half::{bf16, f16};
use ndarray::{Array, ArrayD, ArrayViewD, Dimension};

use crate::dtype::{DType, Element};
use crate::ir::ValueType;

#[derive(Clone, Debug, PartialEq)]
pub enum HostArray {
    F32(ArrayD<f32>),
    BF16(ArrayD<bf16>),
    F16(ArrayD<f16>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    Bool(ArrayD<bool>),
}

/// Element types that have a `HostArray` variant.
pub trait HostElement: Element + Clone {
    fn wrap(a: ArrayD<Self>) -> HostArray;
    fn view(a: &HostArray) -> Option<ArrayViewD<'_, Self>>;
    fn unwrap(a: HostArray) -> Result<ArrayD<Self>, HostArray>;
}

macro_rules! host_element {
    ($($t:ty => $v:ident),*) => {$(
        impl HostElement for $t {
            fn wrap(a: ArrayD<Self>) -> HostArray { HostArray::$v(a) }
            fn view(a: &HostArray) -> Option<ArrayViewD<'_, Self>> {
                match a { HostArray::$v(x) => Some(x.view()), _ => None }
            }
            fn unwrap(a: HostArray) -> Result<ArrayD<Self>, HostArray> {
                match a { HostArray::$v(x) => Ok(x), other => Err(other) }
            }
        }
        impl<D: Dimension> From<Array<$t, D>> for HostArray {
            fn from(a: Array<$t, D>) -> Self { HostArray::$v(a.into_dyn()) }
        }
        impl<D: Dimension> From<&Array<$t, D>> for HostArray {
            fn from(a: &Array<$t, D>) -> Self { HostArray::$v(a.clone().into_dyn()) }
        }
    )*};
}
host_element!(f32 => F32, bf16 => BF16, f16 => F16, i32 => I32, i8 => I8, bool => Bool);

macro_rules! each {
    ($a:expr, $x:ident => $e:expr) => {
        match $a {
            HostArray::F32($x) => $e,
            HostArray::BF16($x) => $e,
            HostArray::F16($x) => $e,
            HostArray::I32($x) => $e,
            HostArray::I8($x) => $e,
            HostArray::Bool($x) => $e,
        }
    };
}

impl HostArray {
    pub fn dtype(&self) -> DType {
        match self {
            HostArray::F32(_) => DType::F32,
            HostArray::BF16(_) => DType::BF16,
            HostArray::F16(_) => DType::F16,
            HostArray::I32(_) => DType::I32,
            HostArray::I8(_) => DType::I8,
            HostArray::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each!(self, x => x.shape())
    }

    pub fn value_type(&self) -> ValueType {
        ValueType::new(self.dtype(), self.shape().to_vec())
    }

    /// The elements widened to f64 (bool as 0/1), for references and error measurement.
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            HostArray::F32(x) => x.mapv(f64::from),
            HostArray::BF16(x) => x.mapv(|v| v.to_f64()),
            HostArray::F16(x) => x.mapv(|v| v.to_f64()),
            HostArray::I32(x) => x.mapv(f64::from),
            HostArray::I8(x) => x.mapv(f64::from),
            HostArray::Bool(x) => x.mapv(|v| v as i32 as f64),
        }
    }

    /// An array of `dtype` holding `values` rounded to it.
    pub fn from_f64(dtype: DType, values: &ArrayD<f64>) -> HostArray {
        match dtype {
            DType::F32 => HostArray::F32(values.mapv(|v| v as f32)),
            DType::BF16 => HostArray::BF16(values.mapv(bf16::from_f64)),
            DType::F16 => HostArray::F16(values.mapv(f16::from_f64)),
            DType::I32 => HostArray::I32(values.mapv(|v| v as i32)),
            DType::I8 => HostArray::I8(values.mapv(|v| v as i8)),
            DType::Bool => HostArray::Bool(values.mapv(|v| v != 0.0)),
        }
    }

    /// The same elements, in row-major order, in `shape`; an error if the sizes differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<HostArray, String> {
        let to = |n: usize| if n == self.shape().iter().product::<usize>() { Ok(()) } else { Err(format!("cannot reshape {:?} to {shape:?}: {n} elements", self.shape())) };
        to(shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).unwrap_or(usize::MAX))?;
        Ok(each!(self, x => HostArray::from(x.as_standard_layout().into_owned().into_shape_with_order(shape.to_vec()).map_err(|e| e.to_string())?)))
    }

    pub fn view<T: HostElement>(&self) -> Option<ArrayViewD<'_, T>> {
        T::view(self)
    }

    /// The array as `ArrayD<T>`, or itself back if it holds another dtype.
    pub fn into_array<T: HostElement>(self) -> Result<ArrayD<T>, HostArray> {
        T::unwrap(self)
    }
}
