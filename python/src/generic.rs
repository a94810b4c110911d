//! Any registered op (`torchtpu_kernels::registry`) from Python, by name, its problem given as
//! JSON: its signature (for fake tensors and the TPU bridge), its CPU run through PJRT, and
//! the module a TPU runs. The Python layer (`torchtpu.library`) builds PyTorch ops on these.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use torchtpu_dsl::ir::ValueType;
use torchtpu_kernels::registry;

use crate::ops::{kernel_error, prepared, run};
use crate::tensor::Tensor;

fn find(name: &str) -> PyResult<&'static dyn registry::AnyOp> {
    registry::find(name).map_err(kernel_error)
}

fn problem(name: &str, json: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(json)
        .map_err(|e| PyValueError::new_err(format!("{name}: the problem is not JSON: {e}")))
}

type Types = Vec<(Vec<usize>, String)>;

fn described(types: Vec<ValueType>) -> Types {
    types
        .into_iter()
        .map(|t| (t.shape, t.dtype.to_string()))
        .collect()
}

/// The names of the registered ops.
#[pyfunction]
pub fn op_names() -> Vec<&'static str> {
    registry::ops().iter().map(|o| o.name()).collect()
}

/// The (shape, dtype) of each operand and each output of op `name` on `problem_json`.
#[pyfunction]
pub fn op_signature(name: &str, problem_json: &str) -> PyResult<(Types, Types)> {
    crate::guard(|| {
        let op = find(name)?;
        let (inputs, outputs) =
            registry::signature(op, &problem(name, problem_json)?).map_err(kernel_error)?;
        Ok((described(inputs), described(outputs)))
    })
}

/// Runs op `name` on `problem_json` over `operands` (contiguous CPU tensors, each checked
/// against the op's operand types): DLPack capsules of its outputs.
#[pyfunction]
pub fn op_run(
    py: Python<'_>,
    name: &str,
    problem_json: &str,
    operands: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<Py<PyAny>>> {
    crate::guard(|| {
        let op = find(name)?;
        let value = problem(name, problem_json)?;
        // The key is the problem as the op reads it, whatever the JSON's spelling.
        let (_, types) = op.call(&value, None, None).map_err(kernel_error)?;
        let tensors = operands
            .iter()
            .enumerate()
            .map(|(i, t)| Tensor::from_py(&format!("{name} operand {i}"), t))
            .collect::<PyResult<Vec<_>>>()?;
        if tensors.len() != types.len() {
            return Err(PyValueError::new_err(format!(
                "{name} takes {} operands; got {}",
                types.len(),
                tensors.len()
            )));
        }
        for (i, (t, want)) in tensors.iter().zip(&types).enumerate() {
            t.expect(&format!("{name} operand {i}"), &want.shape, want.dtype)?;
        }
        let key = format!("op/{name}/{value}");
        let c = prepared(
            py,
            key,
            |backend| {
                op.call(&value, None, torchtpu_kernels::tables::target_of(backend))
                    .map(|(call, _)| call)
            },
            || types.clone(),
        )?;
        // SAFETY: every operand checked against the op's types above; the Python caller holds
        // the tensors for the duration of the call.
        unsafe {
            let bytes: Vec<&[u8]> = tensors.iter().map(|t| t.bytes()).collect();
            run(py, &c, &bytes)
        }
    })
}

/// The StableHLO module (Mosaic in a `tpu_custom_call`) op `name` runs on `chip` for
/// `problem_json`, with that chip's tuned config.
#[pyfunction]
pub fn op_tpu_module(name: &str, problem_json: &str, chip_name: &str) -> PyResult<String> {
    crate::guard(|| {
        let op = find(name)?;
        let chip = crate::tpu::chip(chip_name)?;
        op.tpu_module(&problem(name, problem_json)?, chip)
            .map_err(kernel_error)
    })
}
