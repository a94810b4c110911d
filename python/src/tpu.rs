//! The chips, and a libtpu compile of a TPU module (what `torchtpu.tpu.compile` calls): no
//! TPU needed.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use torchtpu_pyo3::{chip, guard};
use torchtpu_runtime::{Chip, TpuCompiler};

/// The names of the TPU generations torchtpu compiles for (`torchtpu.tpu.CHIPS`).
#[pyfunction]
pub fn chips() -> Vec<&'static str> {
    Chip::ALL.iter().map(|c| c.name()).collect()
}

/// A TPU module as Python holds it: StableHLO text (`str`) or a portable artifact (`bytes`).
#[derive(FromPyObject)]
pub enum Module {
    Text(String),
    Artifact(Vec<u8>),
}

impl AsRef<[u8]> for Module {
    fn as_ref(&self) -> &[u8] {
        match self {
            Module::Text(text) => text.as_bytes(),
            Module::Artifact(bytes) => bytes,
        }
    }
}

/// Compiles `module` (text or artifact) with libtpu for `chip` (no TPU needed); returns the
/// code size in bytes.
#[pyfunction]
pub fn compile_for_tpu(py: Python<'_>, module: Module, chip_name: &str) -> PyResult<i64> {
    guard(|| {
        let chip = chip(chip_name)?;
        py.detach(|| {
            let compiler = TpuCompiler::shared().map_err(|e| e.to_string())?;
            compiler.compile(chip, &module).map(|c| c.code_size_bytes).map_err(|e| e.to_string())
        })
        .map_err(PyRuntimeError::new_err)
    })
}
