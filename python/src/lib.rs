//! The native half of the `torchtpu` Python package: the registered ops
//! (`torchtpu_kernels::registry`) served through `torchtpu_pyo3` (their signatures, CPU runs
//! through PJRT and TPU modules, which `torchtpu.library.RustOp` calls), and libtpu compiles.

use pyo3::prelude::*;

mod tpu;

#[pymodule]
fn _torchtpu(m: &Bound<'_, PyModule>) -> PyResult<()> {
    torchtpu_pyo3::install_panic_hook();
    torchtpu_pyo3::ops::add_ops(m, torchtpu_kernels::registry::ops())?;
    m.add_function(wrap_pyfunction!(tpu::compile_for_tpu, m)?)?;
    m.add_function(wrap_pyfunction!(tpu::chips, m)?)?;
    Ok(())
}
