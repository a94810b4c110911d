//! The ops' CPU implementations: flash attention forward and backward, matmul. The Python
//! side has checked the arguments for good messages; these checks are what keeps the raw
//! memory access sound, so they are repeated here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::DType;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::PallasCall;
use torchtpu_exec::{Backend, Prepared};
use torchtpu_kernels::flash::{self, AttentionOptions, AttentionShape, FlashPass, LANES, SUBLANES};
use torchtpu_kernels::matmul::{self as matmul_kernel, MatmulOptions, MatmulShape};

use crate::tensor::Tensor;

/// The CPU backend the ops run on: PJRT CPU, which runs our kernels several times faster than
/// the interpreter; the interpreter in a child forked after PJRT started (PJRT does not
/// survive fork).
fn backend() -> PyResult<Backend> {
    match torchtpu_exec::client(Backend::Cpu) {
        Ok(_) => Ok(Backend::Cpu),
        Err(torchtpu_exec::Error::Forked { .. }) => Ok(Backend::Interpret),
        Err(e) => Err(PyRuntimeError::new_err(format!("{e} (scripts/setup.sh installs the PJRT CPU plugin)"))),
    }
}

fn kernel_error(e: torchtpu_kernels::Error) -> PyErr {
    use torchtpu_kernels::Error;
    match e {
        Error::Shape(_) => PyValueError::new_err(e.to_string()),
        Error::Dtype(_) => PyTypeError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// Kernels ready to run, by what they were made for, per process (a forked child prepares
/// its own).
fn prepared(key: String, make: impl FnOnce(Backend) -> Result<PallasCall, torchtpu_kernels::Error>, types: impl FnOnce() -> Vec<ValueType>) -> PyResult<Arc<Prepared>> {
    static CACHE: Mutex<Option<(u32, HashMap<String, Arc<Prepared>>)>> = Mutex::new(None);
    let pid = std::process::id();
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if cache.as_ref().is_some_and(|(p, _)| *p != pid) {
            // The parent's executables belong to a client that lost its threads in the fork.
            std::mem::forget(cache.take());
        }
        if let Some(c) = cache.as_ref().and_then(|(_, m)| m.get(&key)) {
            return Ok(c.clone());
        }
    }
    let backend = backend()?;
    let traced = make(backend).map_err(kernel_error)?.trace(&types()).map_err(|e| kernel_error(e.into()))?;
    let c = Arc::new(Prepared::new(&traced, backend).map_err(|e| kernel_error(e.into()))?);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache.get_or_insert_with(|| (pid, HashMap::new())).1.insert(key, c.clone());
    Ok(c)
}

/// Fails if any output's memory overlaps an input's or another output's: the kernels read
/// inputs while writing outputs.
fn check_disjoint(inputs: &[&Tensor], outputs: &[&Tensor]) -> PyResult<()> {
    let range = |t: &Tensor| (t.addr(), t.addr() + t.nbytes());
    for (i, o) in outputs.iter().enumerate() {
        let (a, b) = range(o);
        let others = inputs.iter().chain(outputs.iter().take(i));
        if others.map(|t| range(t)).any(|(c, d)| a < d && c < b) {
            return Err(PyValueError::new_err("an output tensor shares memory with another argument"));
        }
    }
    Ok(())
}

/// Runs `c` with the GIL released.
fn run(py: Python<'_>, c: &Prepared, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> PyResult<()> {
    py.detach(|| c.run_in_place(inputs, outputs)).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

struct Attention {
    shape: AttentionShape,
    dtype: DType,
    opts: AttentionOptions,
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, sm_scale: f64) -> PyResult<Attention> {
    let (&[b, h, sq, d], &[kb, hk, sk, kd]) = (q.shape.as_slice(), k.shape.as_slice()) else {
        return Err(PyValueError::new_err(format!("q and k must be [batch, heads, seq, head_dim]; got {:?} and {:?}", q.shape, k.shape)));
    };
    if kb != b || kd != d || v.shape != k.shape {
        return Err(PyValueError::new_err(format!("k and v must be [{b}, kv_heads, kv_seq, {d}] alike; got {:?} and {:?}", k.shape, v.shape)));
    }
    if k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(PyTypeError::new_err(format!("q, k and v must share a dtype; got {}, {} and {}", q.dtype, k.dtype, v.dtype)));
    }
    let shape = AttentionShape { batch: b, heads: h, kv_heads: hk, q_len: sq, kv_len: sk, head_dim: d };
    Ok(Attention { shape, dtype: q.dtype, opts: AttentionOptions { causal, sm_scale: Some(sm_scale as f32), block: None } })
}

impl Attention {
    fn key(&self, pass: FlashPass, segments: bool) -> String {
        format!("{pass:?}/{:?}/{}/{}/{:x}/{segments}", self.shape, self.dtype, self.opts.causal, self.opts.sm_scale.unwrap_or(0.0).to_bits())
    }

    /// Segment ids laid out as the kernels take them (zeros when there are none).
    fn segment_operands(&self, q_segments: Option<&Tensor>, kv_segments: Option<&Tensor>) -> PyResult<(Vec<i32>, Vec<i32>)> {
        let AttentionShape { batch: b, q_len: sq, kv_len: sk, .. } = self.shape;
        let mut q_rep = vec![0i32; b * sq * LANES];
        let mut kv_rep = vec![0i32; b * SUBLANES * sk];
        if let (Some(qs), Some(ks)) = (q_segments, kv_segments) {
            qs.expect("segment_ids", &[b, sq], DType::I32)?;
            ks.expect("kv_segment_ids", &[b, sk], DType::I32)?;
            // SAFETY: checked i32 of the right sizes; the caller keeps the tensors alive.
            let (qs, ks) = unsafe { (qs.i32s(), ks.i32s()) };
            for (row, &id) in q_rep.chunks_exact_mut(LANES).zip(qs) {
                row.fill(id);
            }
            for (bi, rows) in kv_rep.chunks_exact_mut(SUBLANES * sk).enumerate() {
                for row in rows.chunks_exact_mut(sk) {
                    row.copy_from_slice(&ks[bi * sk..(bi + 1) * sk]);
                }
            }
        }
        Ok((q_rep, kv_rep))
    }
}

fn i32_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: i32 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Attention forward into `out` (like q) and `lse` (f32 `[b, h, sq]`).
#[pyfunction]
#[pyo3(signature = (q, k, v, q_segments, kv_segments, out, lse, causal, sm_scale))]
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    q_segments: Option<&Bound<'_, PyAny>>,
    kv_segments: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    causal: bool,
    sm_scale: f64,
) -> PyResult<()> {
    let (q, k, v) = (Tensor::from_py("q", q)?, Tensor::from_py("k", k)?, Tensor::from_py("v", v)?);
    let (out, lse) = (Tensor::from_py("out", out)?, Tensor::from_py("lse", lse)?);
    let segs = segment_tensors(q_segments, kv_segments)?;
    let a = attention(&q, &k, &v, causal, sm_scale)?;
    let s = a.shape;
    out.expect("out", &q.shape, a.dtype)?;
    lse.expect("lse", &[s.batch, s.heads, s.q_len], DType::F32)?;
    check_disjoint(&[&q, &k, &v], &[&out, &lse])?;
    let (qs, ks) = a.segment_operands(segs.as_ref().map(|s| &s.0), segs.as_ref().map(|s| &s.1))?;
    let use_segments = segs.is_some();
    let c = prepared(
        a.key(FlashPass::Forward, use_segments),
        |backend| flash::forward_call(s, a.dtype, flash::with_tuned_block(s, a.dtype, a.opts, backend), use_segments),
        || flash::forward_operand_types(s, a.dtype),
    )?;
    // SAFETY: shapes and dtypes checked above, outputs disjoint from inputs; the Python
    // caller holds every tensor for the duration of the call.
    unsafe { run(py, &c, &[q.bytes(), k.bytes(), v.bytes(), i32_bytes(&qs), i32_bytes(&ks)], &mut [out.bytes_mut(), lse.bytes_mut()]) }
}

fn segment_tensors(q_segments: Option<&Bound<'_, PyAny>>, kv_segments: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(Tensor, Tensor)>> {
    match (q_segments, kv_segments) {
        (Some(q), Some(k)) => Ok(Some((Tensor::from_py("segment_ids", q)?, Tensor::from_py("kv_segment_ids", k)?))),
        (None, None) => Ok(None),
        _ => Err(PyValueError::new_err("segment ids come in pairs: give both q's and kv's, or neither")),
    }
}

/// Attention gradients into `dq`, `dk`, `dv` from the forward's output, log-sum-exp and the
/// output's gradient.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, grad_out, lse, q_segments, kv_segments, dq, dk, dv, causal, sm_scale))]
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    q_segments: Option<&Bound<'_, PyAny>>,
    kv_segments: Option<&Bound<'_, PyAny>>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    causal: bool,
    sm_scale: f64,
) -> PyResult<()> {
    let (q, k, v) = (Tensor::from_py("q", q)?, Tensor::from_py("k", k)?, Tensor::from_py("v", v)?);
    let (o, d_o, lse) = (Tensor::from_py("out", out)?, Tensor::from_py("grad_out", grad_out)?, Tensor::from_py("lse", lse)?);
    let (dq, dk, dv) = (Tensor::from_py("dq", dq)?, Tensor::from_py("dk", dk)?, Tensor::from_py("dv", dv)?);
    let segs = segment_tensors(q_segments, kv_segments)?;
    let a = attention(&q, &k, &v, causal, sm_scale)?;
    let s = a.shape;
    o.expect("out", &q.shape, a.dtype)?;
    d_o.expect("grad_out", &q.shape, a.dtype)?;
    lse.expect("lse", &[s.batch, s.heads, s.q_len], DType::F32)?;
    dq.expect("dq", &q.shape, a.dtype)?;
    dk.expect("dk", &k.shape, a.dtype)?;
    dv.expect("dv", &v.shape, a.dtype)?;
    check_disjoint(&[&q, &k, &v, &o, &d_o, &lse], &[&dq, &dk, &dv])?;
    let (qs, ks) = a.segment_operands(segs.as_ref().map(|s| &s.0), segs.as_ref().map(|s| &s.1))?;
    let use_segments = segs.is_some();
    let backward = |pass: FlashPass| {
        prepared(
            a.key(pass, use_segments),
            |backend| {
                let (dkv, dq) = flash::with_tuned_backward_blocks(s, a.dtype, a.opts, backend);
                flash::backward_call(pass, s, a.dtype, if pass == FlashPass::BackwardDkv { dkv } else { dq }, use_segments)
            },
            || flash::backward_operand_types(s, a.dtype),
        )
    };
    let (dkv, dqc) = (backward(FlashPass::BackwardDkv)?, backward(FlashPass::BackwardDq)?);
    // SAFETY: as in the forward.
    unsafe {
        let inputs = [q.bytes(), k.bytes(), v.bytes(), o.bytes(), d_o.bytes(), lse.bytes(), i32_bytes(&qs), i32_bytes(&ks)];
        run(py, &dkv, &inputs, &mut [dk.bytes_mut(), dv.bytes_mut()])?;
        run(py, &dqc, &inputs, &mut [dq.bytes_mut()])
    }
}

/// `out = a·b` (or `a·bᵀ`), 2-D or batched 3-D.
#[pyfunction]
#[pyo3(signature = (a, b, out, transpose_b=false))]
pub fn matmul(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, transpose_b: bool) -> PyResult<()> {
    let (a, b, out) = (Tensor::from_py("a", a)?, Tensor::from_py("b", b)?, Tensor::from_py("out", out)?);
    if a.dtype != b.dtype {
        return Err(PyTypeError::new_err(format!("a and b must share a dtype; got {} and {}", a.dtype, b.dtype)));
    }
    let (batch, m, ka) = match a.shape.as_slice() {
        &[m, k] => (None, m, k),
        &[x, m, k] => (Some(x), m, k),
        other => return Err(PyValueError::new_err(format!("a must be [m, k] or [batch, m, k]; got {other:?}"))),
    };
    let b_rows = if transpose_b { "[n, k]" } else { "[k, n]" };
    let (n, kb) = match (batch, b.shape.as_slice()) {
        (None, &[r, c]) => if transpose_b { (r, c) } else { (c, r) },
        (Some(x), &[y, r, c]) if x == y => if transpose_b { (r, c) } else { (c, r) },
        _ => return Err(PyValueError::new_err(format!("b must be {b_rows} (with a's batch in front if a has one) for a {:?}; got {:?}", a.shape, b.shape))),
    };
    if ka != kb {
        return Err(PyValueError::new_err(format!("a has k = {ka}, b has k = {kb}")));
    }
    let shape = MatmulShape { batch, m, n, k: ka };
    let out_shape: Vec<usize> = batch.into_iter().chain([m, n]).collect();
    out.expect("out", &out_shape, a.dtype)?;
    check_disjoint(&[&a, &b], &[&out])?;
    let opts = MatmulOptions { transpose_b, block: None };
    let (a_type, b_type) = (ValueType::new(a.dtype, a.shape.clone()), ValueType::new(b.dtype, b.shape.clone()));
    let c = prepared(
        format!("matmul/{shape:?}/{}/{transpose_b}", a.dtype),
        |backend| matmul_kernel::call(shape, a.dtype, matmul_kernel::with_tuned_block(shape, a.dtype, opts, backend)),
        || vec![a_type, b_type],
    )?;
    // SAFETY: as in the attention forward.
    unsafe { run(py, &c, &[a.bytes(), b.bytes()], &mut [out.bytes_mut()]) }
}
