//! The ops' CPU implementations: flash attention forward and backward, matmul. The Python
//! side has checked the arguments for good messages; these checks are what keeps the raw
//! memory access sound, so they are repeated here.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use ndarray::{Array3, ArrayView2};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::DType;
use torchtpu_dsl::PallasCall;
use torchtpu_exec::{Backend, HostOutput, Prepared};
use torchtpu_kernels::flash::{self, AttentionOptions, AttentionShape, FlashPass};
use torchtpu_kernels::matmul::{self as matmul_kernel, MatmulOptions, MatmulShape};

use crate::tensor::Tensor;

/// The CPU backend the ops run on: PJRT CPU, which runs our kernels several times faster than
/// the interpreter; the interpreter in a child forked after PJRT started (PJRT does not
/// survive fork).
fn backend() -> PyResult<Backend> {
    match torchtpu_exec::client(Backend::Cpu) {
        Ok(_) => Ok(Backend::Cpu),
        Err(torchtpu_exec::Error::Forked { .. }) => Ok(Backend::Interpret),
        Err(e) => Err(PyRuntimeError::new_err(format!(
            "{e} (scripts/setup.sh installs the PJRT CPU plugin)"
        ))),
    }
}

pub(crate) fn kernel_error(e: torchtpu_kernels::Error) -> PyErr {
    use torchtpu_kernels::Error;
    match e {
        Error::Shape(_) | Error::Config(_) => PyValueError::new_err(e.to_string()),
        Error::Dtype(_) => PyTypeError::new_err(e.to_string()),
        Error::Memory(_)
        | Error::Exec(torchtpu_exec::Error::Memory(_))
        | Error::Trace(torchtpu_dsl::Error::TooLarge { .. }) => {
            PyMemoryError::new_err(e.to_string())
        }
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn exec_error(e: torchtpu_exec::Error) -> PyErr {
    kernel_error(torchtpu_kernels::Error::Exec(e))
}

/// Kernels ready to run, by the backend and what they were made for. Compiling happens with
/// the GIL released. (A child forked after PJRT started runs on the interpreter: its keys
/// differ, so it never touches the parent's PJRT executables.)
pub(crate) fn prepared(
    py: Python<'_>,
    key: String,
    make: impl FnOnce(Backend) -> Result<PallasCall, torchtpu_kernels::Error> + Send,
    types: impl FnOnce() -> Vec<ValueType> + Send,
) -> PyResult<Arc<Prepared>> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Prepared>>>> = LazyLock::new(Default::default);
    let backend = backend()?;
    let key = format!("{backend}/{key}");
    if let Some(c) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let c = py.detach(|| {
        let traced = make(backend)?.trace(&types())?;
        Ok(Arc::new(Prepared::new(&traced, backend)?))
    });
    let c = c.map_err(kernel_error)?;
    CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, c.clone());
    Ok(c)
}

/// Runs `c` with the GIL released; the outputs come back as DLPack capsules over the memory
/// the backend wrote them in.
pub(crate) fn run(py: Python<'_>, c: &Prepared, inputs: &[&[u8]]) -> PyResult<Vec<Py<PyAny>>> {
    let outputs = py.detach(|| c.run_to_host(inputs)).map_err(exec_error)?;
    capsules(py, outputs)
}

fn capsules(py: Python<'_>, outputs: Vec<HostOutput>) -> PyResult<Vec<Py<PyAny>>> {
    outputs
        .into_iter()
        .map(|o| crate::dlpack::capsule(py, o))
        .collect()
}

/// An output of zeros, for problems where no kernel runs.
fn zeros(dtype: DType, shape: &[usize]) -> PyResult<HostOutput> {
    let t = ValueType::new(dtype, shape.to_vec());
    torchtpu_dsl::memory::check_types_fit([&t], 1, "the output").map_err(PyMemoryError::new_err)?;
    Ok(HostOutput::owned(t.clone(), vec![0; t.size_bytes()]))
}

fn float_dtype(name: &str, dtype: DType) -> PyResult<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(PyTypeError::new_err(format!(
            "{name} is {other}; the kernels take float32 or bfloat16"
        ))),
    }
}

struct Attention {
    shape: AttentionShape,
    dtype: DType,
    opts: AttentionOptions,
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    sm_scale: f64,
) -> PyResult<Attention> {
    let (&[b, h, sq, d], &[kb, hk, sk, kd]) = (q.shape.as_slice(), k.shape.as_slice()) else {
        return Err(PyValueError::new_err(format!(
            "q and k must be [batch, heads, seq, head_dim]; got {:?} and {:?}",
            q.shape, k.shape
        )));
    };
    if kb != b || kd != d || v.shape != k.shape {
        return Err(PyValueError::new_err(format!(
            "k and v must be [{b}, kv_heads, kv_seq, {d}] alike; got {:?} and {:?}",
            k.shape, v.shape
        )));
    }
    if k.dtype != q.dtype || v.dtype != q.dtype {
        return Err(PyTypeError::new_err(format!(
            "q, k and v must share a dtype; got {}, {} and {}",
            q.dtype, k.dtype, v.dtype
        )));
    }
    float_dtype("q", q.dtype)?;
    let shape = AttentionShape {
        batch: b,
        heads: h,
        kv_heads: hk,
        q_len: sq,
        kv_len: sk,
        head_dim: d,
    };
    shape.check().map_err(kernel_error)?;
    Ok(Attention {
        shape,
        dtype: q.dtype,
        opts: AttentionOptions {
            causal,
            sm_scale: Some(sm_scale as f32),
            block: None,
        },
    })
}

impl Attention {
    fn key(&self, pass: FlashPass, segments: bool) -> String {
        format!(
            "{pass:?}/{:?}/{}/{}/{:x}/{segments}",
            self.shape,
            self.dtype,
            self.opts.causal,
            self.opts.sm_scale.unwrap_or(0.0).to_bits()
        )
    }

    /// The segment ids as `[b, sq]` and `[b, sk]` views, checked.
    fn segment_views<'t>(
        &self,
        segments: Option<&'t (Tensor, Tensor)>,
    ) -> PyResult<Option<(ArrayView2<'t, i32>, ArrayView2<'t, i32>)>> {
        let AttentionShape {
            batch: b,
            q_len: sq,
            kv_len: sk,
            ..
        } = self.shape;
        let Some((qs, ks)) = segments else {
            return Ok(None);
        };
        qs.expect("segment_ids", &[b, sq], DType::I32)?;
        ks.expect("kv_segment_ids", &[b, sk], DType::I32)?;
        // SAFETY: checked i32 of the right sizes; the caller keeps the tensors alive.
        let (qs, ks) = unsafe { (qs.i32s(), ks.i32s()) };
        let view = |ids, rows, cols| {
            ArrayView2::from_shape((rows, cols), ids)
                .map_err(|e| PyValueError::new_err(e.to_string()))
        };
        Ok(Some((view(qs, b, sq)?, view(ks, b, sk)?)))
    }

    /// Segment ids laid out as the kernels take them (placeholders when there are none).
    fn segment_operands(
        &self,
        segments: Option<&(Tensor, Tensor)>,
    ) -> PyResult<(Array3<i32>, Array3<i32>)> {
        flash::segment_layout(self.shape, self.segment_views(segments)?).map_err(kernel_error)
    }
}

/// A freshly laid-out (standard-order) i32 array's bytes.
fn i32_bytes(a: &Array3<i32>) -> &[u8] {
    let v = a
        .as_slice()
        .expect("arrays built by segment_layout are in standard order");
    // SAFETY: i32 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Attention forward: DLPack capsules of the output (like q) and the log-sum-exp (f32
/// `[b, h, sq, 1]`).
#[pyfunction]
#[pyo3(signature = (q, k, v, q_segments, kv_segments, causal, sm_scale))]
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    q_segments: Option<&Bound<'_, PyAny>>,
    kv_segments: Option<&Bound<'_, PyAny>>,
    causal: bool,
    sm_scale: f64,
) -> PyResult<Vec<Py<PyAny>>> {
    crate::guard(|| {
        let (q, k, v, segs, a) =
            read_attention(q, k, v, q_segments, kv_segments, causal, sm_scale)?;
        let s = a.shape;
        if s.is_empty() {
            let views = a.segment_views(segs.as_ref())?;
            let lse = flash::empty_lse(s, causal, views);
            let lse = HostOutput::owned(
                ValueType::new(DType::F32, [s.batch, s.heads, s.q_len, 1]),
                lse.iter().flat_map(|x| x.to_le_bytes()).collect(),
            );
            return capsules(py, vec![zeros(a.dtype, &q.shape)?, lse]);
        }
        let (qs, ks) = a.segment_operands(segs.as_ref())?;
        let use_segments = segs.is_some();
        let c = prepared(
            py,
            a.key(FlashPass::Forward, use_segments),
            |backend| {
                flash::forward_call(
                    s,
                    a.dtype,
                    flash::with_tuned_block(s, a.dtype, a.opts, backend),
                    use_segments,
                )
            },
            || flash::forward_operand_types(s, a.dtype, use_segments),
        )?;
        // SAFETY: shapes and dtypes checked above; the Python caller holds every tensor for the
        // duration of the call.
        unsafe {
            run(
                py,
                &c,
                &[
                    q.bytes(),
                    k.bytes(),
                    v.bytes(),
                    i32_bytes(&qs),
                    i32_bytes(&ks),
                ],
            )
        }
    })
}

/// q, k, v and the segment ids as both passes read them, with the problem they make.
type AttentionArgs = (Tensor, Tensor, Tensor, Option<(Tensor, Tensor)>, Attention);

fn read_attention(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    q_segments: Option<&Bound<'_, PyAny>>,
    kv_segments: Option<&Bound<'_, PyAny>>,
    causal: bool,
    sm_scale: f64,
) -> PyResult<AttentionArgs> {
    let (q, k, v) = (
        Tensor::from_py("q", q)?,
        Tensor::from_py("k", k)?,
        Tensor::from_py("v", v)?,
    );
    let segs = segment_tensors(q_segments, kv_segments)?;
    let a = attention(&q, &k, &v, causal, sm_scale)?;
    Ok((q, k, v, segs, a))
}

fn segment_tensors(
    q_segments: Option<&Bound<'_, PyAny>>,
    kv_segments: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<(Tensor, Tensor)>> {
    match (q_segments, kv_segments) {
        (Some(q), Some(k)) => Ok(Some((
            Tensor::from_py("segment_ids", q)?,
            Tensor::from_py("kv_segment_ids", k)?,
        ))),
        (None, None) => Ok(None),
        _ => Err(PyValueError::new_err(
            "segment ids come in pairs: give both q's and kv's, or neither",
        )),
    }
}

/// Attention gradients from the forward's output, log-sum-exp (`[b, h, sq]` or
/// `[b, h, sq, 1]`) and the output's gradient: DLPack capsules of dq, dk and dv.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, grad_out, lse, q_segments, kv_segments, causal, sm_scale))]
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
    causal: bool,
    sm_scale: f64,
) -> PyResult<Vec<Py<PyAny>>> {
    crate::guard(|| {
        let (q, k, v, segs, a) =
            read_attention(q, k, v, q_segments, kv_segments, causal, sm_scale)?;
        let (o, d_o, lse) = (
            Tensor::from_py("out", out)?,
            Tensor::from_py("grad_out", grad_out)?,
            Tensor::from_py("lse", lse)?,
        );
        let s = a.shape;
        o.expect("out", &q.shape, a.dtype)?;
        d_o.expect("grad_out", &q.shape, a.dtype)?;
        let lse_shape = [s.batch, s.heads, s.q_len];
        if lse.dtype != DType::F32
            || (lse.shape != lse_shape && lse.shape != [s.batch, s.heads, s.q_len, 1])
        {
            return Err(PyValueError::new_err(format!(
                "lse must be f32 {lse_shape:?}; got {} {:?}",
                lse.dtype, lse.shape
            )));
        }
        if s.is_empty() {
            let (hk, sk) = (k.shape[1], k.shape[2]);
            let kv = [s.batch, hk, sk, s.head_dim];
            return capsules(
                py,
                vec![
                    zeros(a.dtype, &q.shape)?,
                    zeros(a.dtype, &kv)?,
                    zeros(a.dtype, &kv)?,
                ],
            );
        }
        let (qs, ks) = a.segment_operands(segs.as_ref())?;
        let use_segments = segs.is_some();
        let backward = |pass: FlashPass| {
            prepared(
                py,
                a.key(pass, use_segments),
                |backend| {
                    flash::tuned_backward_call(pass, s, a.dtype, a.opts, use_segments, backend)
                },
                || flash::backward_operand_types(s, a.dtype, use_segments),
            )
        };
        let (dkv, dqc) = (
            backward(FlashPass::BackwardDkv)?,
            backward(FlashPass::BackwardDq)?,
        );
        // SAFETY: as in the forward.
        unsafe {
            let inputs = [
                q.bytes(),
                k.bytes(),
                v.bytes(),
                o.bytes(),
                d_o.bytes(),
                lse.bytes(),
                i32_bytes(&qs),
                i32_bytes(&ks),
            ];
            let mut grads = run(py, &dqc, &inputs)?;
            grads.extend(run(py, &dkv, &inputs)?);
            Ok(grads)
        }
    })
}

/// `a·b` (or `a·bᵀ`), 2-D or batched 3-D, as a DLPack capsule.
#[pyfunction]
#[pyo3(signature = (a, b, transpose_b=false))]
pub fn matmul(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    transpose_b: bool,
) -> PyResult<Py<PyAny>> {
    crate::guard(|| {
        let (a, b) = (Tensor::from_py("a", a)?, Tensor::from_py("b", b)?);
        if a.dtype != b.dtype {
            return Err(PyTypeError::new_err(format!(
                "a and b must share a dtype; got {} and {}",
                a.dtype, b.dtype
            )));
        }
        let (batch, m, ka) = match a.shape.as_slice() {
            &[m, k] => (None, m, k),
            &[x, m, k] => (Some(x), m, k),
            other => {
                return Err(PyValueError::new_err(format!(
                    "a must be [m, k] or [batch, m, k]; got {other:?}"
                )))
            }
        };
        let b_rows = if transpose_b { "[n, k]" } else { "[k, n]" };
        let (n, kb) = match (batch, b.shape.as_slice()) {
            (None, &[r, c]) => {
                if transpose_b {
                    (r, c)
                } else {
                    (c, r)
                }
            }
            (Some(x), &[y, r, c]) if x == y => {
                if transpose_b {
                    (r, c)
                } else {
                    (c, r)
                }
            }
            _ => {
                return Err(PyValueError::new_err(format!(
                "b must be {b_rows} (with a's batch in front if a has one) for a {:?}; got {:?}",
                a.shape, b.shape
            )))
            }
        };
        if ka != kb {
            return Err(PyValueError::new_err(format!(
                "a has k = {ka}, b has k = {kb}"
            )));
        }
        float_dtype("a", a.dtype)?;
        let shape = MatmulShape { batch, m, n, k: ka };
        if shape.is_empty() {
            return crate::dlpack::capsule(py, zeros(a.dtype, &shape.output_shape())?);
        }
        let opts = MatmulOptions {
            transpose_b,
            block: None,
        };
        let (a_type, b_type) = (
            ValueType::new(a.dtype, a.shape.clone()),
            ValueType::new(b.dtype, b.shape.clone()),
        );
        let c = prepared(
            py,
            format!("matmul/{shape:?}/{}/{transpose_b}", a.dtype),
            |backend| {
                matmul_kernel::call(
                    shape,
                    a.dtype,
                    matmul_kernel::with_tuned_block(shape, a.dtype, opts, backend),
                )
            },
            || vec![a_type, b_type],
        )?;
        // SAFETY: as in the attention forward.
        let mut out = unsafe { run(py, &c, &[a.bytes(), b.bytes()])? };
        out.pop()
            .ok_or_else(|| PyRuntimeError::new_err("the matmul kernel returned no output"))
    })
}
