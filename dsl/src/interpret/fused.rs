//! Elementwise ops, run a chunk at a time. An elementwise op (or roll, or iota) whose tile
//! feeds exactly one elementwise op of the same shape joins that op's group; a group computes
//! its result in cache-sized chunks, so the tiles between its ops never exist in memory. Every
//! elementwise op runs here, alone or in a group: there is one evaluation of each.

use std::collections::{HashMap, HashSet};

use crate::dtype::DType;
use crate::elementwise::Class;
use crate::interpret::tensor::{round_f32, wrap_i32, Data};
use crate::ir::{BinaryOp, CmpOp, Func, Op, OpKind, Region, RollStride, Specialized, UnaryOp, ValueId};

/// Elements per chunk: the buffers of a group of a few ops stay in a core's L1 (48 KiB here)
/// while each op's loop is long enough to amortize its dispatch. Measured on the prefix-sum
/// roll scan at 256-row blocks, against the matmul scan alternating call by call: 1536 0.95×,
/// 1024 0.97×, 2048 1.02×, 4096 1.08×.
pub(crate) const CHUNK: usize = 1536;

/// The most ops in one group.
const MAX_GROUP: usize = 16;

/// Where a node reads an operand: another node of its group, or a value held in memory.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Node(usize),
    Value(ValueId),
}

#[derive(Debug)]
pub(crate) struct Node<'f> {
    pub op: &'f Op,
    /// The op's operands in order (for a roll: the rolled value and the shift, both values).
    pub args: Vec<Arg>,
    /// A comparison read only as its group's select's condition: it writes i32 masks (all ones
    /// or zero), which the select blends with as they are (bools would be packed into bytes
    /// and unpacked again).
    pub mask: bool,
}

/// Ops evaluated together, children before parents; the last computes the group's result.
#[derive(Debug)]
pub(crate) struct Group<'f> {
    pub nodes: Vec<Node<'f>>,
}

/// What the interpreter does with an op's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Not elementwise: the op runs by itself.
    Alone,
    /// Computed inside its consumer's group and never stored.
    Absorbed,
    /// The last op of this group: the group runs here.
    Root(usize),
}

/// Which ops of a function run in which group.
#[derive(Debug)]
pub(crate) struct Plan<'f> {
    pub groups: Vec<Group<'f>>,
    /// By value index: the role of the op that defines it.
    pub roles: Vec<Role>,
}

/// Whether `op` runs in a group, and which of its operands a producer may be fused into
/// (a roll reads its operand at other positions, so that operand must be in memory).
fn fusable_operands(op: &Op) -> Option<Vec<ValueId>> {
    match &op.kind {
        OpKind::Unary { x, .. } | OpKind::Cast { x } => Some(vec![*x]),
        OpKind::Binary { lhs, rhs, .. } | OpKind::Compare { lhs, rhs, .. } => Some(vec![*lhs, *rhs]),
        OpKind::Select { cond, on_true, on_false } => Some(vec![*cond, *on_true, *on_false]),
        OpKind::Iota { .. } | OpKind::Roll { .. } => Some(Vec::new()),
        _ => None,
    }
}

pub(crate) fn plan(func: &Func) -> Plan<'_> {
    let mut uses = vec![0usize; func.values.len()];
    let mut count = |v: ValueId| {
        if let Some(u) = uses.get_mut(v.index()) {
            *u += 1;
        }
    };
    func.walk(&mut |op| op.operands().into_iter().for_each(&mut count));
    func.results.iter().copied().for_each(count);
    let mut plan = Plan { groups: Vec::new(), roles: vec![Role::Alone; func.values.len()] };
    plan_region(func, &func.body, &uses, &mut plan);
    plan
}

fn plan_region<'f>(func: &'f Func, region: &'f Region, uses: &[usize], plan: &mut Plan<'f>) {
    let shape = |v: ValueId| func.value_type(v).map(|t| &t.shape);
    let mut defs: HashMap<ValueId, &'f Op> = HashMap::new();
    // Ops in the group each value would head, so a long chain becomes several groups (its
    // chunk buffers stay in cache and the planner's recursion stays shallow).
    let mut sizes: HashMap<ValueId, usize> = HashMap::new();
    let mut absorbed = HashSet::new();
    for op in &region.ops {
        for sub in op.regions() {
            plan_region(func, sub, uses, plan);
        }
        let (Some(fused), Some(&r)) = (fusable_operands(op), op.results.first()) else { continue };
        let mut size = 1;
        for v in fused {
            let below = sizes.get(&v).copied().unwrap_or(0);
            if defs.contains_key(&v) && uses.get(v.index()) == Some(&1) && shape(v) == shape(r) && size + below <= MAX_GROUP {
                absorbed.insert(v);
                size += below;
            }
        }
        sizes.insert(r, size);
        defs.insert(r, op);
    }
    for op in &region.ops {
        let Some(&r) = op.results.first() else { continue };
        if !defs.contains_key(&r) {
            continue;
        }
        let role = if absorbed.contains(&r) {
            Role::Absorbed
        } else {
            let mut nodes = Vec::new();
            add_node(op, &defs, &absorbed, &mut nodes);
            plan.groups.push(Group { nodes });
            Role::Root(plan.groups.len() - 1)
        };
        if let Some(slot) = plan.roles.get_mut(r.index()) {
            *slot = role;
        }
    }
}

/// Adds `op` after the producers fused into it; returns its index.
fn add_node<'f>(op: &'f Op, defs: &HashMap<ValueId, &'f Op>, absorbed: &HashSet<ValueId>, nodes: &mut Vec<Node<'f>>) -> usize {
    let args: Vec<Arg> = op
        .operands()
        .into_iter()
        .map(|v| match defs.get(&v) {
            Some(producer) if absorbed.contains(&v) => Arg::Node(add_node(producer, defs, absorbed, nodes)),
            _ => Arg::Value(v),
        })
        .collect();
    if let (OpKind::Select { .. }, Some(&Arg::Node(c))) = (&op.kind, args.first()) {
        if let Some(cond) = nodes.get_mut(c).filter(|n| matches!(n.op.kind, OpKind::Compare { .. })) {
            cond.mask = true;
        }
    }
    nodes.push(Node { op, args, mask: false });
    nodes.len() - 1
}

/// A node's chunk of results, or a group's whole result, in its storage class.
#[derive(Debug)]
pub(crate) enum Buf {
    F(Vec<f32>),
    I(Vec<i32>),
    B(Vec<bool>),
}

impl Buf {
    pub fn new(dtype: DType, len: usize) -> Buf {
        match Class::of(dtype) {
            Class::Float => Buf::F(vec![0.0; len]),
            Class::Int => Buf::I(vec![0; len]),
            Class::Bool => Buf::B(vec![false; len]),
        }
    }

    fn class(&self) -> Class {
        match self {
            Buf::F(_) => Class::Float,
            Buf::I(_) => Class::Int,
            Buf::B(_) => Class::Bool,
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::F(v) => v.len(),
            Buf::I(v) => v.len(),
            Buf::B(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Buf::F(v) => size_of_val(v.as_slice()),
            Buf::I(v) => size_of_val(v.as_slice()),
            Buf::B(v) => size_of_val(v.as_slice()),
        }
    }

    /// Elements `start..start + n`, to be written.
    pub fn out(&mut self, start: usize, n: usize) -> Option<Out<'_>> {
        Some(match self {
            Buf::F(v) => Out::F(v.get_mut(start..start + n)?),
            Buf::I(v) => Out::I(v.get_mut(start..start + n)?),
            Buf::B(v) => Out::B(v.get_mut(start..start + n)?),
        })
    }

    /// The first `n` elements as an operand.
    pub fn input(&self, n: usize) -> Option<In<'_>> {
        Some(match self {
            Buf::F(v) => In::F(Ch::Slice(v.get(..n)?)),
            Buf::I(v) => In::I(Ch::Slice(v.get(..n)?)),
            Buf::B(v) => In::B(Ch::Slice(v.get(..n)?)),
        })
    }

    /// The elements as a tile of `shape`, or `None` if they do not fill it.
    pub fn into_data(self, shape: &[usize]) -> Option<Data> {
        Some(match self {
            Buf::F(v) => Data::F(ndarray::ArrayD::from_shape_vec(shape, v).ok()?),
            Buf::I(v) => Data::I(ndarray::ArrayD::from_shape_vec(shape, v).ok()?),
            Buf::B(v) => Data::B(ndarray::ArrayD::from_shape_vec(shape, v).ok()?),
        })
    }
}

/// Chunk buffers for reuse, of every storage class, and the memory of dropped tiles.
#[derive(Default)]
pub(crate) struct Pool {
    free: Vec<Buf>,
    tiles: Vec<Buf>,
}

/// The memory of dropped tiles a thread keeps for reuse, at most: a few of a kernel's live
/// tiles, so that a tile takes the memory of one that just died without holding much between
/// calls (and few enough to search). Tiles smaller than one (8, 128) block (scalars, short
/// rows) are not worth keeping.
const KEPT_TILES: usize = 8;
const KEPT_TILE_BYTES: usize = 32 << 20;
const KEPT_TILE_MIN_LEN: usize = 8 * 128;

impl Pool {
    /// A buffer of `CHUNK` elements of `dtype`'s class, holding whatever it last held.
    pub fn take(&mut self, dtype: DType) -> Buf {
        match self.free.iter().position(|b| b.class() == Class::of(dtype)) {
            Some(i) => self.free.swap_remove(i),
            None => Buf::new(dtype, CHUNK),
        }
    }

    pub fn give_back(&mut self, bufs: Vec<Buf>) {
        self.free.extend(bufs);
    }

    fn tile(&mut self, dtype: DType, len: usize) -> Buf {
        match self.tiles.iter().rposition(|b| b.class() == Class::of(dtype) && b.len() == len) {
            Some(i) => self.tiles.remove(i),
            None => Buf::new(dtype, len),
        }
    }

    /// Keeps `tile`, dropping the oldest kept ones to stay within [`KEPT_TILES`] and
    /// [`KEPT_TILE_BYTES`].
    fn keep(&mut self, tile: Buf) {
        if tile.len() < KEPT_TILE_MIN_LEN || tile.bytes() > KEPT_TILE_BYTES {
            return;
        }
        let mut held: usize = self.tiles.iter().map(Buf::bytes).sum();
        while (self.tiles.len() >= KEPT_TILES || held + tile.bytes() > KEPT_TILE_BYTES) && !self.tiles.is_empty() {
            held -= self.tiles.remove(0).bytes();
        }
        self.tiles.push(tile);
    }
}

/// A buffer for a tile of `len` elements of `dtype`, holding whatever it last held: the memory
/// of a dropped tile of its size where this thread has one (every element is written before
/// the tile is read).
pub(crate) fn result_buffer(dtype: DType, len: usize) -> Buf {
    with_chunk_buffers(|pool| pool.tile(dtype, len))
}

/// Keeps a dropped tile's memory for [`result_buffer`].
pub(crate) fn recycle(data: Data) {
    let buf = match data {
        Data::F(a) => Buf::F(a.into_raw_vec_and_offset().0),
        Data::I(a) => Buf::I(a.into_raw_vec_and_offset().0),
        Data::B(a) => Buf::B(a.into_raw_vec_and_offset().0),
    };
    with_chunk_buffers(|pool| pool.keep(buf));
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = std::cell::RefCell::new(Pool::default());
}

/// Runs `f` with this thread's chunk buffers and kept tiles (a fresh pool if a caller up the
/// stack holds them).
pub(crate) fn with_chunk_buffers<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    POOL.with(|p| match p.try_borrow_mut() {
        Ok(mut pool) => f(&mut pool),
        Err(_) => f(&mut Pool::default()),
    })
}

/// Where a node writes its chunk.
pub(crate) enum Out<'a> {
    F(&'a mut [f32]),
    I(&'a mut [i32]),
    B(&'a mut [bool]),
}

impl Out<'_> {
    pub fn reborrow(&mut self) -> Out<'_> {
        match self {
            Out::F(v) => Out::F(v),
            Out::I(v) => Out::I(v),
            Out::B(v) => Out::B(v),
        }
    }

    /// Rounds floats to `dtype` and wraps integers to it, as every op's result is.
    pub fn settle(self, dtype: DType) {
        match self {
            Out::F(v) if matches!(dtype, DType::BF16 | DType::F16) => v.iter_mut().for_each(|x| *x = round_f32(dtype, *x)),
            Out::I(v) if dtype == DType::I8 => v.iter_mut().for_each(|x| *x = wrap_i32(dtype, *x)),
            _ => {}
        }
    }
}

/// An elementwise op with its operands' chunks (`dtype` is the operands', for messages).
pub(crate) enum Work<'a> {
    Unary(UnaryOp, In<'a>, DType),
    Binary(BinaryOp, In<'a>, In<'a>, DType),
    Compare(CmpOp, In<'a>, In<'a>, DType),
    Select(In<'a>, In<'a>, In<'a>),
    Cast(In<'a>, DType),
}

/// Computes one chunk of `work` into `out`: with AVX2 where the CPU has it (the portable
/// build targets SSE2, which does half as many lanes per instruction).
pub(crate) fn compute(out: Out, work: Work) -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just checked to have AVX2, the only feature `compute_avx2` enables.
        return unsafe { compute_avx2(out, work) };
    }
    compute_here(out, work)
}

/// # Safety
/// The CPU must have AVX2 (an `unsafe fn`, as `rust-version` 1.85 requires of a target feature).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compute_avx2(out: Out, work: Work) -> Result<(), String> {
    compute_here(out, work)
}

/// The loops, compiled into each caller with that caller's target features.
#[inline(always)]
fn compute_here(out: Out, work: Work) -> Result<(), String> {
    match work {
        Work::Unary(u, x, dtype) => u.specialize(UnaryChunk { out, x, dtype }),
        Work::Binary(b, x, y, dtype) => b.specialize(PairChunk { out, a: x, b: y, dtype }),
        Work::Compare(c, x, y, dtype) => c.specialize(PairChunk { out, a: x, b: y, dtype }),
        Work::Select(c, x, y) => select(out, c, x, y),
        Work::Cast(x, to) => {
            cast(out, x, to);
            Ok(())
        }
    }
}

/// One operand's chunk: its elements, or one value standing for all of them (a scalar
/// broadcast only into elementwise ops).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ch<'a, E> {
    Slice(&'a [E]),
    Splat(E),
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum In<'a> {
    F(Ch<'a, f32>),
    I(Ch<'a, i32>),
    B(Ch<'a, bool>),
}

impl<'a> In<'a> {
    /// All elements of a value in memory, or its one element if it is a scalar; `None` if the
    /// elements are not in row-major order.
    pub fn whole(data: &'a Data) -> Option<In<'a>> {
        fn ch<E: Copy>(a: &ndarray::ArrayD<E>) -> Option<Ch<'_, E>> {
            if a.ndim() == 0 {
                return a.first().map(|&v| Ch::Splat(v));
            }
            a.as_slice().map(Ch::Slice)
        }
        Some(match data {
            Data::F(a) => In::F(ch(a)?),
            Data::I(a) => In::I(ch(a)?),
            Data::B(a) => In::B(ch(a)?),
        })
    }

    /// Elements `start..start + n` (a scalar stands for all of them).
    #[inline(always)]
    pub fn range(&self, start: usize, n: usize) -> Option<In<'a>> {
        #[inline(always)]
        fn ch<'a, E: Copy>(c: &Ch<'a, E>, start: usize, n: usize) -> Option<Ch<'a, E>> {
            match *c {
                Ch::Slice(s) => s.get(start..start + n).map(Ch::Slice),
                Ch::Splat(v) => Some(Ch::Splat(v)),
            }
        }
        Some(match self {
            In::F(c) => In::F(ch(c, start, n)?),
            In::I(c) => In::I(ch(c, start, n)?),
            In::B(c) => In::B(ch(c, start, n)?),
        })
    }
}

// The loops index slices cut to the output's length, which LLVM vectorizes (zipped iterators
// over three slices it often does not).

#[inline(always)]
fn map1<A: Copy, R: Copy>(out: &mut [R], a: Ch<A>, f: impl Fn(A) -> R) {
    let n = out.len();
    match a {
        Ch::Slice(x) => {
            let x = &x[..n];
            for i in 0..n {
                out[i] = f(x[i]);
            }
        }
        Ch::Splat(x) => out.fill(f(x)),
    }
}

#[inline(always)]
fn map2<A: Copy, B: Copy, R: Copy>(out: &mut [R], a: Ch<A>, b: Ch<B>, mut f: impl FnMut(A, B) -> R) {
    let n = out.len();
    match (a, b) {
        (Ch::Slice(x), Ch::Slice(y)) => {
            let (x, y) = (&x[..n], &y[..n]);
            for i in 0..n {
                out[i] = f(x[i], y[i]);
            }
        }
        (Ch::Slice(x), Ch::Splat(q)) => {
            let x = &x[..n];
            for i in 0..n {
                out[i] = f(x[i], q);
            }
        }
        (Ch::Splat(p), Ch::Slice(y)) => {
            let y = &y[..n];
            for i in 0..n {
                out[i] = f(p, y[i]);
            }
        }
        (Ch::Splat(p), Ch::Splat(q)) => out.fill(f(p, q)),
    }
}

/// A choice between two values without a branch, so a select's loop vectorizes (a branch
/// per element does not, and mispredicts on irregular masks): by a mask of all ones or zero.
trait Blend: Copy {
    fn blend(m: i32, a: Self, b: Self) -> Self;
}

impl Blend for i32 {
    #[inline(always)]
    fn blend(m: i32, a: i32, b: i32) -> i32 {
        (a & m) | (b & !m)
    }
}

impl Blend for f32 {
    #[inline(always)]
    fn blend(m: i32, a: f32, b: f32) -> f32 {
        f32::from_bits(i32::blend(m, a.to_bits() as i32, b.to_bits() as i32) as u32)
    }
}

impl Blend for bool {
    #[inline(always)]
    fn blend(m: i32, a: bool, b: bool) -> bool {
        let c = m != 0;
        (c & a) | (!c & b)
    }
}

/// A select's condition: a bool, or a comparison's mask (see [`Node::mask`]).
trait Condition: Copy {
    fn mask(self) -> i32;
}

impl Condition for bool {
    #[inline(always)]
    fn mask(self) -> i32 {
        -i32::from(self)
    }
}

impl Condition for i32 {
    #[inline(always)]
    fn mask(self) -> i32 {
        self
    }
}

#[inline(always)]
fn pick<C: Condition, E: Blend>(out: &mut [E], c: Ch<C>, a: Ch<E>, b: Ch<E>) {
    match c {
        Ch::Splat(c) => map1(out, if c.mask() != 0 { a } else { b }, |v| v),
        Ch::Slice(c) => {
            let n = out.len();
            let c = &c[..n];
            match (a, b) {
                (Ch::Slice(x), Ch::Slice(y)) => {
                    let (x, y) = (&x[..n], &y[..n]);
                    for i in 0..n {
                        out[i] = E::blend(c[i].mask(), x[i], y[i]);
                    }
                }
                (Ch::Slice(x), Ch::Splat(q)) => {
                    let x = &x[..n];
                    for i in 0..n {
                        out[i] = E::blend(c[i].mask(), x[i], q);
                    }
                }
                (Ch::Splat(p), Ch::Slice(y)) => {
                    let y = &y[..n];
                    for i in 0..n {
                        out[i] = E::blend(c[i].mask(), p, y[i]);
                    }
                }
                (Ch::Splat(p), Ch::Splat(q)) => {
                    for i in 0..n {
                        out[i] = E::blend(c[i].mask(), p, q);
                    }
                }
            }
        }
    }
}

const MIXED: &str = "operands of mixed storage classes";

pub(crate) const CONDITION_NOT_BOOL: &str = "select condition is not bool";

/// `cond ? a : b` for one chunk.
#[inline(always)]
fn select(out: Out, cond: In, a: In, b: In) -> Result<(), String> {
    match (out, cond, a, b) {
        (Out::F(o), In::B(c), In::F(a), In::F(b)) => pick(o, c, a, b),
        (Out::I(o), In::B(c), In::I(a), In::I(b)) => pick(o, c, a, b),
        (Out::B(o), In::B(c), In::B(a), In::B(b)) => pick(o, c, a, b),
        (Out::F(o), In::I(m), In::F(a), In::F(b)) => pick(o, m, a, b),
        (Out::I(o), In::I(m), In::I(a), In::I(b)) => pick(o, m, a, b),
        (Out::B(o), In::I(m), In::B(a), In::B(b)) => pick(o, m, a, b),
        (_, In::F(_), _, _) => return Err(CONDITION_NOT_BOOL.into()),
        _ => return Err(MIXED.into()),
    }
    Ok(())
}

/// A conversion to `to` (whose storage `out` is): floats to integers truncate toward zero,
/// nonzero is true, true is one.
#[inline(always)]
fn cast(out: Out, x: In, to: DType) {
    match (out, x) {
        (Out::F(o), In::F(x)) => map1(o, x, |v| v),
        (Out::F(o), In::I(x)) => map1(o, x, |v| v as f32),
        (Out::F(o), In::B(x)) => map1(o, x, |v| f32::from(u8::from(v))),
        (Out::I(o), In::F(x)) if to == DType::I8 => map1(o, x, |v| i32::from(v as i8)),
        (Out::I(o), In::F(x)) => map1(o, x, |v| v as i32),
        (Out::I(o), In::I(x)) => map1(o, x, |v| v),
        (Out::I(o), In::B(x)) => map1(o, x, i32::from),
        (Out::B(o), In::F(x)) => map1(o, x, |v| v != 0.0),
        (Out::B(o), In::I(x)) => map1(o, x, |v| v != 0),
        (Out::B(o), In::B(x)) => map1(o, x, |v| v),
    }
}

/// Elements `start..start + out.len()` of the iota of `shape` along `dim`.
pub(crate) fn iota(out: Out, start: usize, shape: &[usize], dim: usize) {
    fn fill<E: Copy>(out: &mut [E], start: usize, shape: &[usize], dim: usize, cast: impl Fn(usize) -> E) {
        let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
        let extent = shape.get(dim).copied().unwrap_or(1);
        if inner == 0 || extent == 0 {
            return;
        }
        let (mut within, mut value) = (start % inner, (start / inner) % extent);
        let mut at = 0;
        if inner == 1 {
            // Runs counting up from `value` to `extent`, then again from 0.
            while at < out.len() {
                let run = (extent - value).min(out.len() - at);
                for (k, o) in out[at..at + run].iter_mut().enumerate() {
                    *o = cast(value + k);
                }
                at += run;
                value = 0;
            }
            return;
        }
        // Runs of `inner` equal values count up to `extent` and wrap.
        while at < out.len() {
            let run = (inner - within).min(out.len() - at);
            out[at..at + run].fill(cast(value));
            at += run;
            within = 0;
            value = if value + 1 == extent { 0 } else { value + 1 };
        }
    }
    match out {
        Out::F(o) => fill(o, start, shape, dim, |i| i as f32),
        Out::I(o) => fill(o, start, shape, dim, |i| i as i32),
        Out::B(o) => fill(o, start, shape, dim, |i| i != 0),
    }
}

/// Elements `start..` (as many as `out` holds) of `x` (of `shape`) rolled by `shift` along
/// `axis` as `jnp.roll`: element `i` moves to `(i + shift) mod extent`; with a stride, by
/// `shift + j * stride` in slice `j` along the stride's axis.
pub(crate) fn roll(out: Out, start: usize, x: &Data, shape: &[usize], axis: usize, shift: i64, stride: Option<RollStride>) -> Result<(), String> {
    let extent = shape.get(axis).copied().unwrap_or(1);
    let inner: usize = shape.get(axis + 1..).map_or(1, |s| s.iter().product());
    let block = extent * inner;
    if block == 0 {
        return Ok(());
    }
    let n = extent as i64;
    // Slice `j` along the stride's axis is the run of `(p / stride_inner) % stride_extent`.
    let (step, stride_inner, stride_extent) = match stride {
        Some(s) => (i64::from(s.stride), shape.get(s.axis + 1..).map_or(1, |d| d.iter().product::<usize>()).max(1), shape.get(s.axis).copied().unwrap_or(1).max(1)),
        None => (0, 1, 1),
    };
    let moved_by = |j: i64| usize::try_from(shift.wrapping_add(j.wrapping_mul(step)).rem_euclid(n)).unwrap_or(0) * inner;
    let unstrided = stride.is_none().then(|| moved_by(0));
    let moved_at = |p: usize| -> usize { unstrided.unwrap_or_else(|| moved_by(((p / stride_inner) % stride_extent) as i64)) };
    // Below the stride's axis the shift differs within a block: element by element then.
    let per_block = stride.is_none_or(|s| s.axis < axis);
    fn copy<E: Copy>(out: &mut [E], start: usize, src: &[E], block: usize, per_block: bool, moved_at: impl Fn(usize) -> usize) {
        // Position `q` within the block (one line along `axis` and all below it) at `base`.
        let (mut base, mut q) = (start - start % block, start % block);
        let mut at = 0;
        while at < out.len() {
            // The element at `q` comes from `q - moved`, wrapping (`moved < block`).
            let moved = moved_at(base + q);
            let from = if q >= moved { q - moved } else { q + block - moved };
            let run = if per_block { (block - q).min(block - from).min(out.len() - at) } else { 1 };
            out[at..at + run].copy_from_slice(&src[base + from..base + from + run]);
            at += run;
            q += run;
            if q == block {
                q = 0;
                base += block;
            }
        }
    }
    let short = || "the rolled tile is not laid out in row-major order".to_string();
    match (out, x) {
        (Out::F(o), Data::F(a)) => copy(o, start, a.as_slice().ok_or_else(short)?, block, per_block, moved_at),
        (Out::I(o), Data::I(a)) => copy(o, start, a.as_slice().ok_or_else(short)?, block, per_block, moved_at),
        (Out::B(o), Data::B(a)) => copy(o, start, a.as_slice().ok_or_else(short)?, block, per_block, moved_at),
        _ => return Err(MIXED.into()),
    }
    Ok(())
}

/// The scalar function of one class of an op, named as a constant inside its loop so that
/// every op's loop is its own monomorphic, inlined and vectorizable copy (a function pointer
/// passed in stays an indirect call per element). Classes the op lacks are refused before the
/// loop; their stand-in is never called.
macro_rules! scalar_fn {
    ($op:ident, $i:ident, $class:ident, $stand_in:expr) => {
        const {
            match $op::ALL[$i].def().evals().$class {
                Some(f) => f,
                None => $stand_in,
            }
        }
    };
}

/// An error for a class the op does not define, before its loop runs.
macro_rules! defined_or {
    ($op:ident, $i:ident, $class:ident, $undefined:expr) => {
        if const { $op::ALL[$i].def().evals().$class.is_none() } {
            return Err($undefined);
        }
    };
}

/// One chunk of a unary op; `dtype` is the operand's, for messages.
struct UnaryChunk<'a, 'b> {
    out: Out<'b>,
    x: In<'a>,
    dtype: DType,
}

impl Specialized<UnaryOp> for UnaryChunk<'_, '_> {
    type Out = Result<(), String>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<(), String> {
        let undefined = || format!("`{}` of {}", const { UnaryOp::ALL[I].name() }, self.dtype);
        match (self.out, self.x) {
            (Out::F(o), In::F(x)) => {
                defined_or!(UnaryOp, I, float, undefined());
                map1(o, x, scalar_fn!(UnaryOp, I, float, |v| v));
            }
            (Out::I(o), In::I(x)) => {
                defined_or!(UnaryOp, I, int, undefined());
                map1(o, x, scalar_fn!(UnaryOp, I, int, |v| v));
            }
            (Out::B(o), In::B(x)) => {
                defined_or!(UnaryOp, I, boolean, undefined());
                map1(o, x, scalar_fn!(UnaryOp, I, boolean, |v| v));
            }
            _ => return Err(MIXED.into()),
        }
        Ok(())
    }
}

/// One chunk of a binary op or a comparison; `dtype` is the operands', for messages.
struct PairChunk<'a, 'b> {
    out: Out<'b>,
    a: In<'a>,
    b: In<'a>,
    dtype: DType,
}

impl Specialized<BinaryOp> for PairChunk<'_, '_> {
    type Out = Result<(), String>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<(), String> {
        let name = const { BinaryOp::ALL[I].name() };
        let undefined = || format!("`{name}` of {}", self.dtype);
        match (self.out, self.a, self.b) {
            (Out::F(o), In::F(x), In::F(y)) => {
                defined_or!(BinaryOp, I, float, undefined());
                map2(o, x, y, |p, q| scalar_fn!(BinaryOp, I, float, |p, _| p)(p, q));
            }
            (Out::I(o), In::I(x), In::I(y)) => {
                defined_or!(BinaryOp, I, int, undefined());
                let mut outside = None;
                map2(o, x, y, |p, q| {
                    scalar_fn!(BinaryOp, I, int, |p, _| Ok(p))(p, q).unwrap_or_else(|why| {
                        outside.get_or_insert(why);
                        0
                    })
                });
                if let Some(why) = outside {
                    return Err(format!("`{name}`: {why}"));
                }
            }
            (Out::B(o), In::B(x), In::B(y)) => {
                defined_or!(BinaryOp, I, boolean, undefined());
                map2(o, x, y, |p, q| scalar_fn!(BinaryOp, I, boolean, |p, _| p)(p, q));
            }
            _ => return Err(format!("`{name}` of {MIXED}")),
        }
        Ok(())
    }
}

impl Specialized<CmpOp> for PairChunk<'_, '_> {
    type Out = Result<(), String>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<(), String> {
        let cmp = const { CmpOp::ALL[I].def().eval };
        match (self.out, self.a, self.b) {
            (Out::B(o), In::F(x), In::F(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q))),
            (Out::B(o), In::I(x), In::I(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q))),
            (Out::B(o), In::B(x), In::B(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q))),
            // Masks for a select (see `Node::mask`).
            (Out::I(o), In::F(x), In::F(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q)).mask()),
            (Out::I(o), In::I(x), In::I(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q)).mask()),
            (Out::I(o), In::B(x), In::B(y)) => map2(o, x, y, |p, q| cmp(p.partial_cmp(&q)).mask()),
            (Out::F(_), ..) => return Err("a comparison's result is not bool".into()),
            _ => return Err(format!("comparison of {MIXED}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iota_chunks_count_along_their_axis_from_any_start() {
        let shape = [3, 4, 5];
        for dim in 0..3 {
            let all: Vec<i32> = (0..60i32).map(|p| [p / 20, (p / 5) % 4, p % 5][dim]).collect();
            for start in [0, 1, 7, 33, 59] {
                let n = 60 - start;
                let mut out = Buf::new(DType::I32, n);
                iota(out.out(0, n).expect("in range"), start, &shape, dim);
                let Buf::I(got) = out else { unreachable!("an i32 buffer") };
                assert_eq!(got, all[start..], "dim {dim} from {start}");
            }
        }
    }

    #[test]
    fn the_tile_pool_stays_small_and_skips_scalars() {
        let mut pool = Pool::default();
        pool.keep(Buf::new(DType::F32, 1));
        assert!(pool.tiles.is_empty());
        for _ in 0..100 {
            pool.keep(Buf::new(DType::F32, KEPT_TILE_MIN_LEN));
        }
        assert_eq!(pool.tiles.len(), KEPT_TILES);
        let big = KEPT_TILE_BYTES / 4 / 3;
        for _ in 0..5 {
            pool.keep(Buf::new(DType::F32, big));
        }
        assert!(pool.tiles.iter().map(Buf::bytes).sum::<usize>() <= KEPT_TILE_BYTES);
        assert!(matches!(pool.tile(DType::F32, big), Buf::F(v) if v.len() == big));
        assert!(matches!(pool.tile(DType::I32, big), Buf::I(v) if v.len() == big));
    }

    #[test]
    fn roll_chunks_match_a_rotation_by_index_arithmetic() {
        let shape = [3, 4, 5];
        let x: Vec<f32> = (0..60).map(|v| v as f32).collect();
        let data = Data::F(ndarray::ArrayD::from_shape_vec(shape.to_vec(), x.clone()).expect("shape"));
        let strides = [None, Some(RollStride { stride: 1, axis: 0 }), Some(RollStride { stride: 3, axis: 1 }), Some(RollStride { stride: 7, axis: 2 })];
        for axis in 0..3 {
            for stride in strides.into_iter().filter(|s| s.is_none_or(|s| s.axis != axis)) {
                for shift in [-7i64, -1, 0, 1, 2, 9] {
                    let want: Vec<f32> = (0..60usize)
                        .map(|p| {
                            let mut ix = [p / 20, (p / 5) % 4, p % 5];
                            let by = shift + stride.map_or(0, |s| ix[s.axis] as i64 * i64::from(s.stride));
                            ix[axis] = (ix[axis] as i64 - by).rem_euclid(shape[axis] as i64) as usize;
                            x[ix[0] * 20 + ix[1] * 5 + ix[2]]
                        })
                        .collect();
                    for start in [0, 3, 21, 58] {
                        let n = 60 - start;
                        let mut out = Buf::new(DType::F32, n);
                        roll(out.out(0, n).expect("in range"), start, &data, &shape, axis, shift, stride).expect("rolls");
                        let Buf::F(got) = out else { unreachable!("an f32 buffer") };
                        assert_eq!(got, want[start..], "axis {axis} stride {stride:?} shift {shift} from {start}");
                    }
                }
            }
        }
    }
}
