//! A PyTorch tensor seen from Rust: its memory, shape and dtype, read through its Python
//! methods, with the checks that make touching that memory sound.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::DType;

/// A contiguous CPU tensor's memory. Valid while the Python object it came from is alive,
/// which the calling Python frame guarantees for the whole call.
pub struct Tensor {
    ptr: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Tensor {
    /// Reads `t` (named `name` in errors) and checks it is a contiguous CPU tensor of a dtype
    /// our kernels take.
    pub fn from_py(name: &str, t: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        let device: String =
            t.getattr("device").and_then(|d| d.getattr("type")).and_then(|d| d.extract()).map_err(|_| PyTypeError::new_err(format!("{name} must be a torch.Tensor")))?;
        if device != "cpu" {
            return Err(PyValueError::new_err(format!("{name} is on `{device}`; the torchtpu CPU kernels take CPU tensors")));
        }
        if !t.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(PyValueError::new_err(format!("{name} is not contiguous; call .contiguous() first")));
        }
        let dtype_name: String = t.getattr("dtype")?.str()?.extract()?;
        let dtype = match dtype_name.as_str() {
            "torch.float32" => DType::F32,
            "torch.bfloat16" => DType::BF16,
            "torch.int32" => DType::I32,
            "torch.int8" => DType::I8,
            other => return Err(PyTypeError::new_err(format!("{name} is {other}; expected torch.float32, torch.bfloat16, torch.int32 or torch.int8"))),
        };
        let shape: Vec<usize> = t.getattr("shape")?.extract()?;
        let ptr: usize = t.call_method0("data_ptr")?.extract()?;
        let numel: usize = shape.iter().product();
        if numel > 0 && ptr == 0 {
            return Err(PyValueError::new_err(format!("{name} has no storage")));
        }
        Ok(Tensor { ptr, shape, dtype })
    }

    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }

    /// Checks the tensor's shape and dtype; `name` is the argument's, for the error.
    pub fn expect(&self, name: &str, shape: &[usize], dtype: DType) -> PyResult<()> {
        if self.shape != shape || self.dtype != dtype {
            return Err(PyValueError::new_err(format!("{name} must be {dtype} {shape:?}; got {} {:?}", self.dtype, self.shape)));
        }
        Ok(())
    }

    /// The tensor's bytes.
    ///
    /// # Safety
    /// The tensor must outlive the slice and nothing may write to it meanwhile.
    pub unsafe fn bytes(&self) -> &[u8] {
        if self.nbytes() == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const u8, self.nbytes())
    }

    /// The tensor as i32s (segment ids).
    ///
    /// # Safety
    /// As for [`Tensor::bytes`]; the tensor must be i32.
    pub unsafe fn i32s(&self) -> &[i32] {
        if self.nbytes() == 0 {
            return &[];
        }
        // torch's CPU allocations are at least 64-byte aligned, and an i32 tensor's data
        // pointer (even a view's) is aligned to its element.
        std::slice::from_raw_parts(self.ptr as *const i32, self.nbytes() / 4)
    }
}
