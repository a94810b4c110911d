//! What a TPU runs for each op: the StableHLO module with our Mosaic kernel in a
//! `tpu_custom_call`, lowered with the chip's tuned block, and a libtpu compile of it.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::DType;
use torchtpu_kernels::flash::{self, AttentionOptions, AttentionShape};
use torchtpu_kernels::matmul::{self, MatmulOptions, MatmulShape};
use torchtpu_runtime::{Chip, TpuCompiler};

pub(crate) fn chip(name: &str) -> PyResult<Chip> {
    name.parse()
        .map_err(|e: torchtpu_runtime::Error| PyValueError::new_err(e.to_string()))
}

fn dtype(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        other => Err(PyValueError::new_err(format!(
            "TPU kernels take float32 or bfloat16, not {other}"
        ))),
    }
}

fn lowering_error(e: torchtpu_kernels::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The forward, dK/dV and dQ modules of attention at these shapes for `chip`.
#[pyfunction]
#[pyo3(signature = (batch, heads, kv_heads, q_len, kv_len, head_dim, dtype_name, causal, sm_scale, use_segments, chip_name))]
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_tpu_modules(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    dtype_name: &str,
    causal: bool,
    sm_scale: f64,
    use_segments: bool,
    chip_name: &str,
) -> PyResult<(String, String, String)> {
    crate::guard(|| {
        let shape = AttentionShape {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
        };
        let opts = AttentionOptions {
            causal,
            sm_scale: Some(sm_scale as f32),
            block: None,
        };
        let (dtype, chip) = (dtype(dtype_name)?, chip(chip_name)?);
        let forward = flash::forward_tpu_module(shape, dtype, opts, use_segments, chip)
            .map_err(lowering_error)?;
        let (dkv, dq) = flash::backward_tpu_modules(shape, dtype, opts, use_segments, chip)
            .map_err(lowering_error)?;
        Ok((forward, dkv, dq))
    })
}

/// The matmul module at these shapes for `chip`.
#[pyfunction]
#[pyo3(signature = (batch, m, n, k, dtype_name, transpose_b, chip_name))]
pub fn matmul_tpu_module(
    batch: Option<usize>,
    m: usize,
    n: usize,
    k: usize,
    dtype_name: &str,
    transpose_b: bool,
    chip_name: &str,
) -> PyResult<String> {
    crate::guard(|| {
        let shape = MatmulShape { batch, m, n, k };
        matmul::tpu_module(
            shape,
            dtype(dtype_name)?,
            MatmulOptions {
                transpose_b,
                block: None,
            },
            chip(chip_name)?,
        )
        .map_err(lowering_error)
    })
}

/// Compiles `module` with libtpu for `chip` (no TPU needed); returns the code size in bytes.
#[pyfunction]
pub fn compile_for_tpu(py: Python<'_>, module: &str, chip_name: &str) -> PyResult<i64> {
    crate::guard(|| {
        let chip = chip(chip_name)?;
        py.detach(|| {
            let compiler = TpuCompiler::shared().map_err(|e| e.to_string())?;
            compiler
                .compile(chip, module)
                .map(|c| c.code_size_bytes)
                .map_err(|e| e.to_string())
        })
        .map_err(PyRuntimeError::new_err)
    })
}
