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

use torchtpu_codegen::TpuModule;

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

/// Which scores a query row sees, fixed when a kernel is built: the kv length, the causal
/// mask with its diagonal's offset (0 is top-left, SDPA's `is_causal`; `kv_len - q_len` is
/// bottom-right, where the last query sees the last key), segment ids, and an additive bias
/// whose -inf entries hide a key (SDPA's boolean mask becomes one).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Masking {
    causal: Option<i32>,
    segments: bool,
    bias: bool,
    q_len: usize,
    kv_len: usize,
}

impl Masking {
    fn of(p: &FlashProblem) -> Masking {
        let s = p.shape;
        Masking { causal: p.causal.then(|| p.causal_offset()), segments: p.segments, bias: p.bias.is_some(), q_len: s.q_len, kv_len: s.kv_len }
    }
}

/// Whether any score of the q block at `q_start` (of `bq` rows) and the kv block at `k_start`
/// can be visible: causally, a kv block entirely right of the block's last row's diagonal
/// contributes nothing.
#[tpu_fn]
fn block_visible(q_start: Scalar<i32>, k_start: Scalar<i32>, bq: usize, m: Masking) -> Scalar<bool> {
    match m.causal {
        Some(offset) => k_start <= q_start + (bq as i32 - 1 + offset),
        None => k_start < m.kv_len as i32,
    }
}

/// The scaled scores of a q block against a kv block (plus the bias), and which of them are
/// visible. Rows past `q_len` are only masked where `mask_rows` (the backward sums over them).
struct Scores {
    s: Tile<f32>,
    visible: Tile<bool>,
}

#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn scores<T: Float>(
    qb: Tile<T>,
    kb: Tile<T>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    bias: &Ref<f32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    sm_scale: f32,
    m: Masking,
    mask_rows: bool,
) -> Scores {
    let (bq, bk) = (qb.shape()[0], kb.shape()[0]);
    let mut s = dot_nt(qb, kb) * sm_scale;
    let rows = iota::<i32>([bq, bk], 0) + q_start;
    let cols = iota::<i32>([bq, bk], 1) + k_start;
    let mut visible = cols < m.kv_len as i32;
    if mask_rows {
        visible = visible & (rows < m.q_len as i32);
    }
    if let Some(offset) = m.causal {
        visible = visible & (rows + offset >= cols);
    }
    if m.segments {
        visible = visible & (q_segments.load_at((.., 0..1)) == kv_segments.load_at((0..1, ..)));
    }
    if m.bias {
        // `!=` is unordered: a NaN bias stays visible and reaches the output, as in SDPA.
        let b = bias.load();
        s = s + b;
        visible = visible & (b != f32::NEG_INFINITY);
    }
    Scores { s, visible }
}

/// The dropout threshold of `rate` on 24 random bits: an element is kept when its bits are at
/// least this, with probability `1 - threshold / 2^24` (`rate` to within 2^-24).
pub fn dropout_threshold(rate: f64) -> i32 {
    (rate.clamp(0.0, 1.0) * f64::from(1 << 24)).round() as i32
}

/// Which scores dropout keeps, for query `head` (`batch * heads + head`) and the global rows
/// and columns of a block: a function of the seed and the element's position alone
/// ([`random_bits_at`] on the counter `row * kv_len + col`, keyed by the seed and the head), so
/// that the backward kernels, at their own blocks, drop what the forward dropped.
#[tpu_fn]
fn dropout_keep(seed: &Ref<i32>, head: Scalar<i32>, q_start: Scalar<i32>, k_start: Scalar<i32>, shape: [usize; 2], kv_len: usize, threshold: i32) -> Tile<bool> {
    let key = random_key(&[seed.load_at((0..1, 0..1)), head.broadcast_to([1, 1])]);
    let rows = iota::<i32>(shape, 0) + q_start;
    let cols = iota::<i32>(shape, 1) + k_start;
    let bits = random_bits_at(key, rows * kv_len as i32 + cols);
    bits.shift_right_logical(8) >= threshold
}

/// Dropout as the kernels take it: whether there is any, the keep threshold (computed once, in
/// f64, so that the kernels and [`dropout_keeps`] agree bit for bit) and the scale of what is
/// kept, `1 / (1 - rate)`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dropout {
    on: bool,
    threshold: i32,
    scale: f32,
}

impl Dropout {
    fn of(rate: f64) -> Dropout {
        Dropout { on: rate > 0.0, threshold: dropout_threshold(rate), scale: (1.0 / (1.0 - rate)) as f32 }
    }
}

/// Whether dropout keeps the score of query `head`'s row `row` at key `col`: what
/// [`dropout_keep`] computes in a kernel, on the host (for references and tests).
pub fn dropout_keeps(seed: i32, head: usize, row: usize, col: usize, kv_len: usize, rate: f64) -> bool {
    use torchtpu_dsl::random::{bits, seed_key, Numbers};
    let key = seed_key(&mut Numbers, &[seed as u32, head as u32]);
    let counter = (row as u32).wrapping_mul(kv_len as u32).wrapping_add(col as u32);
    let b = bits(&mut Numbers, &key, &0, &counter);
    (b >> 8) as i32 >= dropout_threshold(rate)
}

/// One online-softmax step of the forward: the q block's scores against kv rows `kb`, `vb`
/// (starting at key `k_start`) folded into the running max, sum and output in scratch.
#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn forward_step<T: Float>(
    qb: Tile<T>,
    kb: Tile<T>,
    vb: Tile<T>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc_scratch: &mut Scratch<f32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
    ragged: bool,
) {
    let (bq, bk) = (qb.shape()[0], kb.shape()[0]);
    let sc = scores(qb, kb, q_segments, kv_segments, bias, q_start, k_start, sm_scale, masking, false);
    let mut vb = vb;
    // The kv block overhangs the keys (its padding may hold anything: zero it, as p is 0
    // there but 0 × NaN is not).
    if ragged {
        vb = zero_outside(vb, 0, k_start, masking.kv_len);
    }
    // Masked scores are -inf, not Pallas' finite mask value, so that only visible scores
    // set the row maximum: a row whose visible scores are all -inf (an inf input) keeps
    // m = -inf, and its p = exp(-inf - -inf) is NaN, as SDPA's softmax gives.
    let s = select(sc.visible, sc.s, f32::NEG_INFINITY);
    let m_prev = m_scratch.load_at((.., 0..1));
    let l_prev = l_scratch.load_at((.., 0..1));
    let m_next = maximum(m_prev, s.max_keepdims(1));
    let alpha = online_rescale(m_prev, m_next);
    let mut p = select(sc.visible, (s - m_next).exp(), 0.0);
    let l_next = alpha * l_prev + p.sum_keepdims(1);
    if dropout.on {
        // The sum normalizes the undropped probabilities; only what reaches v is dropped.
        let head = program_id(0) * num_programs(1) + program_id(1);
        let keep = dropout_keep(seed, head, q_start, k_start, [bq, bk], masking.kv_len, dropout.threshold);
        p = select(keep, p * dropout.scale, 0.0);
    }
    acc_scratch.store(acc_scratch.load() * alpha + dot(p.cast::<T>(), vb));
    m_scratch.store(m_next.broadcast_to([bq, LANES]));
    l_scratch.store(l_next.broadcast_to([bq, LANES]));
}

/// The forward kernel. A kv block wider than `bkc` is computed `bkc` keys at a time (as
/// tokamax's `block_kv_compute`): a step's f32 scores are then `bq × bkc`, whatever the block
/// the pipeline copies, and sub-blocks right of the causal diagonal are skipped.
#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn flash_forward<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    o: &mut Ref<T>,
    lse: &mut Ref<f32>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc_scratch: &mut Scratch<f32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
    bkc: usize,
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
    let ragged = masking.kv_len % bk != 0;
    if block_visible(q_start, k_start, bq, masking) {
        if bkc >= bk {
            forward_step(
                q.load(),
                k.load(),
                v.load(),
                q_segments,
                kv_segments,
                bias,
                seed,
                m_scratch,
                l_scratch,
                acc_scratch,
                q_start,
                k_start,
                sm_scale,
                masking,
                dropout,
                ragged,
            );
        } else {
            for c in 0..Scalar::constant((bk / bkc) as i32) {
                let offset = c * bkc as i32;
                // Sub-blocks wholly past the keys, or right of the diagonal, are skipped.
                if k_start + offset < masking.kv_len as i32 {
                    if block_visible(q_start, k_start + offset, bq, masking) {
                        let (kb, vb) = (k.load_at((ds(offset, bkc), ..)), v.load_at((ds(offset, bkc), ..)));
                        forward_step(
                            q.load(),
                            kb,
                            vb,
                            q_segments,
                            kv_segments,
                            bias,
                            seed,
                            m_scratch,
                            l_scratch,
                            acc_scratch,
                            q_start,
                            k_start + offset,
                            sm_scale,
                            masking,
                            dropout,
                            ragged,
                        );
                    }
                }
            }
        }
    }
    if kj == num_programs(3) - 1 {
        let l = l_scratch.load_at((.., 0..1));
        let m = m_scratch.load_at((.., 0..1));
        // A row that sees no key at all (segments, padding, a mask) has l = 0: zeros and
        // lse = -inf (as SDPA). A NaN that reached the row (from q, k, v or sm_scale) makes l
        // NaN and stays NaN: hence `l == 0` (ordered; Mosaic has no unordered compare) picks
        // zeros.
        let acc = acc_scratch.load();
        o.store(select(l == 0.0, acc * 0.0, acc / l).cast());
        lse.store(m + l.log());
    }
}

/// What attention computes, beyond its inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    pub causal: bool,
    /// Causal alignment: false is top-left (SDPA's `is_causal`: query `i` sees keys `..=i`),
    /// true bottom-right (flash-attn's and KV-cache decoding's: the last query sees the last
    /// key; query `i` sees keys `..=i + kv_len - q_len`, none where that is negative).
    pub bottom_right: bool,
    /// Default `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// (block_q, block_k); default picks a safe size for the shapes.
    pub block: Option<(usize, usize)>,
    /// With `block`: the forward's kv sub-block (`FlashConfig::bkc`; 0, the whole block).
    pub kv_compute: usize,
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

/// Whether the forward can compute `p`'s kv blocks in sub-blocks: not with segment ids, a bias
/// or dropout, whose operands are laid out per kv block.
fn splits_kv(p: &FlashProblem) -> bool {
    !p.segments && p.bias.is_none() && p.dropout_p == 0.0
}

/// The kv sub-block of `bk`-wide blocks for `p` that `bkc` asks for: a proper divisor of `bk`
/// that is a whole number of lanes, where [`splits_kv`]; else 0, the whole block.
fn kv_compute(p: &FlashProblem, bk: usize, bkc: usize) -> usize {
    if splits_kv(p) && bkc > 0 && bkc < bk && bk % bkc == 0 && bkc % LANES == 0 {
        bkc
    } else {
        0
    }
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
    AttentionOptions { block: Some((c.bq, c.bk)), kv_compute: c.bkc, ..opts }
}

/// The problem of `shape` in `dtype` with `opts`' mask and scale, and the config `opts` names,
/// if any.
pub(crate) fn problem_and_config(shape: AttentionShape, dtype: DType, opts: AttentionOptions, segments: bool) -> (FlashProblem, Option<FlashConfig>) {
    let problem =
        FlashProblem { shape, dtype, causal: opts.causal, bottom_right: opts.bottom_right, segments, sm_scale: opts.sm_scale.map(f64::from), ..FlashProblem::plain(shape, dtype) };
    (problem, opts.block.map(|(bq, bk)| FlashConfig { bq, bk, bkc: opts.kv_compute }))
}

/// A block size for `len`: `preferred`, or the whole (8-rounded) length when shorter.
fn block_for(len: usize, preferred: usize) -> usize {
    preferred.min(len.div_ceil(8).saturating_mul(8))
}

/// One of the three attention kernels as an op; each has its own tuned blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashOp(pub FlashPass);

/// One attention call: shapes, dtype, causal mask and its alignment, whether segment ids are
/// given, the additive bias (SDPA's `attn_mask`) and whether its gradient is wanted, the
/// dropout rate, and the softmax scale (default `1 / sqrt(head_dim)`). Fields after `causal`
/// may be left out (plain attention).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlashProblem {
    #[serde(flatten)]
    pub shape: AttentionShape,
    pub dtype: DType,
    pub causal: bool,
    #[serde(default)]
    pub bottom_right: bool,
    #[serde(default)]
    pub segments: bool,
    #[serde(default)]
    pub bias: Option<BiasShape>,
    /// Whether the dQ kernel also returns the bias's gradient `[b, h, sq, sk]` (f32).
    #[serde(default)]
    pub bias_grad: bool,
    /// The probability of dropping each attention weight (seeded by the seed operand).
    #[serde(default, with = "op::float")]
    pub dropout_p: f64,
    #[serde(default, with = "op::float::option")]
    pub sm_scale: Option<f64>,
    #[serde(default)]
    pub q_layout: HeadLayout,
    #[serde(default)]
    pub k_layout: HeadLayout,
    #[serde(default)]
    pub v_layout: HeadLayout,
}

/// Where the heads of q, k or v lie in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadLayout {
    /// `[batch, heads, seq, head_dim]`, contiguous.
    #[default]
    Bhsd,
    /// Rows `[batch, seq, width · head_dim]` holding `width` heads side by side, this operand's
    /// from head `offset` on: a projection's output viewed per head without a copy
    /// (`x.view(b, s, h, d).transpose(1, 2)`; q, k and v of a fused qkv projection each at
    /// their own offset). A TPU reads a head's `head_dim` lanes of a row as one block: it needs
    /// `head_dim` a multiple of 128, or one head per row.
    Bshd { width: usize, offset: usize },
}

impl HeadLayout {
    /// The operand's shape for `heads` heads of `seq` rows.
    fn shape(self, batch: usize, heads: usize, seq: usize, head_dim: usize) -> Vec<usize> {
        match self {
            HeadLayout::Bhsd => vec![batch, heads, seq, head_dim],
            HeadLayout::Bshd { width, .. } => vec![batch, seq, width.saturating_mul(head_dim)],
        }
    }

    /// `a`, this layout's operand, as `[batch, heads, seq, head_dim]`; None if `a` is not one.
    fn to_bhsd(self, a: &ArrayD<f64>, heads: usize, head_dim: usize) -> Option<ArrayD<f64>> {
        let HeadLayout::Bshd { width, offset } = self else {
            return Some(a.clone());
        };
        let (b, s) = (*a.shape().first()?, *a.shape().get(1)?);
        let rows = a.as_standard_layout().into_owned().into_shape_with_order((b, s, width, head_dim)).ok()?;
        let heads = rows.slice(ndarray::s![.., .., offset..offset.checked_add(heads)?.min(width), ..]).permuted_axes([0, 2, 1, 3]);
        Some(heads.as_standard_layout().into_owned().into_dyn())
    }

    fn check(self, what: &str, heads: usize, head_dim: usize) -> Result<(), Error> {
        let HeadLayout::Bshd { width, offset } = self else {
            return Ok(());
        };
        if offset.checked_add(heads).is_none_or(|end| end > width) {
            return Err(Error::Shape(format!("{what}'s {heads} heads from head {offset} do not fit rows of {width} heads")));
        }
        if head_dim % LANES != 0 && width != 1 {
            return Err(Error::Shape(format!(
                "{what} read in place from rows of {width} heads needs a head_dim that is a multiple of {LANES} (a TPU reads lanes in 128s); got {head_dim}: pass it contiguous"
            )));
        }
        Ok(())
    }

    /// The spec of a `rows × head_dim` block of head `head` at row block `row_block` (of
    /// `at`'s grid index) in this layout.
    fn block<const N: usize>(self, rows: usize, head_dim: usize, at: impl Fn([Scalar<i32>; N]) -> (Scalar<i32>, Scalar<i32>, Scalar<i32>) + Send + Sync + 'static) -> BlockSpec {
        match self {
            HeadLayout::Bhsd => BlockSpec::new([None, None, Some(rows), Some(head_dim)], move |idx| {
                let (b, head, i) = at(idx);
                (b, head, i, 0)
            }),
            HeadLayout::Bshd { offset, .. } => BlockSpec::new([None, Some(rows), Some(head_dim)], move |idx| {
                let (b, head, i) = at(idx);
                (b, i, head + offset as i32)
            }),
        }
    }
}

/// An additive attention bias `[batch, heads, q_len, kv_len]` (f32), its batch and heads each
/// the problem's or 1 (broadcast; the query and key dims are never broadcast).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BiasShape {
    pub batch: usize,
    pub heads: usize,
}

impl FlashProblem {
    /// Attention over `shape` in `dtype` with no mask, bias or dropout.
    pub fn plain(shape: AttentionShape, dtype: DType) -> FlashProblem {
        FlashProblem {
            shape,
            dtype,
            causal: false,
            bottom_right: false,
            segments: false,
            bias: None,
            bias_grad: false,
            dropout_p: 0.0,
            sm_scale: None,
            q_layout: HeadLayout::Bhsd,
            k_layout: HeadLayout::Bhsd,
            v_layout: HeadLayout::Bhsd,
        }
    }

    /// q, k and v of `f` (the operands, in order) as `[batch, heads, seq, head_dim]`.
    fn qkv_bhsd(&self, f: &[ArrayD<f64>]) -> Option<[ArrayD<f64>; 3]> {
        let s = self.shape;
        Some([
            self.q_layout.to_bhsd(f.first()?, s.heads, s.head_dim)?,
            self.k_layout.to_bhsd(f.get(1)?, s.kv_heads, s.head_dim)?,
            self.v_layout.to_bhsd(f.get(2)?, s.kv_heads, s.head_dim)?,
        ])
    }

    /// How far right of top-left the causal diagonal lies: query `i` sees keys `..=i + offset`.
    pub fn causal_offset(&self) -> i32 {
        if self.bottom_right {
            (self.shape.kv_len as i64 - self.shape.q_len as i64).clamp(i32::MIN.into(), i32::MAX.into()) as i32
        } else {
            0
        }
    }

    /// The masks and bias as the f64 references take them, read from the operands (segment
    /// ids, bias, seed) at `at`, the index of the first of them.
    fn reference_masks<'a>(&self, inputs: &[HostArray], f: &'a [ArrayD<f64>], at: usize) -> ReferenceMasks<'a> {
        let segments = inputs.get(at).zip(inputs.get(at + 1)).and_then(|(qs, ks)| segment_ids_of(self, qs, ks));
        let seed = f.get(at + 3).and_then(|s| s.iter().next()).map_or(0, |&s| s as i32);
        ReferenceMasks {
            segments,
            causal: self.causal.then(|| i64::from(self.causal_offset())),
            bias: self.bias.and(f.get(at + 2)),
            dropout: (self.dropout_p > 0.0).then_some((seed, self.dropout_p)),
        }
    }

    fn scale(&self) -> f64 {
        self.sm_scale.map_or(1.0 / (self.shape.head_dim as f64).sqrt(), |s| f64::from(s as f32))
    }
}

/// The q and kv blocks, and the width the forward computes a kv block in (0: the whole block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlashConfig {
    pub bq: usize,
    pub bk: usize,
    #[serde(default)]
    pub bkc: usize,
}

/// The kv sub-block the forward's search space offers (tokamax's most common winning
/// `block_kv_compute` on v6e and tpu7x): computing 2048- and 4096-wide kv blocks 512 keys at a
/// time lets the block shapes real chips run fastest fit their VMEM.
const KV_SUB_BLOCK: usize = 512;

impl FlashConfig {
    /// `bq` × `bk` blocks, each kv block computed whole.
    pub fn new(bq: usize, bk: usize) -> FlashConfig {
        FlashConfig { bq, bk, bkc: 0 }
    }
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
        FlashProblem { causal: true, ..FlashProblem::plain(shape, DType::F32) }
    }
    fn check(&self, p: &FlashProblem) -> Result<(), Error> {
        p.shape.check()?;
        check_dtype(p.dtype)?;
        if !(0.0..=1.0).contains(&p.dropout_p) {
            return Err(Error::Shape(format!("dropout_p must be a probability in [0, 1]; got {}", p.dropout_p)));
        }
        let s = p.shape;
        p.q_layout.check("q", s.heads, s.head_dim)?;
        p.k_layout.check("k", s.kv_heads, s.head_dim)?;
        p.v_layout.check("v", s.kv_heads, s.head_dim)?;
        if p.bias_grad && p.bias.is_none() {
            return Err(Error::Shape("bias_grad asks for the gradient of a bias, but the problem has none (bias: null)".into()));
        }
        if let Some(b) = p.bias {
            let s = p.shape;
            if ![1, s.batch].contains(&b.batch) || ![1, s.heads].contains(&b.heads) {
                return Err(Error::Shape(format!("the bias's batch and heads must each be 1 or the problem's ({} and {}); got {} and {}", s.batch, s.heads, b.batch, b.heads)));
            }
        }
        Ok(())
    }
    /// The scale does not change which blocks are fastest, nor do segment ids (their mask
    /// costs the same at every block) or where the heads lie.
    fn tuning_problem(&self, p: &FlashProblem) -> FlashProblem {
        FlashProblem { sm_scale: None, segments: false, q_layout: HeadLayout::Bhsd, k_layout: HeadLayout::Bhsd, v_layout: HeadLayout::Bhsd, ..*p }
    }
    fn bucket(&self, p: &FlashProblem) -> String {
        let s = p.shape;
        format!("s{}d{}/{}/{}", tables::bucket(s.q_len.max(s.kv_len), 128, 16384), s.head_dim, if p.causal { "causal" } else { "full" }, p.dtype)
    }
    /// The forward also chooses whether to compute a kv block whole or [`KV_SUB_BLOCK`] keys at a
    /// time (which the backward kernels do not take).
    fn space(&self, p: &FlashProblem) -> SearchSpace {
        let blocks = SearchSpace::new().param("bq", block_candidates(p.shape.q_len, 4096)).param("bk", block_candidates(p.shape.kv_len, 4096));
        if self.0 != FlashPass::Forward || !splits_kv(p) {
            return blocks;
        }
        blocks.param("bkc", [0, KV_SUB_BLOCK]).constraint(|c| {
            let (bk, bkc) = (c.get("bk").unwrap_or(0), c.get("bkc").unwrap_or(0));
            (bkc != 0 && bkc >= bk).then(|| format!("a kv sub-block of {bkc} does not split a kv block of {bk}"))
        })
    }
    fn default_config(&self, p: &FlashProblem) -> FlashConfig {
        self.fit(p, FlashConfig::new(512, 512))
    }
    fn fit(&self, p: &FlashProblem, c: FlashConfig) -> FlashConfig {
        if c.bq == 0 || c.bk == 0 {
            return self.default_config(p);
        }
        let kv_len = p.shape.kv_len;
        // kv segment ids and the bias hold a kv block along lanes: a TPU takes a multiple of
        // 128 lanes, or the whole length.
        let bk = if p.segments || p.bias.is_some() {
            if c.bk >= kv_len {
                kv_len
            } else {
                c.bk.next_multiple_of(LANES).min(kv_len)
            }
        } else {
            block_for(kv_len, c.bk)
        };
        // A sub-blocked config (tuned without masks) on a problem whose kv blocks cannot be
        // split (segment ids, a bias, dropout) runs kv blocks of the sub-block's width: the
        // scores the config was feasible with.
        let bk = if c.bkc > 0 && !splits_kv(p) && c.bkc < bk { block_for(kv_len, c.bkc) } else { bk };
        FlashConfig { bq: block_for(p.shape.q_len, c.bq), bk, bkc: if self.0 == FlashPass::Forward { kv_compute(p, bk, c.bkc) } else { 0 } }
    }
    fn call(&self, p: &FlashProblem, c: &FlashConfig) -> Result<PallasCall, Error> {
        match self.0 {
            FlashPass::Forward => problem_forward_call(p, c),
            pass => problem_backward_call(pass, p, c),
        }
    }
    fn operand_types(&self, p: &FlashProblem) -> Vec<ValueType> {
        match self.0 {
            FlashPass::Forward => problem_operand_types(p, false),
            _ => problem_operand_types(p, true),
        }
    }
    /// Forward: o like q, the log-sum-exp f32 `[b, h, sq, 1]`; dK/dV: like k and v; dQ: like
    /// q, and with `bias_grad` the bias's gradient (f32 `[b, h, sq, sk]`).
    fn output_types(&self, p: &FlashProblem) -> Vec<ValueType> {
        let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim } = p.shape;
        let q = ValueType::new(p.dtype, [batch, heads, q_len, head_dim]);
        let kv = ValueType::new(p.dtype, [batch, kv_heads, kv_len, head_dim]);
        match self.0 {
            FlashPass::Forward => vec![q, ValueType::new(DType::F32, [batch, heads, q_len, 1])],
            FlashPass::BackwardDkv => vec![kv.clone(), kv],
            FlashPass::BackwardDq if p.bias_grad => vec![q, ValueType::new(DType::F32, [batch, heads, q_len, kv_len])],
            FlashPass::BackwardDq => vec![q],
        }
    }
    fn is_empty(&self, p: &FlashProblem) -> bool {
        p.shape.is_empty()
    }
    /// Zeros; the forward's log-sum-exp is [`empty_lse`]'s (masks read from the operands).
    fn empty_outputs(&self, p: &FlashProblem, inputs: &[HostArray]) -> Vec<HostArray> {
        let mut out: Vec<HostArray> = self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect();
        if self.0 == FlashPass::Forward {
            let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
            let lse = empty_lse(p.shape, &p.reference_masks(inputs, &f, 3));
            out[1] = HostArray::from(lse.insert_axis(Axis(3)));
        }
        out
    }
    /// Random q, k, v (and dO, and a bias); for the backward kernels, o and the log-sum-exp of
    /// the forward on them, as the backward assumes.
    fn random_inputs(&self, p: &FlashProblem, rng: &mut StdRng) -> Vec<HostArray> {
        let types = self.operand_types(p);
        let mut inputs: Vec<HostArray> = types.iter().map(|t| op::random_operand(rng, t)).collect();
        let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
        if let (true, 10, Some([q, k, v])) = (self.0 != FlashPass::Forward, inputs.len(), p.qkv_bhsd(&f)) {
            let (o, lse) = reference_masked(&q, &k, &v, &p.reference_masks(&inputs, &f, 6), p.scale());
            inputs[3] = HostArray::from_f64(p.dtype, &o.into_dyn());
            inputs[5] = HostArray::from_f64(DType::F32, &lse.insert_axis(Axis(3)).into_dyn());
        }
        inputs
    }
    fn reference(&self, p: &FlashProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
        let (n, at) = if self.0 == FlashPass::Forward { (7, 3) } else { (10, 6) };
        let (true, Some([q, k, v])) = (f.len() == n, p.qkv_bhsd(&f)) else {
            return Vec::new();
        };
        let masks = p.reference_masks(inputs, &f, at);
        match self.0 {
            FlashPass::Forward => {
                let (o, lse) = reference_masked(&q, &k, &v, &masks, p.scale());
                vec![o.into_dyn(), lse.insert_axis(Axis(3)).into_dyn()]
            }
            pass => {
                let grads = reference_backward_masked(&q, &k, &v, &f[4], &masks, p.scale());
                if pass == FlashPass::BackwardDkv {
                    vec![grads.dk.into_dyn(), grads.dv.into_dyn()]
                } else if p.bias_grad {
                    vec![grads.dq.into_dyn(), grads.dbias.into_dyn()]
                } else {
                    vec![grads.dq.into_dyn()]
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
                    out.push(FlashProblem { causal, ..FlashProblem::plain(shape, dtype) });
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
fn causal_kv_block(causal: Option<i32>, bq: usize, bk: usize, i: Scalar<i32>, j: Scalar<i32>) -> Scalar<i32> {
    let Some(offset) = causal else {
        return j;
    };
    minimum(j, maximum((i * bq as i32 + (bq as i32 - 1 + offset)) / bk as i32, 0))
}

/// The q block kv block `j` reads at step `i` of the dK/dV kernel: causally, q blocks above
/// the diagonal are skipped, and read as the first visible one (or the last q block when
/// none is) so they cost no copy.
fn causal_q_block(causal: Option<i32>, bq: usize, bk: usize, q_blocks: usize, i: Scalar<i32>, j: Scalar<i32>) -> Scalar<i32> {
    let Some(offset) = causal else {
        return i;
    };
    minimum(maximum(i, (j * bk as i32 - offset) / bq as i32), q_blocks as i32 - 1)
}

/// The shape of the bias operand where there is none: one tile, never read.
const UNUSED_BIAS: [usize; 4] = [1, 1, SUBLANES, LANES];

/// The seed operand: one tile of i32, its first element the seed (the rest unread).
const SEED: [usize; 2] = [SUBLANES, LANES];

/// The spec of the bias operand or its gradient for a kernel with an `N`-dim grid, whose
/// program reads q block `q_block(idx)`, kv block `kv_block(idx)` of batch `batch(idx)` and
/// query head `head(idx)`: a broadcast batch or head reads index 0.
fn bias_spec<const N: usize>(
    p: &FlashProblem,
    c: &FlashConfig,
    at: impl Fn([Scalar<i32>; N]) -> (Scalar<i32>, Scalar<i32>, Scalar<i32>, Scalar<i32>) + Send + Sync + 'static,
) -> BlockSpec {
    let Some(b) = p.bias else {
        return BlockSpec::new([None, None, Some(SUBLANES), Some(LANES)], |_: [Scalar<i32>; N]| (0, 0, 0, 0));
    };
    let (whole_batch, whole_heads) = (b.batch > 1 || p.shape.batch == 1, b.heads > 1 || p.shape.heads == 1);
    BlockSpec::new([None, None, Some(c.bq), Some(c.bk)], move |idx: [Scalar<i32>; N]| {
        let (batch, head, i, j) = at(idx);
        let zero = Scalar::<i32>::constant(0);
        (if whole_batch { batch } else { zero }, if whole_heads { head } else { zero }, i, j)
    })
}

/// The kernels' comptime values for `p` at `c`: blocks, scale, masks, dropout.
fn kernel_params(p: &FlashProblem, c: &FlashConfig) -> Result<(usize, usize, f32, Masking, Dropout), Error> {
    p.shape.check_for_kernel()?;
    let (bq, bk) = check_block((c.bq, c.bk))?;
    let scale = p.sm_scale.map_or(1.0 / (p.shape.head_dim as f32).sqrt(), |s| s as f32);
    Ok((bq, bk, scale, Masking::of(p), Dropout::of(p.dropout_p)))
}

/// The forward call for `p` at `c`: operands q, k, v, q segment ids `[b, sq, 128]`, kv segment
/// ids `[b, 8, sk]` (i32, replicated across lanes/sublanes), the bias, the seed; outputs o and
/// lse `[b, h, sq, 1]` (see [`problem_operand_types`]).
fn problem_forward_call(p: &FlashProblem, c: &FlashConfig) -> Result<PallasCall, Error> {
    let (bq, bk, scale, masking, dropout) = kernel_params(p, c)?;
    let bkc = match kv_compute(p, bk, c.bkc) {
        0 => bk,
        w => w,
    };
    let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim: d } = p.shape;
    let kernel = match p.dtype {
        DType::F32 => flash_forward::kernel::<f32>(scale, masking, dropout, bkc),
        DType::BF16 => flash_forward::kernel::<bf16>(scale, masking, dropout, bkc),
        other => return Err(Error::Dtype(format!("flash attention takes f32 or bf16, not {other}"))),
    };
    let group = (heads / kv_heads) as i32;
    let kv_block = move |i, j| causal_kv_block(masking.causal, bq, bk, i, j);
    let (q_segments, kv_segments) = segment_specs::<4>(p.segments, || {
        (BlockSpec::new([None, Some(bq), Some(LANES)], |[b, _, i, _]| (b, i, 0)), BlockSpec::new([None, Some(SUBLANES), Some(bk)], move |[b, _, i, j]| (b, 0, kv_block(i, j))))
    });
    Ok(PallasCall::new(kernel)
        .name("flash_attention_forward")
        .grid([batch, heads, q_len.div_ceil(bq), kv_len.div_ceil(bk)])
        .in_specs([
            p.q_layout.block(bq, d, |[b, h, i, _]| (b, h, i)),
            p.k_layout.block(bk, d, move |[b, h, i, j]| (b, h / group, kv_block(i, j))),
            p.v_layout.block(bk, d, move |[b, h, i, j]| (b, h / group, kv_block(i, j))),
            q_segments,
            kv_segments,
            bias_spec::<4>(p, c, move |[b, h, i, j]| (b, h, i, kv_block(i, j))),
            BlockSpec::whole(),
        ])
        .out_specs([BlockSpec::new([None, None, Some(bq), Some(d)], |[b, h, i, _]| (b, h, i, 0)), BlockSpec::new([None, None, Some(bq), Some(1)], |[b, h, i, _]| (b, h, i, 0))])
        .out_shapes([vec![batch, heads, q_len, d], vec![batch, heads, q_len, 1]])
        .scratch([Vmem::new([bq, LANES]), Vmem::new([bq, LANES]), Vmem::new([bq, d])])
        .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary]))
}

/// The forward call without bias or dropout: operands q, k, v and the segment ids (see
/// [`forward_operand_types`]); outputs o and lse `[b, h, sq, 1]`.
pub fn forward_call(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<PallasCall, Error> {
    let (problem, config) = problem_and_config(shape, dtype, opts, use_segments);
    problem_forward_call(&problem, &config_or_default(shape, config))
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

/// The operands after q, k, v (and the backward's o, dO, lse) of attention without a bias or
/// dropout: the laid-out segment ids, then the bias's and the seed's placeholders.
fn mask_operands(shape: AttentionShape, segments: Option<(&ndarray::Array2<i32>, &ndarray::Array2<i32>)>) -> Result<[HostArray; 4], Error> {
    let (qs, ks) = segment_layout(shape, segments.map(|(q, k)| (q.view(), k.view())))?;
    let bias = HostArray::from_f64(DType::F32, &ArrayD::zeros(UNUSED_BIAS.to_vec()));
    Ok([HostArray::from(qs), HostArray::from(ks), bias, HostArray::from(ndarray::Array2::<i32>::zeros(SEED))])
}

/// `config`, or the blocks a call takes when none is given.
fn config_or_default(shape: AttentionShape, config: Option<FlashConfig>) -> FlashConfig {
    config.unwrap_or(FlashConfig::new(block_for(shape.q_len, 512), block_for(shape.kv_len, 512)))
}

/// The masks, bias and dropout of an attention problem as the f64 references (and the empty
/// problems' log-sum-exp) take them: segment ids `[b, sq]` and `[b, sk]`, the causal
/// diagonal's offset, the bias `[b or 1, h or 1, sq, sk]`, and dropout's seed and rate.
#[derive(Clone, Debug, Default)]
pub struct ReferenceMasks<'a> {
    pub segments: Option<(ndarray::Array2<i32>, ndarray::Array2<i32>)>,
    pub causal: Option<i64>,
    pub bias: Option<&'a ArrayD<f64>>,
    pub dropout: Option<(i32, f64)>,
}

impl ReferenceMasks<'_> {
    /// Whether query `i` of batch `b`, head `h` sees key `j`, and the bias on its score.
    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> Option<f64> {
        if self.causal.is_some_and(|offset| j as i64 > i as i64 + offset) {
            return None;
        }
        if self.segments.as_ref().is_some_and(|(qs, ks)| qs.get((b, i)) != ks.get((b, j))) {
            return None;
        }
        let bias = self.bias.map_or(0.0, |a| {
            let (bb, bh) = (a.shape()[0], a.shape()[1]);
            a.get([if bb == 1 { 0 } else { b }, if bh == 1 { 0 } else { h }, i, j].as_slice()).copied().unwrap_or(0.0)
        });
        (bias != f64::NEG_INFINITY).then_some(bias)
    }

    /// The factor dropout applies to the weight of query `i` (batch `b`, head `h` of `heads`)
    /// on key `j`: 0 if dropped, `1 / (1 - rate)` if kept.
    fn dropout_factor(&self, b: usize, h: usize, heads: usize, i: usize, j: usize, kv_len: usize) -> f64 {
        match self.dropout {
            Some((seed, rate)) if rate > 0.0 => {
                if dropout_keeps(seed, b * heads + h, i, j, kv_len, rate) {
                    1.0 / (1.0 - rate)
                } else {
                    0.0
                }
            }
            _ => 1.0,
        }
    }
}

/// The log-sum-exp of an empty attention problem ([`AttentionShape::is_empty`]), where no
/// kernel runs: -inf for a row that sees no key; with `head_dim` 0 every score is its bias
/// (0 without one), so a row's log-sum-exp is that of the biases of the keys it sees.
pub fn empty_lse(shape: AttentionShape, masks: &ReferenceMasks) -> Array3<f32> {
    let AttentionShape { batch, heads, q_len, kv_len, .. } = shape;
    Array3::from_shape_fn((batch, heads, q_len), |(b, h, i)| {
        let scores: Vec<f64> = (0..kv_len).filter_map(|j| masks.visible(b, h, i, j)).collect();
        log_sum_exp(&scores) as f32
    })
}

fn log_sum_exp(x: &[f64]) -> f64 {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &s| a.max(s));
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|s| (s - m).exp()).sum::<f64>().ln()
}

/// Attention output and log-sum-exp (`[b, h, sq]`, f32) of q, k, v on `backend`; empty
/// problems give zeros (and the log-sum-exp of [`empty_lse`]) without running a kernel. A bias
/// or dropout: [`FlashOp`] through [`op::run`].
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
    let (problem, explicit) = problem_and_config(shape, q.dtype(), opts, segments.is_some());
    let [qs, ks, bias, seed] = mask_operands(shape, segments)?;
    let mut out = op::run(&FlashOp(FlashPass::Forward), &problem, explicit.as_ref(), &[q.clone(), k.clone(), v.clone(), qs, ks, bias, seed], backend)?;
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
    reference_masked(q, k, v, &ReferenceMasks { segments: segments.map(|(q, k)| (q.clone(), k.clone())), causal: causal.then_some(0), ..Default::default() }, sm_scale)
}

/// [`reference`] with every mask: a bias, bottom-right causal alignment, dropout.
pub fn reference_masked(q: &ArrayD<f64>, k: &ArrayD<f64>, v: &ArrayD<f64>, masks: &ReferenceMasks, sm_scale: f64) -> (Array4<f64>, Array3<f64>) {
    let (b, h, sq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hk, sk, dv) = (k.shape()[1], k.shape()[2], v.shape()[3]);
    let group = (h / hk.max(1)).max(1);
    let mut out = Array4::zeros((b, h, sq, dv));
    let mut lse = Array3::from_elem((b, h, sq), f64::NEG_INFINITY);
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / group;
            for i in 0..sq {
                let scores: Vec<(usize, f64)> = (0..sk)
                    .filter_map(|j| masks.visible(bi, hi, i, j).map(|bias| (j, (0..d).map(|c| q[[bi, hi, i, c]] * k[[bi, kh, j, c]]).sum::<f64>() * sm_scale + bias)))
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let row_lse = log_sum_exp(&scores.iter().map(|&(_, s)| s).collect::<Vec<_>>());
                lse[[bi, hi, i]] = row_lse;
                for &(j, s) in &scores {
                    let p = (s - row_lse).exp() * masks.dropout_factor(bi, hi, h, i, j, sk);
                    for c in 0..dv {
                        out[[bi, hi, i, c]] += p * v[[bi, kh, j, c]];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// What both backward kernels start from for one (q block, kv block) pair: the q, o, dO, k
/// and v blocks with their ragged rows zeroed, the scores and which of them are visible.
struct BackwardBlocks<T: Float> {
    q: Tile<T>,
    o: Tile<T>,
    d_o: Tile<T>,
    k: Tile<T>,
    v: Tile<T>,
    scores: Scores,
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
    bias: &Ref<f32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    sm_scale: f32,
    m: Masking,
) -> BackwardBlocks<T> {
    let (bq, d) = (q.shape()[0], q.shape()[1]);
    let bk = k.shape()[0];
    let (mut qb, mut ob, mut dob) = (q.load(), o.load(), d_o.load());
    if m.q_len % bq != 0 {
        let real = iota::<i32>([bq, d], 0) + q_start < m.q_len as i32;
        qb = select(real, qb, 0.0);
        ob = select(real, ob, 0.0);
        dob = select(real, dob, 0.0);
    }
    let (mut kb, mut vb) = (k.load(), v.load());
    if m.kv_len % bk != 0 {
        let real = iota::<i32>([bk, d], 0) + k_start < m.kv_len as i32;
        kb = select(real, kb, 0.0);
        vb = select(real, vb, 0.0);
    }
    let sc = scores(qb, kb, q_segments, kv_segments, bias, q_start, k_start, sm_scale, m, true);
    BackwardBlocks { q: qb, o: ob, d_o: dob, k: kb, v: vb, scores: sc }
}

/// The backward's probabilities of one block pair, and dropout's keep mask where there is
/// dropout: what reaches dV and dP is [`Probabilities::dropped`].
struct Probabilities {
    p: Tile<f32>,
    keep: Option<Tile<bool>>,
    scale: f32,
}

impl Probabilities {
    /// `x` with dropout applied: dropped entries 0, kept ones scaled by `1 / (1 - rate)`.
    fn dropped(&self, x: Tile<f32>) -> Tile<f32> {
        match self.keep {
            Some(keep) => select(keep, x * self.scale, 0.0),
            None => x,
        }
    }
}

#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn probabilities<T: Float>(
    b: &BackwardBlocks<T>,
    lse: &Ref<f32>,
    seed: &Ref<i32>,
    head: Scalar<i32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    kv_len: usize,
    dropout: Dropout,
) -> Probabilities {
    let p = select(b.scores.visible, (b.scores.s - lse.load()).exp(), 0.0);
    let keep = dropout.on.then(|| dropout_keep(seed, head, q_start, k_start, [b.q.shape()[0], b.k.shape()[0]], kv_len, dropout.threshold));
    Probabilities { p, keep, scale: dropout.scale }
}

/// dS (the gradient of the scores, and of the bias) from P and dP (dropout applied):
/// `P ∘ (dP - rowsum(dO ∘ O))`.
#[tpu_fn]
fn score_gradient<T: Float>(b: &BackwardBlocks<T>, p: Tile<f32>, dp: Tile<f32>) -> Tile<f32> {
    p * (dp - (b.o.cast::<f32>() * b.d_o.cast::<f32>()).sum_keepdims(1))
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
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    dk: &mut Ref<T>,
    dv: &mut Ref<T>,
    dk_acc: &mut Scratch<f32>,
    dv_acc: &mut Scratch<f32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
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
    if block_visible(q_start, k_start, bq, masking) {
        let b = backward_blocks(q, k, v, o, d_o, q_segments, kv_segments, bias, q_start, k_start, sm_scale, masking);
        let head = program_id(0) * (num_programs(1) * num_programs(3)) + program_id(1) * num_programs(3) + g;
        let pr = probabilities(&b, lse, seed, head, q_start, k_start, masking.kv_len, dropout);
        // Keep dV before dP: the other order keeps more blocks live, and 1024×1024 f32
        // blocks then overflow v5e's scoped VMEM.
        dv_acc.store(dv_acc.load() + dot_tn(pr.dropped(pr.p).cast::<T>(), b.d_o));
        let ds = score_gradient(&b, pr.p, pr.dropped(dot_nt(b.d_o, b.v)));
        dk_acc.store(dk_acc.load() + dot_tn(ds.cast::<T>(), b.q) * sm_scale);
    }
    if g == num_programs(3) - 1 && i == num_programs(4) - 1 {
        dk.store(dk_acc.load().cast());
        dv.store(dv_acc.load().cast());
    }
}

/// dS and the k block of one dQ program's block pair: what both dQ kernels accumulate.
struct DqStep<T: Float> {
    ds: Tile<f32>,
    k: Tile<T>,
}

#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn dq_step<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &Ref<T>,
    d_o: &Ref<T>,
    lse: &Ref<f32>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    q_start: Scalar<i32>,
    k_start: Scalar<i32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
) -> DqStep<T> {
    let b = backward_blocks(q, k, v, o, d_o, q_segments, kv_segments, bias, q_start, k_start, sm_scale, masking);
    let head = program_id(0) * num_programs(1) + program_id(1);
    let pr = probabilities(&b, lse, seed, head, q_start, k_start, masking.kv_len, dropout);
    DqStep { ds: score_gradient(&b, pr.p, pr.dropped(dot_nt(b.d_o, b.v))), k: b.k }
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
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    dq: &mut Ref<T>,
    dq_acc: &mut Scratch<f32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
) {
    let (i, j) = (program_id(2), program_id(3));
    if j == 0 {
        dq_acc.store(zeros());
    }
    let q_start = i * q.shape()[0] as i32;
    let k_start = j * k.shape()[0] as i32;
    if block_visible(q_start, k_start, q.shape()[0], masking) {
        let st = dq_step(q, k, v, o, d_o, lse, q_segments, kv_segments, bias, seed, q_start, k_start, sm_scale, masking, dropout);
        dq_acc.store(dq_acc.load() + dot(st.ds.cast::<T>(), st.k) * sm_scale);
    }
    if j == num_programs(3) - 1 {
        dq.store(dq_acc.load().cast());
    }
}

/// [`flash_backward_dq`] that also writes the bias's gradient, dS, block by block (zeros for
/// the blocks the causal mask skips).
#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn flash_backward_dq_bias<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &Ref<T>,
    d_o: &Ref<T>,
    lse: &Ref<f32>,
    q_segments: &Ref<i32>,
    kv_segments: &Ref<i32>,
    bias: &Ref<f32>,
    seed: &Ref<i32>,
    dq: &mut Ref<T>,
    d_bias: &mut Ref<f32>,
    dq_acc: &mut Scratch<f32>,
    sm_scale: f32,
    masking: Masking,
    dropout: Dropout,
) {
    let (i, j) = (program_id(2), program_id(3));
    if j == 0 {
        dq_acc.store(zeros());
    }
    let q_start = i * q.shape()[0] as i32;
    let k_start = j * k.shape()[0] as i32;
    let visible = block_visible(q_start, k_start, q.shape()[0], masking);
    if visible {
        let st = dq_step(q, k, v, o, d_o, lse, q_segments, kv_segments, bias, seed, q_start, k_start, sm_scale, masking, dropout);
        dq_acc.store(dq_acc.load() + dot(st.ds.cast::<T>(), st.k) * sm_scale);
        d_bias.store(st.ds);
    }
    if !visible {
        d_bias.store(zeros());
    }
    if j == num_programs(3) - 1 {
        dq.store(dq_acc.load().cast());
    }
}

/// One backward kernel's call for `p` at `c`; operands as [`problem_operand_types`] gives.
fn problem_backward_call(pass: FlashPass, p: &FlashProblem, c: &FlashConfig) -> Result<PallasCall, Error> {
    let (bq, bk, scale, masking, dropout) = kernel_params(p, c)?;
    let AttentionShape { batch, heads, kv_heads, q_len, kv_len, head_dim: d } = p.shape;
    let kernel = match (pass, p.dtype) {
        (FlashPass::BackwardDkv, DType::F32) => flash_backward_dkv::kernel::<f32>(scale, masking, dropout),
        (FlashPass::BackwardDkv, DType::BF16) => flash_backward_dkv::kernel::<bf16>(scale, masking, dropout),
        (FlashPass::BackwardDq, DType::F32) if p.bias_grad => flash_backward_dq_bias::kernel::<f32>(scale, masking, dropout),
        (FlashPass::BackwardDq, DType::BF16) if p.bias_grad => flash_backward_dq_bias::kernel::<bf16>(scale, masking, dropout),
        (FlashPass::BackwardDq, DType::F32) => flash_backward_dq::kernel::<f32>(scale, masking, dropout),
        (FlashPass::BackwardDq, DType::BF16) => flash_backward_dq::kernel::<bf16>(scale, masking, dropout),
        (FlashPass::Forward, _) => return Err(Error::Shape("backward_call builds the backward kernels; the forward is forward_call".into())),
        (_, other) => return Err(Error::Dtype(format!("flash attention takes f32 or bf16, not {other}"))),
    };
    let group = heads / kv_heads;
    let gi = group as i32;
    let q_block = [None, None, Some(bq), Some(d)];
    let kv_block = [None, None, Some(bk), Some(d)];
    let lse_block = [None, None, Some(bq), Some(1)];
    let q_blocks = q_len.div_ceil(bq);
    let q_at = move |i, j| causal_q_block(masking.causal, bq, bk, q_blocks, i, j);
    let kv_at = move |i, j| causal_kv_block(masking.causal, bq, bk, i, j);
    if pass == FlashPass::BackwardDkv {
        let (q_segments, kv_segments) = segment_specs::<5>(p.segments, || {
            (
                BlockSpec::new([None, Some(bq), Some(LANES)], move |[b, _, j, _, i]| (b, q_at(i, j), 0)),
                BlockSpec::new([None, Some(SUBLANES), Some(bk)], |[b, _, j, _, _]| (b, 0, j)),
            )
        });
        // One program per kv block, reducing over every q head of its group and every q block.
        return Ok(PallasCall::new(kernel)
            .name("flash_attention_backward_dkv")
            .grid([batch, kv_heads, kv_len.div_ceil(bk), group, q_blocks])
            .in_specs([
                p.q_layout.block(bq, d, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j))),
                p.k_layout.block(bk, d, |[b, h, j, _, _]| (b, h, j)),
                p.v_layout.block(bk, d, |[b, h, j, _, _]| (b, h, j)),
                BlockSpec::new(q_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                BlockSpec::new(q_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                BlockSpec::new(lse_block, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), 0)),
                q_segments,
                kv_segments,
                bias_spec::<5>(p, c, move |[b, h, j, g, i]| (b, h * gi + g, q_at(i, j), j)),
                BlockSpec::whole(),
            ])
            .out_specs([BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0)), BlockSpec::new(kv_block, |[b, h, j, _, _]| (b, h, j, 0))])
            .out_shapes([vec![batch, kv_heads, kv_len, d], vec![batch, kv_heads, kv_len, d]])
            .scratch([Vmem::new([bk, d]), Vmem::new([bk, d])])
            .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary, Arbitrary]));
    }
    let (q_segments, kv_segments) = segment_specs::<4>(p.segments, || {
        (BlockSpec::new([None, Some(bq), Some(LANES)], |[b, _, i, _]| (b, i, 0)), BlockSpec::new([None, Some(SUBLANES), Some(bk)], move |[b, _, i, j]| (b, 0, kv_at(i, j))))
    });
    let mut out_specs = vec![BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0))];
    let mut out_shapes = vec![vec![batch, heads, q_len, d]];
    if p.bias_grad {
        out_specs.push(BlockSpec::new([None, None, Some(bq), Some(bk)], |[b, h, i, j]| (b, h, i, j)));
        out_shapes.push(vec![batch, heads, q_len, kv_len]);
    }
    Ok(PallasCall::new(kernel)
        .name("flash_attention_backward_dq")
        .grid([batch, heads, q_blocks, kv_len.div_ceil(bk)])
        .in_specs([
            p.q_layout.block(bq, d, |[b, h, i, _]| (b, h, i)),
            p.k_layout.block(bk, d, move |[b, h, i, j]| (b, h / gi, kv_at(i, j))),
            p.v_layout.block(bk, d, move |[b, h, i, j]| (b, h / gi, kv_at(i, j))),
            BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new(q_block, |[b, h, i, _]| (b, h, i, 0)),
            BlockSpec::new(lse_block, |[b, h, i, _]| (b, h, i, 0)),
            q_segments,
            kv_segments,
            bias_spec::<4>(p, c, move |[b, h, i, j]| (b, h, i, kv_at(i, j))),
            BlockSpec::whole(),
        ])
        .out_specs(out_specs)
        .out_shapes(out_shapes)
        .scratch([Vmem::new([bq, d])])
        .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary]))
}

/// The two backward calls (dK/dV, then dQ) without bias or dropout, both at `opts`' block.
/// Operands of both: q, k, v, o, dO, lse `[b, h, sq, 1]`, the segment ids, a bias and a seed
/// (placeholders: see [`backward_operand_types`]).
pub fn backward_calls(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<(PallasCall, PallasCall), Error> {
    Ok((backward_call(FlashPass::BackwardDkv, shape, dtype, opts, use_segments)?, backward_call(FlashPass::BackwardDq, shape, dtype, opts, use_segments)?))
}

/// One backward kernel's call (`pass` is [`FlashPass::BackwardDkv`] or
/// [`FlashPass::BackwardDq`]); operands as for [`backward_calls`].
pub fn backward_call(pass: FlashPass, shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool) -> Result<PallasCall, Error> {
    let (problem, config) = problem_and_config(shape, dtype, opts, use_segments);
    problem_backward_call(pass, &problem, &config_or_default(shape, config))
}

/// The forward for `shape`, lowered for `chip` with its tuned block: a StableHLO module
/// running the Mosaic kernel through `tpu_custom_call` (what a TPU runtime registers), as text
/// and as a portable artifact.
pub fn forward_tpu_module(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, chip: Chip) -> Result<TpuModule, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    op::tpu_module(&FlashOp(FlashPass::Forward), &problem, explicit.as_ref(), chip)
}

/// The backward (dK/dV, then dQ) for `shape`, lowered for `chip` like [`forward_tpu_module`].
pub fn backward_tpu_modules(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, chip: Chip) -> Result<(TpuModule, TpuModule), Error> {
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

/// The kernels' operand types for `p`: q, k, v in their layouts (the backward's then o, dO and the lse
/// `[b, h, sq, 1]` f32), the laid-out segment ids ([`segment_types`]), the bias (f32
/// `[b or 1, h or 1, sq, sk]`, or a placeholder tile), the seed (an i32 tile, its first
/// element read).
pub fn problem_operand_types(p: &FlashProblem, backward: bool) -> Vec<ValueType> {
    let s = p.shape;
    let q = ValueType::new(p.dtype, [s.batch, s.heads, s.q_len, s.head_dim]);
    let in_layout = |layout: HeadLayout, heads, seq| ValueType::new(p.dtype, layout.shape(s.batch, heads, seq, s.head_dim));
    let mut types = vec![in_layout(p.q_layout, s.heads, s.q_len), in_layout(p.k_layout, s.kv_heads, s.kv_len), in_layout(p.v_layout, s.kv_heads, s.kv_len)];
    if backward {
        types.extend([q.clone(), q, ValueType::new(DType::F32, [s.batch, s.heads, s.q_len, 1])]);
    }
    types.extend(segment_types(s, p.segments));
    types.push(ValueType::new(DType::F32, p.bias.map_or(UNUSED_BIAS, |b| [b.batch, b.heads, s.q_len, s.kv_len])));
    types.push(ValueType::new(DType::I32, SEED));
    types
}

/// The backward kernels' operand types without bias or dropout (see [`problem_operand_types`]).
pub fn backward_operand_types(s: AttentionShape, dtype: DType, use_segments: bool) -> Vec<ValueType> {
    problem_operand_types(&FlashProblem { segments: use_segments, ..FlashProblem::plain(s, dtype) }, true)
}

/// The forward compiled for `shape` on a device backend, with its tuned block: upload,
/// run on device buffers and time without recompiling. Operands as for [`forward_call`].
pub fn compiled_forward(shape: AttentionShape, dtype: DType, opts: AttentionOptions, use_segments: bool, backend: Backend) -> Result<Compiled, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts, use_segments);
    op::compiled(&FlashOp(FlashPass::Forward), &problem, explicit.as_ref(), backend)
}

/// The forward's operand types without bias or dropout (see [`problem_operand_types`]).
pub fn forward_operand_types(s: AttentionShape, dtype: DType, use_segments: bool) -> Vec<ValueType> {
    problem_operand_types(&FlashProblem { segments: use_segments, ..FlashProblem::plain(s, dtype) }, false)
}

/// Gradients (dq, dk, dv) of attention given its output `o`, log-sum-exp and the output's
/// gradient. A bias or dropout: [`FlashOp`] through [`op::run`].
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
    let (problem, explicit) = problem_and_config(shape, q.dtype(), opts, segments.is_some());
    let [qs, ks, bias, seed] = mask_operands(shape, segments)?;
    let lse4 = HostArray::from(lse.clone().insert_axis(Axis(3)));
    let operands = [q.clone(), k.clone(), v.clone(), o.clone(), d_o.clone(), lse4, qs, ks, bias, seed];
    let mut dkv = op::run(&FlashOp(FlashPass::BackwardDkv), &problem, explicit.as_ref(), &operands, backend)?;
    let dq = op::run(&FlashOp(FlashPass::BackwardDq), &problem, explicit.as_ref(), &operands, backend)?;
    let missing = || Error::Shape("a backward kernel returned too few outputs".into());
    let dv = dkv.pop().ok_or_else(missing)?;
    let dk = dkv.pop().ok_or_else(missing)?;
    Ok((dq.into_iter().next().ok_or_else(missing)?, dk, dv))
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
    let g = reference_backward_masked(
        q,
        k,
        v,
        d_o,
        &ReferenceMasks { segments: segments.map(|(q, k)| (q.clone(), k.clone())), causal: causal.then_some(0), ..Default::default() },
        sm_scale,
    );
    (g.dq, g.dk, g.dv)
}

/// The gradients of attention with respect to q, k, v and the bias (`[b, h, sq, sk]`, before
/// any broadcast is summed).
pub struct Gradients {
    pub dq: Array4<f64>,
    pub dk: Array4<f64>,
    pub dv: Array4<f64>,
    pub dbias: Array4<f64>,
}

/// [`reference_backward`] with every mask, and the bias's gradient.
pub fn reference_backward_masked(q: &ArrayD<f64>, k: &ArrayD<f64>, v: &ArrayD<f64>, d_o: &ArrayD<f64>, masks: &ReferenceMasks, sm_scale: f64) -> Gradients {
    let (b, h, sq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hk, sk, dv_dim) = (k.shape()[1], k.shape()[2], v.shape()[3]);
    let group = (h / hk.max(1)).max(1);
    let mut g = Gradients { dq: Array4::zeros((b, h, sq, d)), dk: Array4::zeros((b, hk, sk, d)), dv: Array4::zeros((b, hk, sk, dv_dim)), dbias: Array4::zeros((b, h, sq, sk)) };
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / group;
            for i in 0..sq {
                let seen: Vec<(usize, f64)> = (0..sk).filter_map(|j| masks.visible(bi, hi, i, j).map(|bias| (j, bias))).collect();
                if seen.is_empty() {
                    continue;
                }
                let s: Vec<f64> = seen.iter().map(|&(j, bias)| (0..d).map(|c| q[[bi, hi, i, c]] * k[[bi, kh, j, c]]).sum::<f64>() * sm_scale + bias).collect();
                let row_lse = log_sum_exp(&s);
                let p: Vec<f64> = s.iter().map(|x| (x - row_lse).exp()).collect();
                let keep: Vec<f64> = seen.iter().map(|&(j, _)| masks.dropout_factor(bi, hi, h, i, j, sk)).collect();
                let dp: Vec<f64> = seen.iter().zip(&keep).map(|(&(j, _), f)| f * (0..dv_dim).map(|c| d_o[[bi, hi, i, c]] * v[[bi, kh, j, c]]).sum::<f64>()).collect();
                let row: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &(j, _)) in seen.iter().enumerate() {
                    let ds = p[n] * (dp[n] - row);
                    g.dbias[[bi, hi, i, j]] = ds;
                    for c in 0..dv_dim {
                        g.dv[[bi, kh, j, c]] += p[n] * keep[n] * d_o[[bi, hi, i, c]];
                    }
                    for c in 0..d {
                        g.dq[[bi, hi, i, c]] += ds * k[[bi, kh, j, c]] * sm_scale;
                        g.dk[[bi, kh, j, c]] += ds * q[[bi, hi, i, c]] * sm_scale;
                    }
                }
            }
        }
    }
    g
}
