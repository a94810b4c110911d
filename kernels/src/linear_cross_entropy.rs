//! Linear + softmax cross-entropy fused: `F.cross_entropy(h @ W.T, targets)` without the
//! `[tokens, vocab]` logits. The forward streams W in vocab blocks past each block of tokens,
//! keeping an online log-sum-exp, the target's logit and the logits' sum (for label smoothing)
//! per token; the backward recomputes each logits block and turns it straight into the
//! gradients of h (one kernel, tokens parallel, vocab reduced) and of W (one kernel, vocab
//! parallel, tokens reduced). Memory is O(tokens × block) beyond the inputs and gradients.
//!
//! The kernels know no reduction or ignored targets: the backward takes each token's scale
//! (`d loss / d loss_i`: 0 for an ignored token, `1/count` for a mean), so the host assembles
//! the loss from the three per-token statistics and the scale from the reduction.

use ndarray::{Array2, ArrayD, Axis, Ix2};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::blocks;
use crate::flash::online_rescale;
use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<T: Float>(
    h: &Ref<T>,
    w: &Ref<T>,
    targets: &Ref<i32>,
    lse: &mut Ref<f32>,
    target_logit: &mut Ref<f32>,
    logit_sum: &mut Ref<f32>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    target_scratch: &mut Scratch<f32>,
    sum_scratch: &mut Scratch<f32>,
    vocab: usize,
) {
    let (bn, bv) = (h.shape()[0], w.shape()[0]);
    let j = program_id(1);
    if j == 0 {
        m_scratch.store(full(f64::NEG_INFINITY));
        l_scratch.store(zeros());
        target_scratch.store(zeros());
        sum_scratch.store(zeros());
    }
    let z = dot_nt(h.load(), w.load());
    let cols = iota::<i32>([bn, bv], 1) + j * bv as i32;
    // W's rows past the vocab in the last block are whatever memory follows: selected away.
    let real = cols < vocab as i32;
    let masked = select(real, z, f32::NEG_INFINITY);
    let m_prev = m_scratch.load_at((.., 0..1));
    let m_next = maximum(m_prev, masked.max_keepdims(1));
    let alpha = online_rescale(m_prev, m_next);
    let p = select(real, (masked - m_next).exp(), 0.0);
    let l_next = alpha * l_scratch.load_at((.., 0..1)) + p.sum_keepdims(1);
    let hit = select(cols == targets.load(), z, 0.0).sum_keepdims(1);
    let total = select(real, z, 0.0).sum_keepdims(1);
    m_scratch.store(m_next.broadcast_to([bn, LANES]));
    l_scratch.store(l_next.broadcast_to([bn, LANES]));
    target_scratch.store((target_scratch.load_at((.., 0..1)) + hit).broadcast_to([bn, LANES]));
    sum_scratch.store((sum_scratch.load_at((.., 0..1)) + total).broadcast_to([bn, LANES]));
    if j == num_programs(1) - 1 {
        lse.store(m_next + l_next.log());
        target_logit.store(target_scratch.load_at((.., 0..1)));
        logit_sum.store(sum_scratch.load_at((.., 0..1)));
    }
}

/// The gradient of the loss for a `[bn, bv]` logits block starting at token `row0` and vocab
/// entry `col0`: `(softmax - (1-ε)·onehot - ε/V) · scale`, 0 outside the problem and for tokens
/// of scale 0 (ignored ones, whose logits may be anything).
#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn logit_gradient<T: Float>(
    h: Tile<T>,
    w: Tile<T>,
    targets: Tile<i32>,
    lse: Tile<f32>,
    scale: Tile<f32>,
    row0: Scalar<i32>,
    col0: Scalar<i32>,
    tokens: usize,
    vocab: usize,
    label_smoothing: f32,
) -> Tile<f32> {
    let (bn, bv) = (h.shape()[0], w.shape()[0]);
    let z = dot_nt(h, w);
    let rows = iota::<i32>([bn, bv], 0) + row0;
    let cols = iota::<i32>([bn, bv], 1) + col0;
    let p = (z - lse).exp() - label_smoothing / vocab as f32;
    let dz = select(cols == targets, p - (1.0 - label_smoothing), p) * scale;
    // `scale == 0` (ordered: Mosaic has no unordered compare) drops ignored tokens even where
    // their logits are NaN; a NaN scale still reaches the gradient.
    let dropped = (rows >= tokens as i32) | (cols >= vocab as i32) | (scale == 0.0);
    select(dropped, 0.0, dz)
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn dh_kernel<T: Float>(
    h: &Ref<T>,
    w: &Ref<T>,
    targets: &Ref<i32>,
    lse: &Ref<f32>,
    scale: &Ref<f32>,
    dh: &mut Ref<T>,
    acc: &mut Scratch<f32>,
    tokens: usize,
    vocab: usize,
    label_smoothing: f32,
) {
    let (bn, bv) = (h.shape()[0], w.shape()[0]);
    let (i, j) = (program_id(0), program_id(1));
    if j == 0 {
        acc.store(zeros());
    }
    let (row0, col0) = (i * bn as i32, j * bv as i32);
    let w_block = zero_outside(w.load(), 0, col0, vocab);
    let dz = logit_gradient(h.load(), w_block, targets.load(), lse.load(), scale.load(), row0, col0, tokens, vocab, label_smoothing);
    acc.store(acc.load() + dot(dz.cast::<T>(), w_block));
    if j == num_programs(1) - 1 {
        dh.store(acc.load().cast());
    }
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn dw_kernel<T: Float>(
    h: &Ref<T>,
    w: &Ref<T>,
    targets: &Ref<i32>,
    lse: &Ref<f32>,
    scale: &Ref<f32>,
    dw: &mut Ref<T>,
    acc: &mut Scratch<f32>,
    tokens: usize,
    vocab: usize,
    label_smoothing: f32,
) {
    let (bn, bv) = (h.shape()[0], w.shape()[0]);
    let (j, i) = (program_id(0), program_id(1));
    if i == 0 {
        acc.store(zeros());
    }
    let (row0, col0) = (i * bn as i32, j * bv as i32);
    let h_block = zero_outside(h.load(), 0, row0, tokens);
    let dz = logit_gradient(h_block, w.load(), targets.load(), lse.load(), scale.load(), row0, col0, tokens, vocab, label_smoothing);
    acc.store(acc.load() + dot_tn(dz.cast::<T>(), h_block));
    if i == num_programs(1) - 1 {
        dw.store(acc.load().cast());
    }
}

/// The forward (per-token statistics), or one of the backward's two gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearCrossEntropyOp {
    Forward,
    /// The gradient of the hidden states h.
    BackwardDh,
    /// The gradient of the weight W.
    BackwardDw,
}

/// h `[tokens, hidden]` and W `[vocab, hidden]` in `dtype`; the label smoothing ε in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearCrossEntropyProblem {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub dtype: DType,
    pub label_smoothing: f64,
}

/// Tokens and vocab entries per block (each spans the whole hidden dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearCrossEntropyConfig {
    pub block_tokens: usize,
    pub block_vocab: usize,
}

impl Op for LinearCrossEntropyOp {
    type Problem = LinearCrossEntropyProblem;
    type Config = LinearCrossEntropyConfig;

    fn name(&self) -> &'static str {
        match self {
            LinearCrossEntropyOp::Forward => "linear_cross_entropy",
            LinearCrossEntropyOp::BackwardDh => "linear_cross_entropy_dh",
            LinearCrossEntropyOp::BackwardDw => "linear_cross_entropy_dw",
        }
    }
    fn example(&self) -> LinearCrossEntropyProblem {
        LinearCrossEntropyProblem { tokens: 4096, hidden: 1024, vocab: 32768, dtype: DType::F32, label_smoothing: 0.0 }
    }
    fn check(&self, p: &LinearCrossEntropyProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)?;
        if !(0.0..=1.0).contains(&p.label_smoothing) {
            return Err(Error::Shape(format!("{}: label_smoothing must be in [0, 1], as F.cross_entropy's; got {}", self.name(), p.label_smoothing)));
        }
        if i32::try_from(p.vocab).is_err() || i32::try_from(p.tokens).is_err() {
            return Err(Error::Shape(format!("{}: tokens and vocab index i32 positions; got {} and {}", self.name(), p.tokens, p.vocab)));
        }
        Ok(())
    }
    /// Smoothing does not change which blocks are fastest.
    fn tuning_problem(&self, p: &LinearCrossEntropyProblem) -> LinearCrossEntropyProblem {
        LinearCrossEntropyProblem { label_smoothing: 0.0, ..*p }
    }
    /// The hidden dim sets how much of a block VMEM holds.
    fn bucket(&self, p: &LinearCrossEntropyProblem) -> String {
        format!("h{}/{}", tables::bucket(p.hidden, 128, 16384), p.dtype)
    }
    /// From 32 tokens (fewer re-read W too often to win) and one lane tile of vocab entries (the
    /// dW kernel holds three `[block_vocab, hidden]` blocks: at hidden 4096 in f32 only 128 fit
    /// v4's scoped VMEM).
    fn space(&self, p: &LinearCrossEntropyProblem) -> SearchSpace {
        let tokens = p.tokens.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(32, 512);
        let vocab = p.vocab.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(LANES, 2048);
        SearchSpace::new().param("block_tokens", blocks::powers_of_two(32, tokens)).param("block_vocab", blocks::powers_of_two(LANES, vocab))
    }
    /// h and W blocks (double-buffered) in about 8 MiB: a quarter of the rows for tokens.
    fn default_config(&self, p: &LinearCrossEntropyProblem) -> LinearCrossEntropyConfig {
        let rows = (4usize << 20) / p.hidden.max(1).saturating_mul(p.dtype.size_bytes());
        let block_tokens = blocks::largest_power_of_two_at_most(rows / 4).clamp(8, 256);
        let block_vocab = blocks::largest_power_of_two_at_most(rows.saturating_sub(block_tokens)).clamp(LANES, 2048);
        self.fit(p, LinearCrossEntropyConfig { block_tokens, block_vocab })
    }
    /// Tokens a multiple of the dtype's sublanes, vocab entries of whole lanes (or all of them);
    /// blocks of 0 give the heuristic.
    fn fit(&self, p: &LinearCrossEntropyProblem, c: LinearCrossEntropyConfig) -> LinearCrossEntropyConfig {
        if c.block_tokens == 0 || c.block_vocab == 0 {
            return self.default_config(p);
        }
        LinearCrossEntropyConfig {
            block_tokens: blocks::whole_tiles(c.block_tokens, p.tokens, sublanes(p.dtype)),
            block_vocab: blocks::whole_tiles_or_span(c.block_vocab, p.vocab, LANES),
        }
    }
    fn call(&self, p: &LinearCrossEntropyProblem, c: &LinearCrossEntropyConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.block_tokens == 0 || c.block_vocab == 0 {
            return Err(Error::Shape(format!("{}: a kernel call needs tokens, hidden, vocab and blocks (the host API handles empty problems): {p:?} at {c:?}", self.name())));
        }
        let (bn, bv, hd) = (c.block_tokens, c.block_vocab, p.hidden);
        let (token_blocks, vocab_blocks) = (p.tokens.div_ceil(bn), p.vocab.div_ceil(bv));
        let eps = p.label_smoothing as f32;
        let f32_kernel = p.dtype == DType::F32;
        let call = match self {
            LinearCrossEntropyOp::Forward => {
                let kernel = if f32_kernel { forward_kernel::kernel::<f32>(p.vocab) } else { forward_kernel::kernel::<bf16>(p.vocab) };
                let per_token = || BlockSpec::new([bn, 1], |[i, _j]| (i, 0));
                PallasCall::new(kernel)
                    .grid([token_blocks, vocab_blocks])
                    .dimension_semantics([Parallel, Arbitrary])
                    .in_specs([BlockSpec::new([bn, hd], |[i, _j]| (i, 0)), BlockSpec::new([bv, hd], |[_i, j]| (j, 0)), per_token()])
                    .out_specs([per_token(), per_token(), per_token()])
                    .scratch([Vmem::new([bn, LANES]), Vmem::new([bn, LANES]), Vmem::new([bn, LANES]), Vmem::new([bn, LANES])])
            }
            LinearCrossEntropyOp::BackwardDh => {
                let kernel = if f32_kernel { dh_kernel::kernel::<f32>(p.tokens, p.vocab, eps) } else { dh_kernel::kernel::<bf16>(p.tokens, p.vocab, eps) };
                let per_token = || BlockSpec::new([bn, 1], |[i, _j]| (i, 0));
                PallasCall::new(kernel)
                    .grid([token_blocks, vocab_blocks])
                    .dimension_semantics([Parallel, Arbitrary])
                    .in_specs([BlockSpec::new([bn, hd], |[i, _j]| (i, 0)), BlockSpec::new([bv, hd], |[_i, j]| (j, 0)), per_token(), per_token(), per_token()])
                    .out_specs([BlockSpec::new([bn, hd], |[i, _j]| (i, 0))])
                    .scratch([Vmem::new([bn, hd])])
            }
            LinearCrossEntropyOp::BackwardDw => {
                let kernel = if f32_kernel { dw_kernel::kernel::<f32>(p.tokens, p.vocab, eps) } else { dw_kernel::kernel::<bf16>(p.tokens, p.vocab, eps) };
                let per_token = || BlockSpec::new([bn, 1], |[_j, i]| (i, 0));
                PallasCall::new(kernel)
                    .grid([vocab_blocks, token_blocks])
                    .dimension_semantics([Parallel, Arbitrary])
                    .in_specs([BlockSpec::new([bn, hd], |[_j, i]| (i, 0)), BlockSpec::new([bv, hd], |[j, _i]| (j, 0)), per_token(), per_token(), per_token()])
                    .out_specs([BlockSpec::new([bv, hd], |[j, _i]| (j, 0))])
                    .scratch([Vmem::new([bv, hd])])
            }
        };
        Ok(call.name(self.name()).out_shapes(self.output_types(p).into_iter().map(|t| t.shape)))
    }
    /// h, W, the targets (i32 `[tokens, 1]`); the backward adds the forward's log-sum-exp and
    /// each token's scale (f32 `[tokens, 1]`).
    fn operand_types(&self, p: &LinearCrossEntropyProblem) -> Vec<ValueType> {
        let per_token = |dtype| ValueType::new(dtype, [p.tokens, 1]);
        let mut types = vec![ValueType::new(p.dtype, [p.tokens, p.hidden]), ValueType::new(p.dtype, [p.vocab, p.hidden]), per_token(DType::I32)];
        if *self != LinearCrossEntropyOp::Forward {
            types.extend([per_token(DType::F32), per_token(DType::F32)]);
        }
        types
    }
    /// Forward: each token's log-sum-exp of its logits, its target's logit (0 for a target out
    /// of the vocab: an ignored one) and the sum of its logits, f32 `[tokens, 1]` each;
    /// backward: dh like h, or dW like W.
    fn output_types(&self, p: &LinearCrossEntropyProblem) -> Vec<ValueType> {
        match self {
            LinearCrossEntropyOp::Forward => vec![ValueType::new(DType::F32, [p.tokens, 1]); 3],
            LinearCrossEntropyOp::BackwardDh => vec![ValueType::new(p.dtype, [p.tokens, p.hidden])],
            LinearCrossEntropyOp::BackwardDw => vec![ValueType::new(p.dtype, [p.vocab, p.hidden])],
        }
    }
    fn is_empty(&self, p: &LinearCrossEntropyProblem) -> bool {
        [p.tokens, p.hidden, p.vocab].contains(&0)
    }
    /// What F.cross_entropy gives when there is nothing to sum: no logits (vocab 0) has a
    /// log-sum-exp of -inf; zero logits (hidden 0) are all 0, so log(vocab).
    fn empty_outputs(&self, p: &LinearCrossEntropyProblem, _inputs: &[HostArray]) -> Vec<HostArray> {
        let mut out: Vec<HostArray> = self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect();
        if *self == LinearCrossEntropyOp::Forward {
            let lse = if p.vocab == 0 { f64::NEG_INFINITY } else { (p.vocab as f64).ln() };
            out[0] = HostArray::from_f64(DType::F32, &ArrayD::from_elem(vec![p.tokens, 1], lse));
        }
        out
    }
    /// Random h and W (scaled so logits are O(1)); targets in the vocab, every fifth ignored
    /// (-100); for the backward, the forward's log-sum-exp and a mean's scales.
    fn random_inputs(&self, p: &LinearCrossEntropyProblem, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        use rand::Rng;
        let types = self.operand_types(p);
        let h = op::random_operand(rng, &types[0]);
        let w = HostArray::from_f64(p.dtype, &(op::random_operand(rng, &types[1]).to_f64() / (p.hidden.max(1) as f64).sqrt()));
        let targets = HostArray::from(Array2::from_shape_fn((p.tokens, 1), |(i, _)| if i % 5 == 4 { -100 } else { rng.random_range(0..p.vocab.max(1)) as i32 }));
        let mut inputs = vec![h, w, targets];
        if *self != LinearCrossEntropyOp::Forward {
            let (Ok(h), Ok(w)) = (inputs[0].to_f64().into_dimensionality::<Ix2>(), inputs[1].to_f64().into_dimensionality::<Ix2>()) else { return inputs };
            let lse = reference_lse(&h.dot(&w.t()));
            let kept = (0..p.tokens).filter(|i| i % 5 != 4).count().max(1) as f64;
            let scale = Array2::from_shape_fn((p.tokens, 1), |(i, _)| if i % 5 == 4 { 0.0 } else { 1.0 / kept });
            inputs.push(HostArray::from_f64(DType::F32, &lse.insert_axis(Axis(1)).into_dyn()));
            inputs.push(HostArray::from_f64(DType::F32, &scale.into_dyn()));
        }
        inputs
    }
    fn reference(&self, p: &LinearCrossEntropyProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let two = |a: &HostArray| a.to_f64().into_dimensionality::<Ix2>().ok();
        let (Some(h), Some(w), Some(t)) = (inputs.first().and_then(two), inputs.get(1).and_then(two), inputs.get(2).and_then(two)) else { return Vec::new() };
        let z = h.dot(&w.t());
        let targets: Vec<i64> = t.column(0).iter().map(|&x| x as i64).collect();
        match self {
            LinearCrossEntropyOp::Forward => {
                let lse = reference_lse(&z);
                let hit = ndarray::Array1::from_shape_fn(p.tokens, |i| usize::try_from(targets[i]).ok().and_then(|c| z.row(i).get(c).copied()).unwrap_or(0.0));
                let sum = z.sum_axis(Axis(1));
                [lse, hit, sum].into_iter().map(|a| a.insert_axis(Axis(1)).into_dyn()).collect()
            }
            _ => {
                let Some(scale) = inputs.get(4).and_then(two) else { return Vec::new() };
                let dz = reference_logit_gradient(&z, &targets, scale.column(0).as_slice().unwrap_or(&[]), p.label_smoothing);
                if *self == LinearCrossEntropyOp::BackwardDh {
                    vec![dz.dot(&w).into_dyn()]
                } else {
                    vec![dz.t().dot(&h).into_dyn()]
                }
            }
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<LinearCrossEntropyProblem> {
        let problem = |dtype, hidden, tokens, vocab| LinearCrossEntropyProblem { tokens, hidden, vocab, dtype, label_smoothing: 0.0 };
        match target {
            TableTarget::Cpu => vec![problem(DType::F32, 512, 512, 4096), problem(DType::F32, 1024, 256, 4096)],
            TableTarget::Chip(_) => [DType::BF16, DType::F32].into_iter().flat_map(|dtype| [1024, 4096].map(|hidden| problem(dtype, hidden, 8192, 32768))).collect(),
        }
    }
}

/// Each row's log-sum-exp, in f64.
pub fn reference_lse(z: &Array2<f64>) -> ndarray::Array1<f64> {
    z.map_axis(Axis(1), |row| {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
    })
}

/// `d loss / d z` for logits `z`: per token `(softmax - (1-ε)·onehot(target) - ε/V) · scale`,
/// in f64 from the definitions.
pub fn reference_logit_gradient(z: &Array2<f64>, targets: &[i64], scale: &[f64], label_smoothing: f64) -> Array2<f64> {
    let lse = reference_lse(z);
    let vocab = z.ncols() as f64;
    Array2::from_shape_fn(z.dim(), |(i, c)| {
        let s = scale.get(i).copied().unwrap_or(0.0);
        if s == 0.0 {
            return 0.0;
        }
        let onehot = if targets.get(i).copied() == Some(c as i64) { 1.0 - label_smoothing } else { 0.0 };
        ((z[[i, c]] - lse[i]).exp() - onehot - label_smoothing / vocab) * s
    })
}
