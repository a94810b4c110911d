//! Flash attention, forward and backward (the FlashAttention-2 scheme): q, k, v in
//! `[batch, heads, seq, head_dim]`, causal or not, any `sm_scale`, optional segment ids
//! (document masking for packed sequences), grouped-query attention (fewer k/v heads than q
//! heads), q and kv lengths that differ and are not multiples of the block. The forward
//! also returns the log-sum-exp of each query row, which the backward recomputes P from.

use ndarray::{Array3, Array4, ArrayD, ArrayView2, Axis};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{HostArray, PallasCall, LANES};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::Chip;

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::SearchSpace;

use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

// Running max and sum are kept replicated across the TPU's lanes (`LANES`), as TPU kernels
// keep them; q segment ids are laid out `[b, sq, LANES]`.
/// kv segment ids are replicated across the fewest sublanes a TPU block may have: laid out
/// `[b, SUBLANES, sk]`.
const SUBLANES: usize = torchtpu_dsl::MIN_SUBLANES;

/// The factor that carries a running softmax sum from row maximum `m_prev` to `m_next`. Equal
/// maxima rescale by 1, which also keeps a row that has seen nothing yet (-inf before and
/// after) from rescaling by exp(NaN).
#[tpu_fn]
pub(crate) fn online_rescale(m_prev: Tile<f32>, m_next: Tile<f32>) -> Tile<f32> {
    select(m_prev == m_next, 1.0, (m_prev - m_next).exp())
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn flash_forward<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    o: &mut Ref<T>,
    lse: &mut Ref<f32>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc_scratch: &mut Scratch<f32>,
    sm_scale: f32,
    causal: bool,
    use_segments: bool,
    kv_len: usize,
) {
    let bq = q.shape()[0];
    let bk = k.shape()[0];
    let (qi, kj) = (program_id(2), program_id(3));
    if kj == 0 {
        m_scratch.store(full(f64::NEG_INFINITY));
        l_scratch.store(zeros());
        acc_scratch.store(zeros());
    }
    let q_start = qi * bq as i32;
    let k_start = kj * bk as i32;
    // Causal: a kv block entirely right of this q block's last row contributes nothing.
    let block_visible = if causal { k_start <= q_start + (bq as i32 - 1) } else { k_start < kv_len as i32 };
    if block_visible {
        let s = dot_nt(q.load(), k.load()) * sm_scale;
        let rows = iota::<i32>([bq, bk], 0) + q_start;
        let cols = iota::<i32>([bq, bk], 1) + k_start;
        let mut visible = cols < kv_len as i32;
        if causal {
            visible = visible & (rows >= cols);
        }
        if use_segments {
            visible = visible & (q_segments.load_at((.., 0..1)) == kv_segments.load_at((0..1, ..)));
        }
        let mut vb = v.load();
        if kv_len % bk != 0 {
            vb = zero_outside(vb, 0, k_start, kv_len);
        }
        // Masked scores are -inf, not Pallas' finite mask value, so that only visible scores
        // set the row maximum: a row whose visible scores are all -inf (an inf input) keeps
        // m = -inf, and its p = exp(-inf - -inf) is NaN, as SDPA's softmax gives.
        let s = select(visible, s, f32::NEG_INFINITY);
        let m_prev = m_scratch.load_at((.., 0..1));
        let l_prev = l_scratch.load_at((.., 0..1));
        let m_next = maximum(m_prev, s.max_keepdims(1));
        let alpha = online_rescale(m_prev, m_next);
        let p = select(visible, (s - m_next).exp(), 0.0);
        let l_next = alpha * l_prev + p.sum_keepdims(1);
        acc_scratch.store(acc_scratch.load() * alpha + dot(p.cast::<T>(), vb));
        m_scratch.store(m_next.broadcast_to([bq, LANES]));
        l_scratch.store(l_next.broadcast_to([bq, LANES]));
    }
    if kj == num_programs(3) - 1 {
        let l = l_scratch.load_at((.., 0..1));
        let m = m_scratch.load_at((.., 0..1));
        // A row that sees no key at all (segments, padding) has l = 0: zeros and lse = -inf
        // (as SDPA). A NaN that reached the row (from q, k, v or sm_scale) makes l NaN and
        // stays NaN: hence `l == 0` (ordered; Mosaic has no unordered compare) picks zeros.
        let acc = acc_scratch.load();
        o.store(select(l == 0.0, acc * 0.0, acc / l).cast());
        lse.store(m + l.log());
    }
}

/// What attention computes, beyond its inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    pub causal: bool,
    /// Default `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// (block_q, block_k); default picks a safe size for the shapes.
    pub block: Option<(usize, usize)>,
}

/// The shapes of an attention problem: q `[b, h, sq, d]`, k and v `[b, hk, sk, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Whether the shapes are a valid attention problem (empty ones included).
    pub fn check(&self) -> Result<(), Error> {
        let s = self;
        let divides = if s.kv_heads == 0 { s.heads == 0 } else { s.heads % s.kv_heads == 0 };
        if !divides {
            return Err(Error::Shape(format!("q has {} heads, k/v {}: grouped-query attention needs q heads to be a multiple of k/v heads", s.heads, s.kv_heads)));
        }
        Ok(())
    }

    /// Whether there is nothing for a kernel to do: some output is empty, or there is no key
    /// (then every output row is 0 and its log-sum-exp -inf, as SDPA gives for no key).
    pub fn is_empty(&self) -> bool {
        [self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim].contains(&0)
    }

    /// The shapes a kernel call needs: valid and non-empty.
    fn check_for_kernel(&self) -> Result<(), Error> {
        self.check()?;
        if self.is_empty() {
            return Err(Error::Shape(format!("a kernel call needs non-empty shapes (the host API handles empty ones): {self:?}")));
        }
        Ok(())
    }
}

/// A block of `block` rows checked as a caller's (or a table's) choice: positive.
fn check_block(block: (usize, usize)) -> Result<(usize, usize), Error> {
    if block.0 == 0 || block.1 == 0 {
        return Err(Error::Shape(format!("attention blocks (block_q, block_k) must be positive; got {block:?}")));
    }
    Ok(block)
}

/// One of the three attention kernels; each has its own tuned blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashPass {
    Forward,
    /// The backward kernel computing dK and dV (one program per kv block).
    BackwardDkv,
    /// The backward kernel computing dQ (one program per q block).
    BackwardDq,
}

impl FlashPass {
    pub const ALL: [FlashPass; 3] = [FlashPass::Forward, FlashPass::BackwardDkv, FlashPass::BackwardDq];

    /// The kernel's key in the tuned tables.
    pub fn table_key(self) -> &'static str {
        match self {
            FlashPass::Forward => "flash_attention",
            FlashPass::BackwardDkv => "flash_attention_dkv",
            FlashPass::BackwardDq => "flash_attention_dq",
        }
    }
}

/// `opts` with the forward block the tuned tables (or the cache) give for this shape on
/// `backend`, unless the caller chose one; fitted to the shape.
pub fn with_tuned_block(shape: AttentionShape, dtype: DType, opts: AttentionOptions, backend: Backend) -> AttentionOptions {
    tuned_for(FlashPass::Forward, shape, dtype, opts, crate::tables::target_of(backend))
}

/// Options for the two backward kernels (dK/dV, dQ), each with its own tuned block unless
/// the caller chose one.
pub fn with_tuned_backward_blocks(shape: AttentionShape, dtype: DType, opts: AttentionOptions, backend: Backend) -> (AttentionOptions, AttentionOptions) {
    let target = crate::tables::target_of(backend);
    (tuned_for(FlashPass::BackwardDkv, shape, dtype, opts, target), tuned_for(FlashPass::BackwardDq, shape, dtype, opts, target))
}

fn tuned_for(pass: FlashPass, shape: AttentionShape, dtype: DType, opts: AttentionOptions, target: Option<TableTarget>) -> AttentionOptions {
    // A problem no kernel can run keeps its options: the call reports what is wrong.
    if opts.block.is_some() || shape.check_for_kernel().is_err() || check_dtype(dtype).is_err() {
        return opts;
    }
    let (problem, _) = problem_and_config(shape, dtype, opts, false);
    let c = op::config_for(&FlashOp(pass), &problem, target);
    AttentionOptions { block: Some((c.bq, c.bk)), ..opts }
}

/// The problem of `shape` in `dtype` with `opts`' mask and scale, and the config `opts` names,
/// if any.
fn problem_and_config(shape: AttentionShape, dtype: DType, opts: AttentionOptions, segments: bool) -> (FlashProblem, Option<FlashConfig>) {
    let problem = FlashProblem { shape, dtype, causal: opts.causal, segments, sm_scale: opts.sm_scale.map(f64::from) };
    (problem, opts.block.map(|(bq, bk)| FlashConfig { bq, bk }))
}

/// A block size for `len`: `preferred`, or the whole (8-rounded) length when shorter.
fn block_for(len: usize, preferred: usize) -> usize {
    preferred.min(len.div_ceil(8).saturating_mul(8))
}

/// One of the three attention kernels as an op; each has its own tuned blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashOp(pub FlashPass);

/// One attention call: shapes, dtype, causal mask, whether segment ids are given, and the
/// softmax scale (default `1 / sqrt(head_dim)`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlashProblem {
    #[serde(flatten)]
    pub shape: AttentionShape,
    pub dtype: DType,
    pub causal: bool,
    pub segments: bool,
    #[serde(with = "op::float::option")]
    pub sm_scale: Option<f64>,
}

impl FlashProblem {
    fn options(&self, c: &FlashConfig) -> AttentionOptions {
        AttentionOptions { causal: self.causal, sm_scale: self.sm_scale.map(|s| s as f32), block: Some((c.bq, c.bk)) }
    }

    fn scale(&self) -> f64 {
        self.sm_scale.map_or(1.0 / (self.shape.head_dim as f64).sqrt(), |s| f64::from(s as f32))
    }
}

/// The q and kv blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlashConfig {
    pub bq: usize,
    pub bk: usize,
}

/// The segment ids `[b, sq]` and `[b, sk]` read back from their laid-out operands.
fn segment_ids_of(p: &FlashProblem, q_segments: &HostArray, kv_segments: &HostArray) -> Option<(ndarray::Array2<i32>, ndarray::Array2<i32>)> {
    if !p.segments {
        return None;
    }
    let (qs, ks) = (q_segments.to_f64(), kv_segments.to_f64());
    let AttentionShape { batch, q_len, kv_len, .. } = p.shape;
    let at = |a: &ArrayD<f64>, idx: [usize; 3]| a.get(idx.as_slice()).map_or(0, |&x| x as i32);
    Some((ndarray::Array2::from_shape_fn((batch, q_len), |(b, i)| at(&qs, [b, i, 0])), ndarray::Array2::from_shape_fn((batch, kv_len), |(b, j)| at(&ks, [b, 0, j]))))
}

impl Op for FlashOp {
    type Problem = FlashProblem;
    type Config = FlashConfig;

    fn name(&self) -> &'static str {
        self.0.table_key()
    }
    fn example(&self) -> FlashProblem {
        let shape = AttentionShape { batch: 1, heads: 8, kv_heads: 8, q_len: 2048, kv_len: 2048, head_dim: 128 };
        FlashProblem { shape, dtype: DType::F32, causal: true, segments: false, sm_scale: None }
    }
    fn check(&self, p: &FlashProblem) -> Result<(), Error> {
        p.shape.check()?;
        check_dtype(p.dtype)
    }
    /// The scale does not change which blocks are fastest, nor do segment ids (their mask
    /// costs the same at every block).
    fn tuning_problem(&self, p: &FlashProblem) -> FlashProblem {
        FlashProblem { sm_scale: None, segments: false, ..*p }
    }
    fn bucket(&self, p: &FlashProblem) -> String {
        let s = p.shape;
        format!("s{}d{}/{}/{}", tables::bucket(s.q_len.max(s.kv_len), 128, 16384), s.head_dim, if p.causal { "causal" } else { "full" }, p.dtype)
    }
    fn space(&self, p: &FlashProblem) -> SearchSpace {
        SearchSpace::new().param("bq", block_candidates(p.shape.q_len, 2048)).param("bk", block_candidates(p.shape.kv_len, 2048))
    }
    fn default_config(&self, p: &FlashProblem) -> FlashConfig {
        self.fit(p, FlashConfig { bq: 512, bk: 512 })
    }
    fn fit(&self, p: &FlashProblem, c: FlashConfig) -> FlashConfig {
        if c.bq == 0 || c.bk == 0 {
            return self.default_config(p);
        }
        FlashConfig { bq: block_for(p.shape.q_len, c.bq), bk: block_for(p.shape.kv_len, c.bk) }
    }
    fn call(&self, p: &FlashProblem, c: &FlashConfig) -> Result<PallasCall, Error> {
        match self.0 {
            FlashPass::Forward => forward_call(p.shape, p.dtype, p.options(c), p.segments),
            pass => backward_call(pass, p.shape, p.dtype, p.options(c), p.segments),
        }
    }
    fn operand_types(&self, p: &FlashProblem) -> Vec<ValueType> {
        match self.0 {
            FlashPass::Forward => forward_operand_types(p.shape, p.dtype, p.segments),
            _ => backward_operand_types(p.shape, p.dtype, p.segments),
        }
    }
    /// Forward: o like q, the log-sum-exp f32 `[b, h, sq, 1]`; dK/dV: like k and v; dQ: like q.
    fn output_types(&self, p: &FlashProblem) -> Vec<ValueType> {
        let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim } = p.shape;
        let q = ValueType::new(p.dtype, [batch, heads, q_len, head_dim]);
        let kv = ValueType::new(p.dtype, [batch, kv_heads, kv_len, head_dim]);
        match self.0 {
            FlashPass::Forward => vec![q, ValueType::new(DType::F32, [batch, heads, q_len, 1])],
            FlashPass::BackwardDkv => vec![kv.clone(), kv],
            FlashPass::BackwardDq => vec![q],
        }
    }
    fn is_empty(&self, p: &FlashProblem) -> bool {
        p.shape.is_empty()
    }
    /// Zeros; the forward's log-sum-exp is [`empty_lse`]'s (segment ids read from the operands).
    fn empty_outputs(&self, p: &FlashProblem, inputs: &[HostArray]) -> Vec<HostArray> {
        let mut out: Vec<HostArray> = self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect();
        if let (FlashPass::Forward, [_, _, _, qs, ks]) = (self.0, inputs) {
            let segments = segment_ids_of(p, qs, ks);
            let lse = empty_lse(p.shape, p.causal, segments.as_ref().map(|(q, k)| (q.view(), k.view())));
            out[1] = HostArray::from(lse.insert_axis(Axis(3)));
        }
        out
    }
    /// Random q, k, v (and dO); for the backward kernels, o and the log-sum-exp of the
    /// forward on them, as the backward assumes.
    fn random_inputs(&self, p: &FlashProblem, rng: &mut StdRng) -> Vec<HostArray> {
        let types = self.operand_types(p);
        let mut inputs: Vec<HostArray> = types.iter().map(|t| op::random_operand(rng, t)).collect();
        if self.0 != FlashPass::Forward && inputs.len() == 8 {
            let f = |i: usize| inputs[i].to_f64();
            let segments = segment_ids_of(p, &inputs[6], &inputs[7]);
            let (o, lse) = reference(&f(0), &f(1), &f(2), segments.as_ref().map(|(q, k)| (q, k)), p.causal, p.scale());
            inputs[3] = HostArray::from_f64(p.dtype, &o.into_dyn());
            inputs[5] = HostArray::from_f64(DType::F32, &lse.insert_axis(Axis(3)).into_dyn());
        }
        inputs
    }
    fn reference(&self, p: &FlashProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
        let (n, segs) = if self.0 == FlashPass::Forward { (5, (3, 4)) } else { (8, (6, 7)) };
        if f.len() != n {
            return Vec::new();
        }
        let segments = segment_ids_of(p, &inputs[segs.0], &inputs[segs.1]);
        let segments = segments.as_ref().map(|(q, k)| (q, k));
        match self.0 {
            FlashPass::Forward => {
                let (o, lse) = reference(&f[0], &f[1], &f[2], segments, p.causal, p.scale());
                vec![o.into_dyn(), lse.insert_axis(Axis(3)).into_dyn()]
            }
            pass => {
                let (dq, dk, dv) = reference_backward(&f[0], &f[1], &f[2], &f[4], segments, p.causal, p.scale());
                if pass == FlashPass::BackwardDkv {
                    vec![dk.into_dyn(), dv.into_dyn()]
                } else {
                    vec![dq.into_dyn()]
                }
            }
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<FlashProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        let sizes: &[usize] = if target == TableTarget::Cpu { &[512, 1024, 2048] } else { &[512, 1024, 2048, 4096] };
        let heads = if target == TableTarget::Cpu { 4 } else { 8 };
        let mut out = Vec::new();
        for &dtype in dtypes {
            for &seq in sizes {
                for causal in [true, false] {
                    let shape = AttentionShape { batch: 1, heads, kv_heads: heads, q_len: seq, kv_len: seq, head_dim: 128 };
                    out.push(FlashProblem { shape, dtype, causal, segments: false, sm_scale: None });
                }
            }
        }
        out
    }
}

fn check_dtype(dtype: DType) -> Result<(), Error> {
    op::check_float_dtype("flash attention", dtype)
}

/// The kv block q block `i` reads at step `j`. Causally, blocks right of the diagonal are
/// skipped by the kernel; reading the last visible block again instead means the pipeline
/// issues no copy for them (on a TPU, half the kv traffic of causal attention).
fn causal_kv_block(causal: bool, bq: usize, bk: usize, i: Scalar<i32>, j: Scalar<i32>) -> Scalar<i32> {
    if !causal {
        return j;
    }
    minimum(j, (i * bq as i32 + (bq as i32 - 1)) / bk as i32)
}

/// The q block kv block `j` reads at step `i` of the dK/dV kernel: causally, q blocks above
/// the diagonal are skipped, and read as the first visible one (or the last q block when
/// none is) so they cost no copy.
fn causal_q_block(causal: bool, bq: usize, bk: usize, q_blocks: usize, i: Scalar<i32>, j: Scalar<i32>) -> Scalar<i32> {
    if !causal {
        return i;
    }
    minimum(maximum(i, j * bk as i32 / bq as i32), q_blocks as i32 - 1)
}

/// The forward call: operands q, k, v, q segment ids `[b, sq, 128]`, kv segment ids
/// `[b, 8, sk]` (i32, replicated across lanes/sublanes); outputs o and lse `[b, h, sq, 1]`.
pub fn forward_call(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<PallasCall, Error> {
    shape.check_for_kernel()?;
    let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim: d } = shape;
    let (bq, bk) = check_block(opts.block.unwrap_or((block_for(q_len, 512), block_for(kv_len, 512))))?;
    let scale = opts.sm_scale.unwrap_or(1.0 / (d as f32).sqrt());
    let kernel = match dtype {
        DType::F32 => flash_forward::kernel::<f32>(scale, opts.causal, use_segments, kv_len),
        DType::BF16 => flash_forward::kernel::<bf16>(scale, opts.causal, use_segments, kv_len),
        other => return Err(Error::Dtype(format!("flash attention takes f32 or bf16, not {other}"))),
    };
    let group = (heads / kv_heads) as i32;
    let kv_block = move |i, j| causal_kv_block(opts.causal, bq, bk, i, j);
    let (q_segments, kv_segments) = segment_specs::<4>(use_segments, || {
        (BlockSpec::new([None, Some(bq), Some(LANES)], |[b, _, i, _]| (b, i, 0)), BlockSpec::new([None, Some(SUBLANES), Some(bk)], move |[b, _, i, j]| (b, 0, kv_block(i, j))))
    });
    Ok(PallasCall::new(kernel)
        .name("flash_attention_forward")
        .grid([batch, heads, q_len.div_ceil(bq), kv_len.div_ceil(bk)])
        .in_specs([
            BlockSpec::new([None, None, Some(bq), Some(d)], |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new([None, None, Some(bk), Some(d)], move |[b, h, i, j]| (b, h / group, kv_block(i, j), 0)),
            BlockSpec::new([None, None, Some(bk), Some(d)], move |[b, h, i, j]| (b, h / group, kv_block(i, j), 0)),
            q_segments,
            kv_segments,
        ])
        .out_specs([BlockSpec::new([None, None, Some(bq), Some(d)], |[b, h, i, _]| (b, h, i, 0)), BlockSpec::new([None, None, Some(bq), Some(1)], |[b, h, i, _]| (b, h, i, 0))])
        .out_shapes([vec![batch, heads, q_len, d], vec![batch, heads, q_len, 1]])
        .scratch([Vmem::new([bq, LANES]), Vmem::new([bq, LANES]), Vmem::new([bq, d])])
        .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary]))
}

fn shape_of(q: &HostArray, k: &HostArray, v: &HostArray) -> Result<AttentionShape, Error> {
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        return Err(Error::Shape(format!("q, k, v must be [batch, heads, seq, head_dim]; got {qs:?}, {ks:?}, {vs:?}")));
    }
    if ks != vs {
        return Err(Error::Shape(format!("k and v shapes differ: {ks:?} vs {vs:?}")));
    }
    if qs[0] != ks[0] || qs[3] != ks[3] {
        return Err(Error::Shape(format!("q {qs:?} and k {ks:?} must agree in batch and head_dim")));
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::Dtype(format!("q, k, v dtypes differ: {}, {}, {}", q.dtype(), k.dtype(), v.dtype())));
    }
    let s = AttentionShape { batch: qs[0], heads: qs[1], kv_heads: ks[1], q_len: qs[2], kv_len: ks[2], head_dim: qs[3] };
    s.check()?;
    Ok(s)
}

/// The shape of a segment-id operand when there are none: one tile, which the kernels never
/// read, so attention without segments costs no memory for them.
const UNUSED_SEGMENTS: [usize; 3] = [1, SUBLANES, LANES];

/// The block specs of the segment-id operands of a kernel with an `N`-dim grid: `used()`'s
/// with segments; without, the one [`UNUSED_SEGMENTS`] tile for every program.
fn segment_specs<const N: usize>(use_segments: bool, used: impl FnOnce() -> (BlockSpec, BlockSpec)) -> (BlockSpec, BlockSpec) {
    if use_segments {
        return used();
    }
    let unused = || BlockSpec::new([None, Some(SUBLANES), Some(LANES)], |_: [Scalar<i32>; N]| (0, 0, 0));
    (unused(), unused())
}

/// The segment-id operands' types: q's `[b, sq, LANES]` and kv's `[b, SUBLANES, sk]` with
/// segments; one `[1, SUBLANES, LANES]` tile each without.
pub fn segment_types(s: AttentionShape, use_segments: bool) -> [ValueType; 2] {
    if use_segments {
        [ValueType::new(DType::I32, [s.batch, s.q_len, LANES]), ValueType::new(DType::I32, [s.batch, SUBLANES, s.kv_len])]
    } else {
        [ValueType::new(DType::I32, UNUSED_SEGMENTS), ValueType::new(DType::I32, UNUSED_SEGMENTS)]
    }
}

/// Segment ids laid out as the kernels take them (see [`segment_types`]): q's `[b, sq]`
/// replicated across lanes, kv's `[b, sk]` across sublanes; placeholders for `None`.
pub fn segment_layout(shape: AttentionShape, segments: Option<(ArrayView2<i32>, ArrayView2<i32>)>) -> Result<(Array3<i32>, Array3<i32>), Error> {
    let (b, sq, sk) = (shape.batch, shape.q_len, shape.kv_len);
    let Some((qs, ks)) = segments else {
        let [n, rows, lanes] = UNUSED_SEGMENTS;
        return Ok((Array3::zeros((n, rows, lanes)), Array3::zeros((n, rows, lanes))));
    };
    if qs.dim() != (b, sq) || ks.dim() != (b, sk) {
        return Err(Error::Shape(format!("segment ids must be [{b}, {sq}] and [{b}, {sk}]; got {:?} and {:?}", qs.dim(), ks.dim())));
    }
    torchtpu_dsl::memory::check_types_fit(&segment_types(shape, true), 1, "laying out the segment ids").map_err(Error::Memory)?;
    Ok((Array3::from_shape_fn((b, sq, LANES), |(i, j, _)| qs[[i, j]]), Array3::from_shape_fn((b, SUBLANES, sk), |(i, _, j)| ks[[i, j]])))
}

fn segment_operands(shape: AttentionShape, segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>) -> Result<[HostArray; 2], Error> {
    let (qs, ks) = segment_layout(shape, segments.map(|(q, k)| (q.view(), k.view())))?;
    Ok([HostArray::from(qs), HostArray::from(ks)])
}

/// The log-sum-exp of an empty attention problem ([`AttentionShape::is_empty`]), where no
/// kernel runs: -inf for a row that sees no key; with `head_dim` 0 every score is 0, so a
/// row's log-sum-exp is the log of how many keys it sees.
pub fn empty_lse(shape: AttentionShape, causal: bool, segments: Option<(ArrayView2<i32>, ArrayView2<i32>)>) -> Array3<f32> {
    let AttentionShape { batch, heads, q_len, kv_len, .. } = shape;
    Array3::from_shape_fn((batch, heads, q_len), |(b, _, i)| {
        let visible = (0..kv_len).filter(|&j| (!causal || j <= i) && segments.is_none_or(|(qs, ks)| qs.get((b, i)) == ks.get((b, j)))).count();
        if visible == 0 {
            f32::NEG_INFINITY
        } else {
            (visible as f32).ln()
        }
    })
}

/// Attention output and log-sum-exp (`[b, h, sq]`, f32) of q, k, v on `backend`; empty
/// problems give zeros (and the log-sum-exp of [`empty_lse`]) without running a kernel.
pub fn forward(
    q: &HostArray,
    k: &HostArray,
    v: &HostArray,
    segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>,
    opts: AttentionOptions,
    backend: Backend,
) -> Result<(HostArray, Array3<f32>), Error> {
    let shape = shape_of(q, k, v)?;
    check_dtype(q.dtype())?;
    if shape.is_empty() {
        let o = HostArray::from_f64(q.dtype(), &ArrayD::zeros(q.shape().to_vec()));
        return Ok((o, empty_lse(shape, opts.causal, segments.map(|(q, k)| (q.view(), k.view())))));
    }
    let opts = with_tuned_block(shape, q.dtype(), opts, backend);
    let call = forward_call(shape, q.dtype(), opts, segments.is_some())?;
    let [qs, ks] = segment_operands(shape, segments)?;
    let mut out = torchtpu_exec::run(&call, backend, &[q.clone(), k.clone(), v.clone(), qs, ks])?;
    let lse = out.pop().and_then(|l| l.into_array::<f32>().ok()).ok_or_else(|| Error::Shape("the kernel returned no f32 lse".into()))?;
    let lse = lse.index_axis_move(Axis(3), 0).into_dimensionality().map_err(|e| Error::Shape(e.to_string()))?;
    let o = out.pop().ok_or_else(|| Error::Shape("the kernel returned no output".into()))?;
    Ok((o, lse))
}

/// Attention in f64, written independently of the kernel: the reference tests compare to.
/// Returns the output `[b, h, sq, d]` and the log-sum-exp `[b, h, sq]` (-inf for rows that see no key).
pub fn reference(
    q: &ArrayD<f64>,
    k: &ArrayD<f64>,
    v: &ArrayD<f64>,
    segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>,
    causal: bool,
    sm_scale: f64,
) -> (Array4<f64>, Array3<f64>) {
    let (b, h, sq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hk, sk) = (k.shape()[1], k.shape()[2]);
    let group = (h / hk.max(1)).max(1);
    let mut out = Array4::zeros((b, h, sq, d));
    let mut lse = Array3::from_elem((b, h, sq), f64::NEG_INFINITY);
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / group;
            for i in 0..sq {
                let visible = |j: usize| (!causal || j <= i) && segments.is_none_or(|(qs, ks)| qs[[bi, i]] == ks[[bi, j]]);
                let scores: Vec<(usize, f64)> =
                    (0..sk).filter(|&j| visible(j)).map(|j| (j, (0..d).map(|c| q[[bi, hi, i, c]] * k[[bi, kh, j, c]]).sum::<f64>() * sm_scale)).collect();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &(_, s)| a.max(s));
                let total: f64 = scores.iter().map(|&(_, s)| (s - m).exp()).sum();
                lse[[bi, hi, i]] = m + total.ln();
                for &(j, s) in &scores {
                    let p = (s - m).exp() / total;
                    for c in 0..d {
                        out[[bi, hi, i, c]] += p * v[[bi, kh, j, c]];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// What both backward kernels start from for one (q block, kv block) pair: the q, o, dO, k
/// and v blocks with their ragged rows zeroed, and which scores are visible (in bounds,
/// causal, same segment).
struct BackwardBlocks<T: Float> {
    q: Tile<T>,
    o: Tile<T>,
    d_o: Tile<T>,
    k: Tile<T>,
    v: Tile<T>,
    visible: Tile<bool>,
}

#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn backward_blocks<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &Ref<T>,
    d_o: &Ref<T>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    causal: bool,
    use_segments: bool,
    q_len: usize,
    kv_len: usize,
) -> BackwardBlocks<T> {
    let (bq, d) = (q.shape()[0], q.shape()[1]);
    let bk = k.shape()[0];
    let (mut qb, mut ob, mut dob) = (q.load(), o.load(), d_o.load());
    if q_len % bq != 0 {
        let real = iota::<i32>([bq, d], 0) + q_start < q_len as i32;
        qb = select(real, qb, 0.0);
        ob = select(real, ob, 0.0);
        dob = select(real, dob, 0.0);
    }
    let (mut kb, mut vb) = (k.load(), v.load());
    if kv_len % bk != 0 {
        let real = iota::<i32>([bk, d], 0) + k_start < kv_len as i32;
        kb = select(real, kb, 0.0);
        vb = select(real, vb, 0.0);
    }
    let rows = iota::<i32>([bq, bk], 0) + q_start;
    let cols = iota::<i32>([bq, bk], 1) + k_start;
    let mut visible = (rows < q_len as i32) & (cols < kv_len as i32);
    if causal {
        visible = visible & (rows >= cols);
    }
    if use_segments {
        visible = visible & (q_segments.load_at((.., 0..1)) == kv_segments.load_at((0..1, ..)));
    }
    BackwardBlocks { q: qb, o: ob, d_o: dob, k: kb, v: vb, visible }
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn flash_backward_dkv<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &Ref<T>,
    d_o: &Ref<T>,
    lse: &Ref<f32>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    dk: &mut Ref<T>,
    dv: &mut Ref<T>,
    dk_acc: &mut Scratch<f32>,
    dv_acc: &mut Scratch<f32>,
    sm_scale: f32,
    causal: bool,
    use_segments: bool,
    q_len: usize,
    kv_len: usize,
) {
    let bq = q.shape()[0];
    let bk = k.shape()[0];
    let (j, g, i) = (program_id(2), program_id(3), program_id(4));
    if g == 0 && i == 0 {
        dk_acc.store(zeros());
        dv_acc.store(zeros());
    }
    let q_start = i * bq as i32;
    let k_start = j * bk as i32;
    let block_visible = if causal { k_start <= q_start + (bq as i32 - 1) } else { k_start < kv_len as i32 };
    if block_visible {
        let b = backward_blocks(q, k, v, o, d_o, q_segments, kv_segments, q_start, k_start, causal, use_segments, q_len, kv_len);
        let s = dot_nt(b.q, b.k) * sm_scale;
        let p = select(b.visible, (s - lse.load()).exp(), 0.0);
        // Keep dV before dP: the other order keeps more blocks live, and 1024×1024 f32
        // blocks then overflow v5e's scoped VMEM.
        dv_acc.store(dv_acc.load() + dot_tn(p.cast::<T>(), b.d_o));
        let dp = dot_nt(b.d_o, b.v);
        let ds = p * (dp - (b.o.cast::<f32>() * b.d_o.cast::<f32>()).sum_keepdims(1));
        dk_acc.store(dk_acc.load() + dot_tn(ds.cast::<T>(), b.q) * sm_scale);
    }
    if g == num_programs(3) - 1 && i == num_programs(4) - 1 {
        dk.store(dk_acc.load().cast());
        dv.store(dv_acc.load().cast());
    }
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn flash_backward_dq<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &Ref<T>,
    d_o: &Ref<T>,
    lse: &Ref<f32>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    dq: &mut Ref<T>,
    dq_acc: &mut Scratch<f32>,
    sm_scale: f32,
    causal: bool,
    use_segments: bool,
    q_len: usize,
    kv_len: usize,
) {
    let bq = q.shape()[0];
    let bk = k.shape()[0];
    let (i, j) = (program_id(2), program_id(3));
    if j == 0 {
        dq_acc.store(zeros());
    }
    let q_start = i * bq as i32;
    let k_start = j * bk as i32;
    let block_visible = if causal { k_start <= q_start + (bq as i32 - 1) } else { k_start < kv_len as i32 };
    if block_visible {
        let b = backward_blocks(q, k, v, o, d_o, q_segments, kv_segments, q_start, k_start, causal, use_segments, q_len, kv_len);
        let s = dot_nt(b.q, b.k) * sm_scale;
        let p = select(b.visible, (s - lse.load()).exp(), 0.0);
        let dp = dot_nt(b.d_o, b.v);
        let ds = p * (dp - (b.o.cast::<f32>() * b.d_o.cast::<f32>()).sum_keepdims(1));
        dq_acc.store(dq_acc.load() + dot(ds.cast::<T>(), b.k) * sm_scale);
    }
    if j == num_programs(3) - 1 {
        dq.store(dq_acc.load().cast());
    }
}

/// The two backward calls (dK/dV, then dQ), both at `opts`' block. Operands of both: q, k,
/// v, o, dO, lse `[b, h, sq, 1]`, q and kv segment ids (as for [`forward_call`]).
pub fn backward_calls(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<(PallasCall, PallasCall), Error> {
    Ok((backward_call(FlashPass::BackwardDkv, shape, dtype, opts, use_segments)?, backward_call(FlashPass::BackwardDq, shape, dtype, opts, use_segments)?))
}

/// One backward kernel's call (`pass` is [`FlashPass::BackwardDkv`] or
/// [`FlashPass::BackwardDq`]); operands as for [`backward_calls`].
pub fn backward_call(pass: FlashPass, shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<PallasCall, Error> {
    shape.check_for_kernel()?;
    let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim: d } = shape;
    let (bq, bk) = check_block(opts.block.unwrap_or((block_for(q_len, 512), block_for(kv_len, 512))))?;
    let scale = opts.sm_scale.unwrap_or(1.0 / (d as f32).sqrt());
    let causal = opts.causal;
    let kernel = match (pass, dtype) {
        (FlashPass::BackwardDkv, DType::F32) => flash_backward_dkv::kernel::<f32>(scale, causal, use_segments, q_len, kv_len),
        (FlashPass::BackwardDkv, DType::BF16) => flash_backward_dkv::kernel::<bf16>(scale, causal, use_segments, q_len, kv_len),
        (FlashPass::BackwardDq, DType::F32) => flash_backward_dq::kernel::<f32>(scale, causal, use_segments, q_len, kv_len),
        (FlashPass::BackwardDq, DType::BF16) => flash_backward_dq::kernel::<bf16>(scale, causal, use_segments, q_len, kv_len),
        (FlashPass::Forward, _) => return Err(Error::Shape("backward_call builds the backward kernels; the forward is forward_call".into())),
        (_, other) => return Err(Error::Dtype(format!("flash attention takes f32 or bf16, not {other}"))),
    };
    let group = heads / kv_heads;
    let gi = group as i32;
    let q_block = [None, None, Some(bq), Some(d)];
    let kv_block = [None, None, Some(bk), Some(d)];
    let lse_block = [None, None, Some(bq), Some(1)];
    let q_blocks = q_len.div_ceil(bq);
    let q_at = move |i, j| causal_q_block(causal, bq, bk, q_blocks, i, j);
    let kv_at = move |i, j| causal_kv_block(causal, bq, bk, i, j);
    if pass == FlashPass::BackwardDkv {
        let (q_segments, kv_segments) = segment_specs::<5>(use_segments, || {
            (
                BlockSpec::new([None, Some(bq), Some(LANES)], move |[b, _, j, _, i]| (b, q_at(i, j), 0)),
                BlockSpec::new([None, Some(SUBLANES), Some(bk)], |[b, _, j, _, _]| (b, 0, j)),
            )
        });
        // One program per kv block, reducing over every q head of its group and every q block.
        return Ok(PallasCall::new(kernel)
            .name("flash_attention_backward_dkv")
            .grid([batch, kv_heads, kv_len.div_ceil(bk), group, q_len.div_ceil(bq)])
            .in_specs([
                BlockSpec::new(q_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0)),
                BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0)),
                BlockSpec::new(q_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                BlockSpec::new(q_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                BlockSpec::new(lse_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                q_segments,
                kv_segments,
            ])
            .out_specs([BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0)), BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0))])
            .out_shapes([vec![batch, kv_heads, kv_len, d], vec![batch, kv_heads, kv_len, d]])
            .scratch([Vmem::new([bk, d]), Vmem::new([bk, d])])
            .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary, Arbitrary]));
    }
    let (q_segments, kv_segments) = segment_specs::<4>(use_segments, || {
        (BlockSpec::new([None, Some(bq), Some(LANES)], |[b, _, i, _]| (b, i, 0)), BlockSpec::new([None, Some(SUBLANES), Some(bk)], move |[b, _, i, j]| (b, 0, kv_at(i, j))))
    });
    Ok(PallasCall::new(kernel)
        .name("flash_attention_backward_dq")
        .grid([batch, heads, q_len.div_ceil(bq), kv_len.div_ceil(bk)])
        .in_specs([
            BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new(kv_block, move |[b, h, i, j]| (b, h / gi, kv_at(i, j), 0)),
            BlockSpec::new(kv_block, move |[b, h, i, j]| (b, h / gi, kv_at(i, j), 0)),
            BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new(lse_block, |[b, h, i, _]| (b, h, i, 0)),
            q_segments,
            kv_segments,
        ])
        .out_specs([BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0))])
        .out_shapes([vec![batch, heads, q_len, d]])
        .scratch([Vmem::new([bq, d])])
        .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary]))
}

/// The forward for `shape`, lowered for `chip` with its tuned block: a StableHLO module
/// running the Mosaic kernel through `tpu_custom_call` (what a TPU runtime registers).
pub fn forward_tpu_module(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, chip: Chip) -> Result<String, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    op::tpu_module(&FlashOp(FlashPass::Forward), &problem, explicit.as_ref(), chip)
}

/// The backward (dK/dV, then dQ) for `shape`, lowered for `chip` like [`forward_tpu_module`].
pub fn backward_tpu_modules(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, chip: Chip) -> Result<(String, String), Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    let module = |pass| op::tpu_module(&FlashOp(pass), &problem, explicit.as_ref(), chip);
    Ok((module(FlashPass::BackwardDkv)?, module(FlashPass::BackwardDq)?))
}

/// One backward kernel compiled for `shape` on a device backend with its tuned block, like
/// [`compiled_forward`]. Operands as for [`backward_calls`].
pub fn compiled_backward(pass: FlashPass, shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, backend: Backend) -> Result<Compiled, Error> {
    let traced = tuned_backward_call(pass, shape, dtype, opts, use_segments, backend)?.trace(&backward_operand_types(shape, dtype, use_segments))?;
    Ok(Compiled::new(&traced, backend)?)
}

/// One backward kernel's call with its tuned block for `backend` (unless `opts` names one).
pub fn tuned_backward_call(pass: FlashPass, shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, backend: Backend) -> Result<PallasCall, Error> {
    if pass == FlashPass::Forward {
        return Err(Error::Shape("backward_call builds the backward kernels; the forward is forward_call".into()));
    }
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    op::tuned_call(&FlashOp(pass), &problem, explicit.as_ref(), backend)
}

/// The backward kernels' operand types: q, k, v, o, dO, lse, then the laid-out segment ids.
pub fn backward_operand_types(s: AttentionShape, dtype: DType, use_segments: bool) -> Vec<ValueType> {
    let mut types = forward_operand_types(s, dtype, use_segments);
    let segs = types.split_off(3);
    types.push(types[0].clone());
    types.push(types[0].clone());
    types.push(ValueType::new(DType::F32, [s.batch, s.heads, s.q_len, 1]));
    types.extend(segs);
    types
}

/// The forward compiled for `shape` on a device backend, with its tuned block: upload,
/// run on device buffers and time without recompiling. Operands as for [`forward_call`].
pub fn compiled_forward(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, backend: Backend) -> Result<Compiled, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    op::compiled(&FlashOp(FlashPass::Forward), &problem, explicit.as_ref(), backend)
}

/// The forward's operand types: q, k, v, then the laid-out segment ids.
pub fn forward_operand_types(s: AttentionShape, dtype: DType, use_segments: bool) -> Vec<ValueType> {
    let [q_segments, kv_segments] = segment_types(s, use_segments);
    vec![
        ValueType::new(dtype, [s.batch, s.heads, s.q_len, s.head_dim]),
        ValueType::new(dtype, [s.batch, s.kv_heads, s.kv_len, s.head_dim]),
        ValueType::new(dtype, [s.batch, s.kv_heads, s.kv_len, s.head_dim]),
        q_segments,
        kv_segments,
    ]
}

/// Gradients (dq, dk, dv) of attention given its output `o`, log-sum-exp and the output's gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &HostArray,
    k: &HostArray,
    v: &HostArray,
    o: &HostArray,
    lse: &Array3<f32>,
    d_o: &HostArray,
    segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>,
    opts: AttentionOptions,
    backend: Backend,
) -> Result<(HostArray, HostArray, HostArray), Error> {
    let shape = shape_of(q, k, v)?;
    let q_shape = [shape.batch, shape.heads, shape.q_len, shape.head_dim];
    if o.shape() != q_shape || d_o.shape() != q_shape || o.dtype() != q.dtype() || d_o.dtype() != q.dtype() {
        return Err(Error::Shape(format!("o and its gradient must be {} {q_shape:?}; got {} {:?} and {} {:?}", q.dtype(), o.dtype(), o.shape(), d_o.dtype(), d_o.shape())));
    }
    if lse.dim() != (shape.batch, shape.heads, shape.q_len) {
        return Err(Error::Shape(format!("lse must be [{}, {}, {}]; got {:?}", shape.batch, shape.heads, shape.q_len, lse.dim())));
    }
    check_dtype(q.dtype())?;
    if shape.is_empty() {
        let zeros = |a: &HostArray| HostArray::from_f64(a.dtype(), &ArrayD::zeros(a.shape().to_vec()));
        return Ok((zeros(q), zeros(k), zeros(v)));
    }
    let dkv_call = tuned_backward_call(FlashPass::BackwardDkv, shape, q.dtype(), opts, segments.is_some(), backend)?;
    let dq_call = tuned_backward_call(FlashPass::BackwardDq, shape, q.dtype(), opts, segments.is_some(), backend)?;
    let [qs, ks] = segment_operands(shape, segments)?;
    let lse4 = HostArray::from(lse.clone().insert_axis(Axis(3)));
    let operands = [q.clone(), k.clone(), v.clone(), o.clone(), d_o.clone(), lse4, qs, ks];
    let mut dkv = torchtpu_exec::run(&dkv_call, backend, &operands)?;
    let mut dq = torchtpu_exec::run(&dq_call, backend, &operands)?;
    let missing = || Error::Shape("a backward kernel returned too few outputs".into());
    let dv = dkv.pop().ok_or_else(missing)?;
    let dk = dkv.pop().ok_or_else(missing)?;
    Ok((dq.pop().ok_or_else(missing)?, dk, dv))
}

/// Gradients of attention in f64, written independently of the kernels: (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn reference_backward(
    q: &ArrayD<f64>,
    k: &ArrayD<f64>,
    v: &ArrayD<f64>,
    d_o: &ArrayD<f64>,
    segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>,
    causal: bool,
    sm_scale: f64,
) -> (Array4<f64>, Array4<f64>, Array4<f64>) {
    let (b, h, sq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hk, sk) = (k.shape()[1], k.shape()[2]);
    let group = (h / hk.max(1)).max(1);
    let mut dq = Array4::zeros((b, h, sq, d));
    let mut dk = Array4::zeros((b, hk, sk, d));
    let mut dv = Array4::zeros((b, hk, sk, d));
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / group;
            for i in 0..sq {
                let visible = |j: usize| (!causal || j <= i) && segments.is_none_or(|(qs, ks)| qs[[bi, i]] == ks[[bi, j]]);
                let js: Vec<usize> = (0..sk).filter(|&j| visible(j)).collect();
                if js.is_empty() {
                    continue;
                }
                let s: Vec<f64> = js.iter().map(|&j| (0..d).map(|c| q[[bi, hi, i, c]] * k[[bi, kh, j, c]]).sum::<f64>() * sm_scale).collect();
                let m = s.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                let total: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / total).collect();
                let dp: Vec<f64> = js.iter().map(|&j| (0..d).map(|c| d_o[[bi, hi, i, c]] * v[[bi, kh, j, c]]).sum()).collect();
                let row: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &j) in js.iter().enumerate() {
                    let ds = p[n] * (dp[n] - row);
                    for c in 0..d {
                        dv[[bi, kh, j, c]] += p[n] * d_o[[bi, hi, i, c]];
                        dq[[bi, hi, i, c]] += ds * k[[bi, kh, j, c]] * sm_scale;
                        dk[[bi, kh, j, c]] += ds * q[[bi, hi, i, c]] * sm_scale;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}
