//! The native half of the `torchtpu` Python package: PyTorch CPU tensors cross as raw memory
//! (pointer, shape, dtype; no libtorch), our kernels run on the PJRT CPU plugin with the GIL
//! released, reading the inputs where they lie, and the outputs go back as DLPack capsules
//! over the memory the plugin wrote them in: no copy either way. Also the lowered TPU modules, for TorchTPU's kernel bridge.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod dlpack;
mod generic;
mod ops;
mod tensor;
mod tpu;

thread_local! {
    /// Where and why the last panic on this thread happened, for [`guard`]'s error.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs a function's body, turning a panic (a bug of ours: a user's input must give an error
/// value) into a `RuntimeError` that says where, instead of a `PanicException` (which
/// `except Exception` does not catch) and a backtrace on stderr.
pub(crate) fn guard<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| {
        let what = LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "a panic".into());
        Err(PyRuntimeError::new_err(format!(
            "internal error in torchtpu (please report it): {what}"
        )))
    })
}

#[pymodule]
fn _torchtpu(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Panics are reported by `guard` as Python errors; the default hook would also print them.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{at}")));
    }));
    m.add_function(wrap_pyfunction!(ops::flash_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(ops::flash_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(ops::matmul, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::flash_attention_tpu_modules, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::matmul_tpu_module, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::compile_for_tpu, m)?)?;
    m.add_function(wrap_pyfunction!(generic::op_names, m)?)?;
    m.add_function(wrap_pyfunction!(generic::op_signature, m)?)?;
    m.add_function(wrap_pyfunction!(generic::op_run, m)?)?;
    m.add_function(wrap_pyfunction!(generic::op_tpu_module, m)?)?;
    Ok(())
}
