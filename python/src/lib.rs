//! The native half of the `torchtpu` Python package: PyTorch CPU tensors cross as raw memory
//! (pointer, shape, dtype; no libtorch), our kernels run on the PJRT CPU plugin with the GIL
//! released, reading the inputs where they lie, and the outputs go back as DLPack capsules
//! over the memory the plugin wrote them in: no copy either way. Also the lowered TPU modules, for TorchTPU's kernel bridge.

use pyo3::prelude::*;

mod dlpack;
mod ops;
mod tensor;
mod tpu;

#[pymodule]
fn _torchtpu(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ops::flash_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(ops::flash_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(ops::matmul, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::flash_attention_tpu_modules, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::matmul_tpu_module, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::compile_for_tpu, m)?)?;
    Ok(())
}
