//! Outputs handed to torch without a copy: a DLPack capsule (`torch.from_dlpack`) over the
//! host memory our backend produced the output in, freed when torch frees the tensor.

use std::ffi::{c_void, CStr};

use pyo3::prelude::*;
use torchtpu_dsl::DType;
use torchtpu_exec::HostOutput;

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What a capsule owns: the tensor header (first, so a pointer to it is one to this), the
/// shape it points to, and the output memory.
#[repr(C)]
struct Owned {
    managed: DLManagedTensor,
    _shape: Vec<i64>,
    _output: HostOutput,
}

const K_DL_CPU: i32 = 1;
const NAME: &CStr = c"dltensor";

fn dl_dtype(d: DType) -> DLDataType {
    // DLPack type codes: 0 int, 1 uint, 2 float, 4 bfloat, 6 bool.
    let (code, bits) = match d {
        DType::F32 => (2, 32),
        DType::F16 => (2, 16),
        DType::BF16 => (4, 16),
        DType::I32 => (0, 32),
        DType::I8 => (0, 8),
        DType::Bool => (6, 8),
    };
    DLDataType { code, bits, lanes: 1 }
}

unsafe extern "C" fn delete(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` is the first field of a leaked `Owned` (see `capsule`), and the
    // consumer calls the deleter once.
    drop(unsafe { Box::from_raw(managed as *mut Owned) });
}

unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and takes over the deleter; one left
    // unconsumed still owns its tensor.
    // SAFETY: called by Python with our capsule.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let managed = pyo3::ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()) as *mut DLManagedTensor;
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        }
    }
}

/// A DLPack capsule over `output`: `torch.from_dlpack(capsule)` gives the tensor.
pub fn capsule(py: Python<'_>, output: HostOutput) -> PyResult<Py<PyAny>> {
    let mut shape: Vec<i64> = output.value_type.shape.iter().map(|&d| d as i64).collect();
    let data = output.bytes().as_ptr() as *mut c_void;
    let dl_tensor = DLTensor {
        data,
        device: DLDevice { device_type: K_DL_CPU, device_id: 0 },
        ndim: shape.len() as i32,
        dtype: dl_dtype(output.value_type.dtype),
        shape: shape.as_mut_ptr(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let owned = Box::new(Owned { managed: DLManagedTensor { dl_tensor, manager_ctx: std::ptr::null_mut(), deleter: Some(delete) }, _shape: shape, _output: output });
    let raw = Box::into_raw(owned);
    // SAFETY: `raw` is a live, leaked `Owned` whose first field is the DLManagedTensor;
    // the capsule (or its consumer) frees it exactly once.
    unsafe {
        (*raw).managed.manager_ctx = raw as *mut c_void;
        let capsule = pyo3::ffi::PyCapsule_New(raw as *mut c_void, NAME.as_ptr(), Some(capsule_destructor));
        if capsule.is_null() {
            drop(Box::from_raw(raw));
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, capsule).unbind())
    }
}
