//! Ops from Python by name, their problem given as JSON: their signature (for fake tensors and
//! the TPU bridge), their CPU run through PJRT, and the module a TPU runs. [`add_ops`] gives an
//! extension module these functions over its list of ops; `torchtpu.library.RustOp` calls
//! them.

use std::borrow::Cow;
use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::ir::ValueType;
use torchtpu_kernels::registry::{self, AnyOp};

use crate::tensor::Tensor;
use crate::{guard, kernel_error, prepared, run};

/// The ops this extension module serves (each extension has its own copy of this crate).
static OPS: OnceLock<&'static [&'static dyn AnyOp]> = OnceLock::new();

/// Adds `op_names`, `op_signature`, `op_run`, `op_config`, `op_tpu_module` and `op_example` over `ops` to
/// module `m`.
pub fn add_ops(m: &Bound<'_, PyModule>, ops: &'static [&'static dyn AnyOp]) -> PyResult<()> {
    if OPS.set(ops).is_err() && OPS.get().is_some_and(|known| !std::ptr::eq(*known, ops)) {
        return Err(PyRuntimeError::new_err("an extension module serves one list of ops"));
    }
    m.add_function(wrap_pyfunction!(op_names, m)?)?;
    m.add_function(wrap_pyfunction!(op_signature, m)?)?;
    m.add_function(wrap_pyfunction!(op_run, m)?)?;
    m.add_function(wrap_pyfunction!(op_tpu_module, m)?)?;
    m.add_function(wrap_pyfunction!(op_config, m)?)?;
    m.add_function(wrap_pyfunction!(op_example, m)?)?;
    Ok(())
}

fn ops() -> &'static [&'static dyn AnyOp] {
    OPS.get().copied().unwrap_or(&[])
}

fn find(name: &str) -> PyResult<&'static dyn AnyOp> {
    registry::find_in(ops(), name).map_err(kernel_error)
}

fn problem(name: &str, json: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(json).map_err(|e| PyValueError::new_err(format!("{name}: the problem is not JSON: {e}")))
}

type Types = Vec<(Vec<usize>, String)>;

fn described(types: Vec<ValueType>) -> Types {
    types.into_iter().map(|t| (t.shape, t.dtype.to_string())).collect()
}

/// The names of the ops this module serves.
#[pyfunction]
pub fn op_names() -> Vec<&'static str> {
    ops().iter().map(|o| o.name()).collect()
}

/// The (shape, dtype) of each operand and each output of op `name` on `problem_json`.
#[pyfunction]
pub fn op_signature(name: &str, problem_json: &str) -> PyResult<(Types, Types)> {
    guard(|| {
        let op = find(name)?;
        let (inputs, outputs) = op.signature(&problem(name, problem_json)?).map_err(kernel_error)?;
        Ok((described(inputs), described(outputs)))
    })
}

/// Runs op `name` on `problem_json` over `operands` (contiguous CPU tensors, each checked
/// against the op's operand types): DLPack capsules of its outputs.
#[pyfunction]
pub fn op_run(py: Python<'_>, name: &str, problem_json: &str, operands: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<Py<PyAny>>> {
    guard(|| {
        let op = find(name)?;
        let value = problem(name, problem_json)?;
        let (types, _) = op.signature(&value).map_err(kernel_error)?;
        let tensors = operands.iter().enumerate().map(|(i, t)| Tensor::from_py(&format!("{name} operand {i}"), t)).collect::<PyResult<Vec<_>>>()?;
        if tensors.len() != types.len() {
            return Err(PyValueError::new_err(format!("{name} takes {} operands; got {}", types.len(), tensors.len())));
        }
        for (i, (t, want)) in tensors.iter().zip(&types).enumerate() {
            t.expect(&format!("{name} operand {i}"), &want.shape, want.dtype)?;
        }
        // The scalar-prefetch tables steer the kernel's copies: checked before any run.
        let n_tables = op.table_count(&value).map_err(kernel_error)?;
        if n_tables > 0 {
            // SAFETY: as for the kernel run below.
            let tables = unsafe { tensors.iter().zip(&types).take(n_tables).map(|(t, ty)| torchtpu_exec::from_bytes(t.bytes(), ty)).collect::<Result<Vec<_>, _>>() };
            op.check_tables(&value, &tables.map_err(crate::exec_error)?).map_err(kernel_error)?;
        }
        // An empty problem runs no kernel: its outputs come from the host, from its inputs.
        if op.is_empty(&value).map_err(kernel_error)? {
            // SAFETY: as for the kernel run below.
            let inputs = unsafe { tensors.iter().zip(&types).map(|(t, ty)| torchtpu_exec::from_bytes(t.bytes(), ty)).collect::<Result<Vec<_>, _>>() };
            let outputs = op.empty_outputs(&value, &inputs.map_err(crate::exec_error)?).map_err(kernel_error)?;
            return crate::capsules(py, outputs.iter().map(|a| torchtpu_exec::HostOutput::owned(a.value_type(), torchtpu_exec::to_bytes(a))).collect());
        }
        // The key is the problem as serde_json prints it: one spelling per problem.
        let c = prepared(py, format!("op/{name}/{value}"), |backend| op.call(&value, None, torchtpu_kernels::tables::target_of(backend)).map(|(call, _)| call), || types.clone())?;
        // SAFETY: every operand checked against the op's types above; the Python caller holds
        // the tensors for the duration of the call.
        unsafe {
            let bytes: Vec<&[u8]> = tensors.iter().map(|t| t.bytes()).collect();
            run(py, &c, &bytes)
        }
    })
}

/// The StableHLO module (Mosaic in a `tpu_custom_call`) op `name` runs on `chip_name` for
/// `problem_json`, with that chip's tuned config: its text, and the same module as a portable
/// artifact (`bytes`).
#[pyfunction]
pub fn op_tpu_module(name: &str, problem_json: &str, chip_name: &str) -> PyResult<(String, Cow<'static, [u8]>)> {
    guard(|| {
        let op = find(name)?;
        let chip = crate::chip(chip_name)?;
        let module = op.tpu_module(&problem(name, problem_json)?, chip).map_err(kernel_error)?;
        Ok((module.text, Cow::Owned(module.artifact)))
    })
}

/// Op `name`'s example problem (as JSON): the one `torchtpu list` shows.
#[pyfunction]
pub fn op_example(name: &str) -> PyResult<String> {
    guard(|| Ok(find(name)?.example().to_string()))
}

/// The config (as JSON) op `name` runs `problem_json` with on this machine's CPU: a result
/// `torchtpu tune` cached for it, else its table entry, else the heuristic.
#[pyfunction]
pub fn op_config(name: &str, problem_json: &str) -> PyResult<String> {
    guard(|| {
        let op = find(name)?;
        let target = torchtpu_kernels::tables::target_of(crate::backend()?);
        let config = op.config(&problem(name, problem_json)?, target).map_err(kernel_error)?;
        Ok(config.to_string())
    })
}
