//! Ring attention (sequence parallelism) as SPMD programs: q, k and v split along the sequence
//! over one mesh axis; the kv shards travel round the ring (`collective_permute`, one step per
//! device) while each device runs the flash kernels on its own q shard against each kv shard
//! in turn. The forward merges the partial softmaxes by their log-sum-exps; the backward runs
//! the flash backward kernels against the full log-sum-exp, so each step's gradients are exact
//! parts of the whole, and sends the kv gradients round with their shards, home after the last
//! step.
//!
//! Causal attention (top-left, q and kv of one length) skips, under a `stablehlo.if` on the
//! device's ring position, what the mask hides. With the sequence split into contiguous
//! shards ([`RingLayout::Contiguous`]), step 0 is the causal diagonal and a later shard is
//! attended in full or not at all: the last device works every step, the first only on its
//! diagonal. [`RingLayout::Zigzag`] (as Llama 3's context parallelism and ring-flash-attention)
//! gives device `d` the chunks `d` and `2n - 1 - d` of `2n`: every device then does the same
//! work every step — its whole q against the first chunk of an earlier device's kv, or its
//! second chunk of q against all of a later device's kv. The caller lays the sequence out in
//! [`zigzag_order`].

use torchtpu_codegen::{tensor_type as tensor, Mesh, PartitionSpec, SpmdModule, SpmdProgram};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, TracedCall};

use crate::flash::{problem_and_config, AttentionOptions, AttentionShape, FlashOp, FlashPass};
use crate::op::traced_for;
use crate::tables::TableTarget;
use crate::Error;

/// The most devices a ring may have: its program holds a step per device, each rotation
/// naming every device.
pub const MAX_RING: usize = 256;

/// An f32 -inf as MLIR spells it: the log-sum-exp of no keys.
const NEG_INFINITY: &str = "0xFF800000";

/// How the sequence is laid over the ring's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingLayout {
    /// Device `d` holds tokens `d·s/n .. (d+1)·s/n`.
    #[default]
    Contiguous,
    /// Device `d` holds chunks `d` and `2n - 1 - d` of `2n` (see [`zigzag_order`]): balanced
    /// causal work. Without a causal mask it is run as [`RingLayout::Contiguous`] (attention
    /// does not care how the keys are ordered).
    Zigzag,
}

/// The token order of [`RingLayout::Zigzag`] over `devices`: position `i` of the laid-out
/// sequence holds token `order[i]`. Lay q, k, v (and the positions a rotary embedding uses)
/// out as `x[order[i]]` before the call, and put the outputs back with `out[order[i]] = y[i]`.
pub fn zigzag_order(len: usize, devices: usize) -> Result<Vec<usize>, Error> {
    let chunks = devices
        .checked_mul(2)
        .filter(|&c| c > 0 && len % c == 0)
        .ok_or_else(|| Error::Shape(format!("a zigzag layout over {devices} devices needs a length divisible by {}; got {len}", devices.saturating_mul(2))))?;
    let c = len / chunks;
    Ok((0..devices).flat_map(|d| [d, chunks - 1 - d]).flat_map(|chunk| chunk * c..(chunk + 1) * c).collect())
}

/// A ring-attention problem: the whole arrays' shapes, the mesh and the axis the sequence is
/// split over (the ring), and how it is laid out. Other mesh axes may split the batch and the
/// heads (q and kv heads together, so each device keeps whole GQA groups); axes named by none
/// of them hold copies.
pub struct Ring<'m> {
    pub mesh: &'m Mesh,
    pub axis: &'m str,
    pub shape: AttentionShape,
    pub dtype: DType,
    pub opts: AttentionOptions,
    pub layout: RingLayout,
    /// The mesh axis the batch is split over, if any.
    pub batch_axis: Option<&'m str>,
    /// The mesh axis the heads are split over, if any.
    pub heads_axis: Option<&'m str>,
}

fn f32_type(shape: &[usize]) -> ValueType {
    ValueType::new(DType::F32, shape.to_vec())
}

/// What a causal step after the first runs where the device's ring position says it sees the
/// shard (`seen`) and where it does not.
enum Hidden {
    /// Contiguous shards: all of a seen shard, nothing of another.
    Whole,
    /// Zigzag: all of q against the first chunk of a seen shard (`lower`); the second chunk of
    /// q against all of another (`upper`).
    Halves { lower: Box<TracedCall>, upper: Box<TracedCall>, chunk: usize },
}

impl Ring<'_> {
    /// Devices round the ring.
    fn devices(&self) -> Result<usize, Error> {
        Ok(usize::try_from(self.mesh.size(self.axis)?).unwrap_or(usize::MAX))
    }

    /// One device's shapes, after checking what the ring needs.
    fn shard(&self) -> Result<AttentionShape, Error> {
        let s = self.shape;
        s.check()?;
        let n = self.devices()?;
        if s.is_empty() {
            return Err(Error::Shape(format!("ring attention needs non-empty shapes; got {s:?}")));
        }
        if self.opts.causal && s.q_len != s.kv_len {
            return Err(Error::Shape(format!("causal ring attention needs q and kv of one length (self-attention); got {} and {}", s.q_len, s.kv_len)));
        }
        if n > MAX_RING {
            return Err(Error::Shape(format!("ring attention unrolls a step per device; {n} devices on axis `{}` is more than the {MAX_RING} it takes", self.axis)));
        }
        let parts = if self.zigzag() { 2 * n } else { n };
        if s.q_len % parts != 0 || s.kv_len % parts != 0 {
            return Err(Error::Shape(format!("{:?} ring attention over {n} devices needs q_len and kv_len divisible by {parts}; got {} and {}", self.layout, s.q_len, s.kv_len)));
        }
        let named = [Some(self.axis), self.batch_axis, self.heads_axis];
        if let Some(twice) = named.iter().enumerate().find_map(|(i, a)| a.filter(|a| named[..i].contains(&Some(*a)))) {
            return Err(Error::Shape(format!("mesh axis `{twice}` is named twice among the ring's, the batch's and the heads' axes; each needs its own")));
        }
        let split = |axis: Option<&str>| -> Result<usize, Error> { Ok(axis.map(|a| self.mesh.size(a)).transpose()?.map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))) };
        let (nb, nh) = (split(self.batch_axis)?, split(self.heads_axis)?);
        if s.batch % nb != 0 {
            return Err(Error::Shape(format!("a batch of {} does not split evenly over the {nb} devices of axis `{}`", s.batch, self.batch_axis.unwrap_or_default())));
        }
        if s.heads % nh != 0 || s.kv_heads % nh != 0 {
            return Err(Error::Shape(format!(
                "{} q heads and {} kv heads do not split evenly over the {nh} devices of axis `{}` (each device needs whole GQA groups)",
                s.heads,
                s.kv_heads,
                self.heads_axis.unwrap_or_default()
            )));
        }
        Ok(AttentionShape { batch: s.batch / nb, heads: s.heads / nh, kv_heads: s.kv_heads / nh, q_len: s.q_len / n, kv_len: s.kv_len / n, ..s })
    }

    fn zigzag(&self) -> bool {
        self.opts.causal && self.layout == RingLayout::Zigzag
    }

    /// `pass` on `shape`, causal (the diagonal step) or not, traced with its config on `target`.
    fn kernel(&self, pass: FlashPass, causal: bool, shape: AttentionShape, target: TableTarget) -> Result<TracedCall, Error> {
        let opts = AttentionOptions { causal, bottom_right: false, ..self.opts };
        let (problem, explicit) = problem_and_config(shape, self.dtype, opts, false);
        traced_for(&FlashOp(pass), &problem, explicit.as_ref(), target)
    }

    /// What causal steps after the first run of `pass` (see [`Hidden`]).
    fn hidden(&self, pass: FlashPass, shard: AttentionShape, target: TableTarget) -> Result<Hidden, Error> {
        if !self.zigzag() {
            return Ok(Hidden::Whole);
        }
        let chunk = shard.q_len / 2;
        Ok(Hidden::Halves {
            lower: Box::new(self.kernel(pass, false, AttentionShape { kv_len: chunk, ..shard }, target)?),
            upper: Box::new(self.kernel(pass, false, AttentionShape { q_len: chunk, ..shard }, target)?),
            chunk,
        })
    }

    /// A program in `target`'s form: TPU kernels for a chip, portable ones for the CPU.
    fn program(&self, target: TableTarget) -> SpmdProgram<'_> {
        match target {
            TableTarget::Cpu => SpmdProgram::portable(self.mesh),
            TableTarget::Chip(_) => SpmdProgram::new(self.mesh),
        }
    }

    /// The partition spec of a `[b, h, seq, x]` array: the sequence over the ring's axis, the
    /// batch and heads over theirs.
    fn spec(&self) -> PartitionSpec {
        PartitionSpec::new([self.batch_axis, self.heads_axis, Some(self.axis), None])
    }

    fn global(&self, heads: usize, seq: usize, last: usize, dtype: DType) -> ValueType {
        ValueType::new(dtype, [self.shape.batch, heads, seq, last])
    }

    /// The forward program: q, k, v (whole, sequence-sharded) in; o and the log-sum-exp
    /// `[b, h, sq, 1]` (f32) out.
    pub fn forward(&self, target: TableTarget) -> Result<SpmdModule, Error> {
        let s = self.shape;
        let n = self.devices()?;
        let shard = self.shard()?;
        let full = self.kernel(FlashPass::Forward, false, shard, target)?;
        let diagonal = if self.opts.causal { self.kernel(FlashPass::Forward, true, shard, target)? } else { full.clone() };
        let hidden = self.hidden(FlashPass::Forward, shard, target)?;
        let spec = self.spec();
        let mut p = self.program(target);
        let q = p.input("q", &self.global(s.heads, s.q_len, s.head_dim, self.dtype), &spec)?;
        let mut k = p.input("k", &self.global(s.kv_heads, s.kv_len, s.head_dim, self.dtype), &spec)?;
        let mut v = p.input("v", &self.global(s.kv_heads, s.kv_len, s.head_dim, self.dtype), &spec)?;
        let [q_type, kv_type] = [0, 1].map(|i| ValueType::new(self.dtype, shard_shape(&full, i)));
        let [o_type, lse_type] = [&full.outputs[0].array, &full.outputs[1].array].map(Clone::clone);
        let position = if self.opts.causal { Some(p.axis_index(self.axis)?) } else { None };
        let mut state: Option<(String, String)> = None;
        for step in 0..n {
            if step > 0 {
                k = p.rotate(&k, &kv_type, self.axis, 1)?;
                v = p.rotate(&v, &kv_type, self.axis, 1)?;
            }
            let call = if step == 0 { &diagonal } else { &full };
            let out = match &position {
                Some(position) if step > 0 => {
                    let seen = ahead_of(&mut p, position, step);
                    let types = [o_type.clone(), lse_type.clone()];
                    match &hidden {
                        // Nothing of a shard after this device's queries is seen: no output, no mass.
                        Hidden::Whole => {
                            p.branch::<Error>(&seen, &types, |p| attend(p, call, [&q, &k, &v]), |p| Ok(vec![constant(p, &o_type, "0.0"), constant(p, &lse_type, NEG_INFINITY)]))?
                        }
                        Hidden::Halves { lower, upper, chunk } => p.branch::<Error>(
                            &seen,
                            &types,
                            |p| {
                                let (ka, va) = (slice_seq(p, &k, &kv_type, 0, *chunk), slice_seq(p, &v, &kv_type, 0, *chunk));
                                attend(p, lower, [&q, &ka, &va])
                            },
                            |p| {
                                let qb = slice_seq(p, &q, &q_type, *chunk, *chunk);
                                let out = attend(p, upper, [&qb, &k, &v])?;
                                let [o_b, lse_b] = [&upper.outputs[0].array, &upper.outputs[1].array];
                                let (o_a, lse_a) = (constant(p, o_b, "0.0"), constant(p, lse_b, NEG_INFINITY));
                                Ok(vec![concat_seq(p, (&o_a, o_b), (&out[0], o_b)), concat_seq(p, (&lse_a, lse_b), (&out[1], lse_b))])
                            },
                        )?,
                    }
                }
                _ => attend(&mut p, call, [&q, &k, &v])?,
            };
            let o = convert(&mut p, &out[0], &o_type, DType::F32);
            let lse = out[1].clone();
            state = Some(match state {
                None => (o, lse),
                Some((acc, acc_lse)) => merge(&mut p, (&acc, &acc_lse), (&o, &lse), &o_type.shape, &lse_type.shape),
            });
        }
        let (o, lse) = state.ok_or_else(|| Error::Shape("ring attention over no devices".into()))?;
        let o = convert(&mut p, &o, &f32_type(&o_type.shape), self.dtype);
        Ok(p.finish("ring_attention_forward", &[(o, o_type, spec.clone()), (lse, lse_type, spec)])?)
    }

    /// The backward program: q, k, v, o, dO and the log-sum-exp (whole, sequence-sharded) in;
    /// dq, dk, dv out.
    pub fn backward(&self, target: TableTarget) -> Result<SpmdModule, Error> {
        let s = self.shape;
        let n = self.devices()?;
        let shard = self.shard()?;
        let [dkv_full, dq_full] = [FlashPass::BackwardDkv, FlashPass::BackwardDq].map(|pass| self.kernel(pass, false, shard, target));
        let (dkv_full, dq_full) = (dkv_full?, dq_full?);
        let (dkv_diagonal, dq_diagonal) = if self.opts.causal {
            (self.kernel(FlashPass::BackwardDkv, true, shard, target)?, self.kernel(FlashPass::BackwardDq, true, shard, target)?)
        } else {
            (dkv_full.clone(), dq_full.clone())
        };
        let (dkv_hidden, dq_hidden) = (self.hidden(FlashPass::BackwardDkv, shard, target)?, self.hidden(FlashPass::BackwardDq, shard, target)?);
        let spec = self.spec();
        let mut p = self.program(target);
        let q_global = self.global(s.heads, s.q_len, s.head_dim, self.dtype);
        let kv_global = self.global(s.kv_heads, s.kv_len, s.head_dim, self.dtype);
        let q = p.input("q", &q_global, &spec)?;
        let mut k = p.input("k", &kv_global, &spec)?;
        let mut v = p.input("v", &kv_global, &spec)?;
        let o = p.input("o", &q_global, &spec)?;
        let d_o = p.input("dO", &q_global, &spec)?;
        let lse = p.input("lse", &self.global(s.heads, s.q_len, 1, DType::F32), &spec)?;
        let (q_shard, kv_shard) = (shard_shape(&dq_full, 0), shard_shape(&dkv_full, 1));
        let (q_type, kv_type) = (ValueType::new(self.dtype, q_shard.clone()), ValueType::new(self.dtype, kv_shard.clone()));
        let lse_type = f32_type(&shard_shape(&dq_full, 5));
        let types = [q_type.clone(), kv_type.clone(), kv_type.clone()];
        let position = if self.opts.causal { Some(p.axis_index(self.axis)?) } else { None };
        let (mut dq, mut dk, mut dv): (Option<String>, Option<String>, Option<String>) = (None, None, None);
        for step in 0..n {
            if step > 0 {
                k = p.rotate(&k, &kv_type, self.axis, 1)?;
                v = p.rotate(&v, &kv_type, self.axis, 1)?;
            }
            let (dkv_call, dq_call) = if step == 0 { (&dkv_diagonal, &dq_diagonal) } else { (&dkv_full, &dq_full) };
            // Each step's (dq, dk, dv), of `types`.
            let parts = match (&position, &dkv_hidden, &dq_hidden) {
                (Some(position), Hidden::Whole, _) if step > 0 => {
                    // A shard after this device's queries gets no gradient from them.
                    let seen = ahead_of(&mut p, position, step);
                    p.branch::<Error>(&seen, &types, |p| gradients(p, dkv_call, dq_call, [&q, &k, &v, &o, &d_o, &lse]), |p| Ok(zeros(p, types.iter())))?
                }
                (Some(position), Hidden::Halves { lower: dkv_lower, upper: dkv_upper, chunk }, Hidden::Halves { lower: dq_lower, upper: dq_upper, .. }) if step > 0 => {
                    let seen = ahead_of(&mut p, position, step);
                    let c = *chunk;
                    let half = |t: &ValueType| ValueType::new(t.dtype, [t.shape[0], t.shape[1], c, t.shape[3]]);
                    p.branch::<Error>(
                        &seen,
                        &types,
                        |p| {
                            let (ka, va) = (slice_seq(p, &k, &kv_type, 0, c), slice_seq(p, &v, &kv_type, 0, c));
                            let g = gradients(p, dkv_lower, dq_lower, [&q, &ka, &va, &o, &d_o, &lse])?;
                            let none = constant(p, &half(&kv_type), "0.0");
                            Ok(vec![
                                g[0].clone(),
                                concat_seq(p, (&g[1], &half(&kv_type)), (&none, &half(&kv_type))),
                                concat_seq(p, (&g[2], &half(&kv_type)), (&none, &half(&kv_type))),
                            ])
                        },
                        |p| {
                            let [qb, ob, d_ob] = [&q, &o, &d_o].map(|x| slice_seq(p, x, &q_type, c, c));
                            let lse_b = slice_seq(p, &lse, &lse_type, c, c);
                            let g = gradients(p, dkv_upper, dq_upper, [&qb, &k, &v, &ob, &d_ob, &lse_b])?;
                            let none = constant(p, &half(&q_type), "0.0");
                            Ok(vec![concat_seq(p, (&none, &half(&q_type)), (&g[0], &half(&q_type))), g[1].clone(), g[2].clone()])
                        },
                    )?
                }
                _ => gradients(&mut p, dkv_call, dq_call, [&q, &k, &v, &o, &d_o, &lse])?,
            };
            let add = |p: &mut SpmdProgram, acc: Option<String>, part: &str, shape: &[usize]| {
                let part = convert(p, part, &ValueType::new(self.dtype, shape.to_vec()), DType::F32);
                let t = tensor(&f32_type(shape));
                match acc {
                    None => part,
                    Some(acc) => p.op(|r| format!("{r} = stablehlo.add {acc}, {part} : {t}")),
                }
            };
            dq = Some(add(&mut p, dq.take(), &parts[0], &q_shard));
            dk = Some(add(&mut p, dk.take(), &parts[1], &kv_shard));
            dv = Some(add(&mut p, dv.take(), &parts[2], &kv_shard));
            // The kv gradients travel with their shards; after the last step, home.
            let kv_f32 = f32_type(&kv_shard);
            dk = dk.map(|g| p.rotate(&g, &kv_f32, self.axis, 1)).transpose()?;
            dv = dv.map(|g| p.rotate(&g, &kv_f32, self.axis, 1)).transpose()?;
        }
        let missing = || Error::Shape("ring attention over no devices".into());
        let dq = convert(&mut p, &dq.ok_or_else(missing)?, &f32_type(&q_shard), self.dtype);
        let dk = convert(&mut p, &dk.ok_or_else(missing)?, &f32_type(&kv_shard), self.dtype);
        let dv = convert(&mut p, &dv.ok_or_else(missing)?, &f32_type(&kv_shard), self.dtype);
        Ok(p.finish("ring_attention_backward", &[(dq, q_type, spec.clone()), (dk, kv_type.clone(), spec.clone()), (dv, kv_type, spec)])?)
    }
}

/// The forward kernel `call` on q, k, v (and zeros for the operands it does not read): o and
/// the log-sum-exp.
fn attend(p: &mut SpmdProgram, call: &TracedCall, qkv: [&String; 3]) -> Result<Vec<String>, Error> {
    let mut operands: Vec<String> = qkv.into_iter().cloned().collect();
    operands.extend(zeros(p, call.operand_types().skip(3)));
    Ok(p.kernel(call, &operands)?)
}

/// The backward kernels on q, k, v, o, dO and the log-sum-exp (and zeros for the operands they
/// do not read): dq, dk, dv.
fn gradients(p: &mut SpmdProgram, dkv: &TracedCall, dq: &TracedCall, inputs: [&String; 6]) -> Result<Vec<String>, Error> {
    let mut operands: Vec<String> = inputs.into_iter().cloned().collect();
    operands.extend(zeros(p, dkv.operand_types().skip(6)));
    let dkv = p.kernel(dkv, &operands)?;
    let dq = p.kernel(dq, &operands)?;
    Ok([&dq[0], &dkv[0], &dkv[1]].map(Clone::clone).to_vec())
}

/// Rows `start .. start + len` of `x`, a `[b, h, seq, x]` value of type `t`, along the sequence.
fn slice_seq(p: &mut SpmdProgram, x: &str, t: &ValueType, start: usize, len: usize) -> String {
    let [b, h, _, d] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
    let part = ValueType::new(t.dtype, [b, h, len, d]);
    p.op(|r| {
        format!(
            "{r} = \"stablehlo.slice\"({x}) {{start_indices = array<i64: 0, 0, {start}, 0>, limit_indices = array<i64: {b}, {h}, {}, {d}>, strides = array<i64: 1, 1, 1, 1>}} : ({}) -> {}",
            start + len,
            tensor(t),
            tensor(&part)
        )
    })
}

/// `a` then `b` (values of types `ta`, `tb`: `[b, h, seq, x]`) along the sequence.
fn concat_seq(p: &mut SpmdProgram, (a, ta): (&str, &ValueType), (b, tb): (&str, &ValueType)) -> String {
    let joined = ValueType::new(ta.dtype, [ta.shape[0], ta.shape[1], ta.shape[2] + tb.shape[2], ta.shape[3]]);
    p.op(|r| format!("{r} = \"stablehlo.concatenate\"({a}, {b}) {{dimension = 2 : i64}} : ({}, {}) -> {}", tensor(ta), tensor(tb), tensor(&joined)))
}

/// The shape of a traced call's operand `i`.
fn shard_shape(call: &TracedCall, i: usize) -> Vec<usize> {
    call.operand_types().nth(i).map(|t| t.shape.clone()).unwrap_or_default()
}

/// A zero of each of `types` (the operands the kernels take but attention without segments,
/// bias or dropout never reads; the gradients of a skipped step).
fn zeros<'a>(p: &mut SpmdProgram, types: impl Iterator<Item = &'a ValueType>) -> Vec<String> {
    types.map(|t| constant(p, t, if t.dtype.is_float() { "0.0" } else { "0" })).collect()
}

/// A splat constant of `t` (`value` as MLIR spells an element).
fn constant(p: &mut SpmdProgram, t: &ValueType, value: &str) -> String {
    p.op(|r| format!("{r} = stablehlo.constant dense<{value}> : {}", tensor(t)))
}

/// `x` of type `t` converted to `to` (itself when `t` is already `to`).
fn convert(p: &mut SpmdProgram, x: &str, t: &ValueType, to: DType) -> String {
    if t.dtype == to {
        return x.to_string();
    }
    let target = ValueType::new(to, t.shape.clone());
    p.op(|r| format!("{r} = stablehlo.convert {x} : ({}) -> {}", tensor(t), tensor(&target)))
}

/// Whether the ring position (`tensor<i32>`) is at least `step`.
fn ahead_of(p: &mut SpmdProgram, position: &str, step: usize) -> String {
    let step = p.op(|r| format!("{r} = stablehlo.constant dense<{step}> : tensor<i32>"));
    p.op(|r| format!("{r} = stablehlo.compare GE, {position}, {step} : (tensor<i32>, tensor<i32>) -> tensor<i1>"))
}

/// The softmax-weighted union of two partial attentions (f32 outputs `[b, h, s, d]` and their
/// log-sum-exps `[b, h, s, 1]`): each output weighted by its share of the total mass. Rows no
/// key reached (both -inf) stay 0 with a log-sum-exp of -inf.
fn merge(p: &mut SpmdProgram, (o_a, lse_a): (&str, &str), (o_b, lse_b): (&str, &str), o_shape: &[usize], lse_shape: &[usize]) -> (String, String) {
    let (lt, ot) = (tensor(&f32_type(lse_shape)), tensor(&f32_type(o_shape)));
    let bool_t = tensor(&ValueType::new(DType::Bool, lse_shape.to_vec()));
    let m = p.op(|r| format!("{r} = stablehlo.maximum {lse_a}, {lse_b} : {lt}"));
    let ninf = constant(p, &f32_type(lse_shape), NEG_INFINITY);
    let zero = constant(p, &f32_type(lse_shape), "0.0");
    let one = constant(p, &f32_type(lse_shape), "1.0");
    let empty = p.op(|r| format!("{r} = stablehlo.compare EQ, {m}, {ninf} : ({lt}, {lt}) -> {bool_t}"));
    let shift = p.op(|r| format!("{r} = stablehlo.select {empty}, {zero}, {m} : ({bool_t}, {lt}, {lt}) -> {lt}"));
    let mut mass = |lse: &str| {
        let d = p.op(|r| format!("{r} = stablehlo.subtract {lse}, {shift} : {lt}"));
        p.op(|r| format!("{r} = stablehlo.exponential {d} : {lt}"))
    };
    let (a, b) = (mass(lse_a), mass(lse_b));
    let total = p.op(|r| format!("{r} = stablehlo.add {a}, {b} : {lt}"));
    let log = p.op(|r| format!("{r} = stablehlo.log {total} : {lt}"));
    let lse = p.op(|r| format!("{r} = stablehlo.add {log}, {shift} : {lt}"));
    let nothing = p.op(|r| format!("{r} = stablehlo.compare EQ, {total}, {zero} : ({lt}, {lt}) -> {bool_t}"));
    let total = p.op(|r| format!("{r} = stablehlo.select {nothing}, {one}, {total} : ({bool_t}, {lt}, {lt}) -> {lt}"));
    let mut weighted = |o: &str, mass: &str| {
        let w = p.op(|r| format!("{r} = stablehlo.divide {mass}, {total} : {lt}"));
        let w = p.op(|r| format!("{r} = stablehlo.broadcast_in_dim {w}, dims = [0, 1, 2, 3] : ({lt}) -> {ot}"));
        p.op(|r| format!("{r} = stablehlo.multiply {o}, {w} : {ot}"))
    };
    let (wa, wb) = (weighted(o_a, &a), weighted(o_b, &b));
    let o = p.op(|r| format!("{r} = stablehlo.add {wa}, {wb} : {ot}"));
    (o, lse)
}
