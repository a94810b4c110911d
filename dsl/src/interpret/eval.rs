//! Evaluates one traced function (a program of the kernel, or an index map) on tensors.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Ix2, Slice};

use crate::dtype::DType;
use crate::elementwise::{nan_max, nan_min};
use crate::error::{Error, Result};
use crate::interpret::fused::{self, Arg, Buf, Group, In, Node, Out, Plan, Role, Work, CHUNK};
use crate::interpret::liveness::Liveness;
use crate::interpret::tensor::{bf16_bits, bf16_from_bits, Data, Tensor};
use crate::ir::{BinaryOp, CmpOp, Func, Index, Literal, Loc, Offset, Op, OpKind, ReduceOp, Region, RollStride, Type, UnaryOp, ValueId};
use crate::random;

/// Iterations after which a traced `while` counts as an infinite loop: far past any kernel's.
const MAX_WHILE_ITERATIONS: u64 = 1 << 24;

/// A ref's memory during interpretation, with an initialization mask in checked mode.
#[derive(Clone, Debug)]
pub(crate) struct RefBuf {
    pub data: Tensor,
    /// `Some` for scratch and output blocks in checked mode: which elements have been written.
    pub init: Option<ArrayD<bool>>,
    /// The last store into it, for reports about what an output block holds.
    pub last_store: Option<Loc>,
}

/// What errors need to name: the kernel, the program and the refs.
pub(crate) struct Ctx<'a> {
    pub kernel: &'a str,
    pub grid: &'a [usize],
    pub grid_index: &'a [usize],
    pub ref_names: &'a [String],
}

impl Ctx<'_> {
    fn runtime(&self, loc: Loc, message: impl Into<String>) -> Error {
        Error::Runtime { kernel: self.kernel.to_string(), grid_index: self.grid_index.to_vec(), loc, message: message.into() }
    }

    /// The name of the ref in `slot`, for messages.
    fn ref_name(&self, slot: usize) -> String {
        self.ref_names.get(slot).cloned().unwrap_or_default()
    }
}

/// The interpreter for one function; reusable across programs to keep its value table.
pub(crate) struct Eval<'f> {
    func: &'f Func,
    vals: Vec<Option<Rc<Tensor>>>,
    ref_slot: HashMap<ValueId, usize>,
    /// The random number generator's key and counter, once a program seeds it.
    prng: Option<(u32, u32)>,
    /// Copies started and not yet waited for; they may span grid steps.
    in_flight: Vec<InFlight>,
    analysis: &'f Analysis<'f>,
}

/// What the interpreter works out about a function once, before running any program of it.
pub(crate) struct Analysis<'f> {
    /// Scalars broadcast only into elementwise ops: kept as scalars, which those ops broadcast
    /// as they read (filling a tile with one value first would cost a pass over memory).
    lazy_splats: HashSet<ValueId>,
    /// Which elementwise ops run together, chunk by chunk.
    plan: Plan<'f>,
    /// Where each value can be dropped.
    liveness: Liveness,
}

impl<'f> Analysis<'f> {
    pub fn of(func: &'f Func) -> Self {
        let plan = fused::plan(func);
        let liveness = Liveness::of(func, &plan);
        Analysis { lazy_splats: lazy_splats(func), plan, liveness }
    }
}

/// Where a node of a group reads an operand: the chunk of an earlier node, or a whole tile in
/// memory (or a scalar standing for one).
enum Source<'a> {
    Node(usize),
    Tile(In<'a>),
}

/// What a node of a group computes.
enum Job<'a> {
    /// Each with its operands' dtype, for messages.
    Unary(UnaryOp, DType),
    Binary(BinaryOp, DType),
    Compare(CmpOp, DType),
    Select,
    /// To this dtype.
    Cast(DType),
    Iota {
        dims: &'a [usize],
        dim: usize,
    },
    Roll {
        x: &'a Data,
        dims: &'a [usize],
        axis: usize,
        shift: i64,
        stride: Option<RollStride>,
    },
}

/// A node of a group, ready to run chunk after chunk.
struct Ready<'a> {
    job: Job<'a>,
    args: Vec<Source<'a>>,
    /// The result's dtype.
    dtype: DType,
    loc: Loc,
}

impl Ready<'_> {
    /// Elements `start..start + n` of the node's result, into `out`; `done` holds the chunks
    /// of the nodes before it.
    fn chunk(&self, done: &[Buf], mut out: Out, start: usize, n: usize) -> std::result::Result<(), String> {
        let input = |k: usize| -> std::result::Result<In<'_>, String> {
            match self.args.get(k) {
                Some(Source::Node(j)) => done.get(*j).and_then(|b| b.input(n)),
                Some(Source::Tile(t)) => t.range(start, n),
                None => None,
            }
            .ok_or_else(|| format!("internal: operand {k} of an elementwise op is missing"))
        };
        let work = match self.job {
            Job::Unary(u, dtype) => Work::Unary(u, input(0)?, dtype),
            Job::Binary(b, dtype) => Work::Binary(b, input(0)?, input(1)?, dtype),
            Job::Compare(c, dtype) => Work::Compare(c, input(0)?, input(1)?, dtype),
            Job::Select => Work::Select(input(0)?, input(1)?, input(2)?),
            Job::Cast(to) => Work::Cast(input(0)?, to),
            Job::Iota { dims, dim } => {
                fused::iota(out.reborrow(), start, dims, dim);
                out.settle(self.dtype);
                return Ok(());
            }
            Job::Roll { x, dims, axis, shift, stride } => return fused::roll(out, start, x, dims, axis, shift, stride),
        };
        fused::compute(out.reborrow(), work)?;
        out.settle(self.dtype);
        Ok(())
    }
}

/// A started copy: the data it read, where it lands at its wait, and what it signals.
#[derive(Debug)]
struct InFlight {
    /// The semaphore ref's slot and the element signalled.
    sem: usize,
    sem_sel: Vec<Sel>,
    dst: usize,
    dst_sel: Vec<Sel>,
    data: Tensor,
    loc: Loc,
}

/// One axis of a resolved access: `len` elements from `start`, dropped if `point`.
#[derive(Clone, Copy, Debug)]
struct Sel {
    start: usize,
    len: usize,
    point: bool,
}

fn slice_view<'a, E>(a: &'a ArrayD<E>, sel: &[Sel]) -> ArrayViewD<'a, E> {
    let mut v = a.view();
    for (axis, s) in sel.iter().enumerate() {
        v.slice_axis_inplace(Axis(axis), Slice::from(s.start..s.start + s.len));
    }
    for axis in (0..sel.len()).rev() {
        if sel[axis].point {
            v = v.index_axis_move(Axis(axis), 0);
        }
    }
    v
}

fn slice_view_mut<'a, E>(a: &'a mut ArrayD<E>, sel: &[Sel]) -> ArrayViewMutD<'a, E> {
    let mut v = a.view_mut();
    for (axis, s) in sel.iter().enumerate() {
        v.slice_axis_inplace(Axis(axis), Slice::from(s.start..s.start + s.len));
    }
    for axis in (0..sel.len()).rev() {
        if sel[axis].point {
            v = v.index_axis_move(Axis(axis), 0);
        }
    }
    v
}

fn dot_i32(a: ndarray::ArrayView2<i32>, b: ndarray::ArrayView2<i32>) -> ndarray::Array2<i32> {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    ndarray::Array2::from_shape_fn((m, n), |(i, j)| (0..k).fold(0i32, |acc, p| acc.wrapping_add(a[(i, p)].wrapping_mul(b[(p, j)]))))
}

impl<'f> Eval<'f> {
    pub fn new(func: &'f Func, analysis: &'f Analysis<'f>) -> Self {
        let ref_slot = func.args.iter().filter(|a| matches!(func.ty(**a), Type::Ref(_))).enumerate().map(|(i, &a)| (a, i)).collect();
        Eval { func, vals: vec![None; func.values.len()], ref_slot, prng: None, in_flight: Vec::new(), analysis }
    }

    fn get(&self, v: ValueId) -> &Rc<Tensor> {
        // The verifier guarantees every use is dominated by its definition.
        self.vals[v.index()].as_ref().expect("verified IR defines values before use")
    }

    fn set(&mut self, v: ValueId, t: Tensor) {
        self.vals[v.index()] = Some(Rc::new(t));
    }

    fn result_dtype(&self, op: &Op) -> DType {
        self.func.value_type(op.results[0]).map_or(DType::F32, |t| t.dtype)
    }

    fn result_shape(&self, op: &Op) -> Vec<usize> {
        self.result_dims(op).to_vec()
    }

    /// The result's shape, borrowed from the function (no allocation on the hot path).
    fn result_dims(&self, op: &Op) -> &'f [usize] {
        self.func.value_type(op.results[0]).map_or(&[], |t| &t.shape[..])
    }

    /// Runs the function with `args` bound to the non-ref arguments, in order; returns its results.
    pub fn run(&mut self, ctx: &Ctx, refs: &mut [RefBuf], args: Vec<Tensor>, checked: bool) -> Result<Vec<Rc<Tensor>>> {
        self.prng = None;
        let value_args: Vec<ValueId> = self.func.args.iter().copied().filter(|a| !self.ref_slot.contains_key(a)).collect();
        for (id, t) in value_args.into_iter().zip(args) {
            self.set(id, t);
        }
        let func = self.func;
        self.region(ctx, &func.body, refs, checked)?;
        Ok(func.results.iter().map(|&r| self.get(r).clone()).collect())
    }

    fn region(&mut self, ctx: &Ctx, region: &'f Region, refs: &mut [RefBuf], checked: bool) -> Result<Vec<Rc<Tensor>>> {
        let deaths = self.analysis.liveness.deaths(region);
        for (i, op) in region.ops.iter().enumerate() {
            if let OpKind::Yield { values } = &op.kind {
                return Ok(values.iter().map(|&v| self.get(v).clone()).collect());
            }
            self.op(ctx, op, refs, checked)?;
            for &v in deaths.and_then(|d| d.get(i)).into_iter().flatten() {
                if let Some(t) = self.vals[v.index()].take().and_then(|t| Rc::try_unwrap(t).ok()) {
                    fused::recycle(t.data);
                }
            }
        }
        Ok(Vec::new())
    }

    fn resolve(&self, ctx: &Ctx, slot: usize, index: &[Index], shape: &[usize], loc: Loc) -> Result<Vec<Sel>> {
        let mut sel = Vec::with_capacity(index.len());
        for (axis, (ix, &dim)) in index.iter().zip(shape).enumerate() {
            let offset = |o: &Offset| -> i64 {
                match o {
                    Offset::Static(s) => *s as i64,
                    Offset::Dynamic(v) => self.get(*v).scalar_i64().unwrap_or(i64::MIN),
                }
            };
            let (start, len, point) = match ix {
                Index::Full => (0, dim, false),
                Index::Slice { start, len } => (offset(start), *len, false),
                Index::Point(o) => (offset(o), 1, true),
            };
            if start < 0 || start as usize + len > dim {
                return Err(Error::OutOfBounds {
                    kernel: ctx.kernel.to_string(),
                    operand: ctx.ref_name(slot),
                    grid_index: ctx.grid_index.to_vec(),
                    loc,
                    detail: format!("axis {axis}: elements {start}..{} of extent {dim} (ref shape {shape:?})", start + len as i64),
                });
            }
            sel.push(Sel { start: start as usize, len, point });
        }
        Ok(sel)
    }

    fn slot(&self, r: ValueId) -> usize {
        self.ref_slot[&r]
    }

    /// A ref's slot and the region `index` selects in it.
    fn ref_region(&self, ctx: &Ctx, refs: &[RefBuf], r: ValueId, index: &[Index], loc: Loc) -> Result<(usize, Vec<Sel>)> {
        let slot = self.slot(r);
        let sel = self.resolve(ctx, slot, index, refs[slot].data.shape(), loc)?;
        Ok((slot, sel))
    }

    /// Checked mode: touching memory a copy in flight will write (or is reading) is a race.
    fn check_not_in_flight(&self, ctx: &Ctx, slot: usize, sel: &[Sel], what: &str, loc: Loc) -> Result<()> {
        match self.in_flight.iter().find(|f| f.dst == slot && overlaps(&f.dst_sel, sel)) {
            Some(f) => Err(ctx.runtime(
                loc,
                format!(
                    "{what} `{}`{} while the copy into it started at {} is in flight: wait for the copy first (on a TPU this reads or overwrites memory the DMA is still writing)",
                    ctx.ref_name(slot),
                    describe(sel),
                    f.loc
                ),
            )),
            None => Ok(()),
        }
    }

    /// After the last grid step of a core: a copy never waited for leaves its semaphore
    /// signalled (and its data unaccounted for).
    pub fn finish(&self, ctx: &Ctx) -> Result<()> {
        match self.in_flight.first() {
            Some(f) => Err(ctx.runtime(
                f.loc,
                format!(
                    "the copy into `{}`{} started here was never waited for: its semaphore `{}`{} is left non-zero at the kernel's end; wait for every copy you start",
                    ctx.ref_name(f.dst),
                    describe(&f.dst_sel),
                    ctx.ref_name(f.sem),
                    describe(&f.sem_sel)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Runs a group of elementwise ops a chunk at a time; returns its last op's result.
    fn run_group(&mut self, ctx: &Ctx, op: &'f Op, group: &Group<'f>) -> Result<Tensor> {
        let Some(root) = group.nodes.last() else { return Err(ctx.runtime(op.loc, "internal: an empty elementwise group")) };
        let shape = self.result_dims(root.op);
        // Operands in memory are read as row-major slices: a rare other layout is copied once.
        for node in &group.nodes {
            for arg in &node.args {
                let Arg::Value(v) = *arg else { continue };
                let t = self.get(v);
                if t.shape().is_empty() {
                    continue;
                }
                if t.shape() != shape {
                    return Err(ctx.runtime(node.op.loc, format!("an operand of shape {:?} where {shape:?} is expected", t.shape())));
                }
                if !standard_layout(t) {
                    let copy = each_data(t, |d| {
                        Ok(match d {
                            Data::F(a) => Data::F(a.as_standard_layout().into_owned()),
                            Data::I(a) => Data::I(a.as_standard_layout().into_owned()),
                            Data::B(a) => Data::B(a.as_standard_layout().into_owned()),
                        })
                    })?;
                    self.set(v, copy);
                }
            }
        }
        let len: usize = shape.iter().product();
        let last = group.nodes.len() - 1;
        let dtype = self.result_dtype(root.op);
        let ready: Vec<Ready> = group.nodes.iter().map(|node| self.ready(ctx, node)).collect::<Result<_>>()?;
        let mut result = fused::result_buffer(dtype, len);
        // The last node writes straight into the result; the others into chunk buffers, kept
        // per thread across groups (every element is written before it is read).
        fused::with_chunk_buffers(|pool| {
            let mut bufs: Vec<Buf> = group.nodes[..last].iter().zip(&ready).map(|(n, r)| pool.take(if n.mask { DType::I32 } else { r.dtype })).collect();
            let mut start = 0;
            let mut ran = Ok(());
            // At least one chunk, empty for an empty tile, so an op a dtype lacks is refused
            // whatever the tile's size.
            loop {
                let n = CHUNK.min(len - start);
                for (i, node) in ready.iter().enumerate() {
                    let (done, rest) = bufs.split_at_mut(i.min(last));
                    let out = if i == last { result.out(start, n) } else { rest.first_mut().and_then(|b| b.out(0, n)) };
                    ran = match out {
                        Some(out) => node.chunk(done, out, start, n).map_err(|m| ctx.runtime(node.loc, m)),
                        None => Err(ctx.runtime(node.loc, "internal: an elementwise chunk is out of range")),
                    };
                    if ran.is_err() {
                        break;
                    }
                }
                start += n;
                if start >= len || ran.is_err() {
                    break;
                }
            }
            pool.give_back(bufs);
            ran
        })?;
        let data = result.into_data(shape).ok_or_else(|| ctx.runtime(root.op.loc, format!("internal: an elementwise result does not fill {shape:?}")))?;
        Ok(Tensor { dtype, data })
    }

    /// A group's node with its operands found: what every chunk of it needs, looked up once.
    fn ready<'a>(&'a self, ctx: &Ctx, node: &Node<'f>) -> Result<Ready<'a>> {
        let (op, loc) = (node.op, node.op.loc);
        let args: Vec<Source> = node
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Node(j) => Ok(Source::Node(j)),
                Arg::Value(v) => In::whole(&self.get(v).data).map(Source::Tile).ok_or_else(|| ctx.runtime(loc, "internal: an elementwise operand is not in row-major order")),
            })
            .collect::<Result<_>>()?;
        let dtype_of = |v: &ValueId| self.func.value_type(*v).map_or(DType::F32, |t| t.dtype);
        let job = match &op.kind {
            OpKind::Unary { op: u, x } => Job::Unary(*u, dtype_of(x)),
            OpKind::Binary { op: b, lhs, .. } => Job::Binary(*b, dtype_of(lhs)),
            OpKind::Compare { op: c, lhs, .. } => Job::Compare(*c, dtype_of(lhs)),
            // An i32 condition is a mask only from a comparison in the group (`Node::mask`).
            OpKind::Select { .. } if matches!(args.first(), Some(Source::Tile(In::I(_)))) => return Err(ctx.runtime(loc, fused::CONDITION_NOT_BOOL)),
            OpKind::Select { .. } => Job::Select,
            OpKind::Cast { .. } => Job::Cast(self.result_dtype(op)),
            OpKind::Iota { dim } => Job::Iota { dims: self.result_dims(op), dim: *dim },
            OpKind::Roll { x, shift, axis, stride } => Job::Roll {
                x: &self.get(*x).data,
                dims: self.result_dims(op),
                axis: *axis,
                shift: self.get(*shift).scalar_i64().ok_or_else(|| ctx.runtime(loc, "roll shift is not an i32 scalar"))?,
                stride: *stride,
            },
            _ => return Err(ctx.runtime(loc, "internal: a non-elementwise op in an elementwise group")),
        };
        Ok(Ready { job, args, dtype: self.result_dtype(op), loc })
    }

    fn op(&mut self, ctx: &Ctx, op: &'f Op, refs: &mut [RefBuf], checked: bool) -> Result<()> {
        let loc = op.loc;
        let t = match &op.kind {
            OpKind::Constant(lit) => {
                let dtype = self.result_dtype(op);
                match lit {
                    Literal::Float(x) => Tensor::float(dtype, ArrayD::from_elem(vec![], *x as f32)),
                    Literal::Int(x) => Tensor::int(dtype, ArrayD::from_elem(vec![], *x as i32)),
                    Literal::Bool(x) => Tensor::boolean(ArrayD::from_elem(vec![], *x)),
                }
            }
            OpKind::ProgramId { axis } => Tensor::int(DType::I32, ArrayD::from_elem(vec![], ctx.grid_index[*axis] as i32)),
            OpKind::NumPrograms { axis } => Tensor::int(DType::I32, ArrayD::from_elem(vec![], ctx.grid[*axis] as i32)),
            OpKind::Load { src, index } => {
                let (slot, sel) = self.ref_region(ctx, refs, *src, index, loc)?;
                if checked {
                    self.check_not_in_flight(ctx, slot, &sel, "reads", loc)?;
                }
                read_region(ctx, &refs[slot], slot, &sel, loc)?
            }
            OpKind::DmaStart(c) => {
                let (src, src_sel) = self.ref_region(ctx, refs, c.src, &c.src_index, loc)?;
                let (dst, dst_sel) = self.ref_region(ctx, refs, c.dst, &c.dst_index, loc)?;
                let (sem, sem_sel) = self.ref_region(ctx, refs, c.sem, &c.sem_index, loc)?;
                if checked {
                    self.check_not_in_flight(ctx, src, &src_sel, "copies from", loc)?;
                    self.check_not_in_flight(ctx, dst, &dst_sel, "starts another copy into", loc)?;
                }
                let data = read_region(ctx, &refs[src], src, &src_sel, loc)?;
                self.in_flight.push(InFlight { sem, sem_sel, dst, dst_sel, data, loc });
                return Ok(());
            }
            OpKind::DmaWait(c) => {
                let (dst, dst_sel) = self.ref_region(ctx, refs, c.dst, &c.dst_index, loc)?;
                let (sem, sem_sel) = self.ref_region(ctx, refs, c.sem, &c.sem_index, loc)?;
                let matches = |f: &InFlight| f.sem == sem && same_region(&f.sem_sel, &sem_sel) && f.dst == dst && same_region(&f.dst_sel, &dst_sel);
                let Some(i) = self.in_flight.iter().position(matches) else {
                    return Err(ctx.runtime(
                        loc,
                        format!(
                            "waits for a copy into `{}`{} signalling `{}`{}, but none is in flight: a wait without a start (on a TPU it would hang)",
                            ctx.ref_name(dst),
                            describe(&dst_sel),
                            ctx.ref_name(sem),
                            describe(&sem_sel)
                        ),
                    ));
                };
                let landed = self.in_flight.remove(i);
                write_region(ctx, &mut refs[dst], &dst_sel, &landed.data, loc)?;
                return Ok(());
            }
            OpKind::Store { dst, index, value } => {
                let (slot, sel) = self.ref_region(ctx, refs, *dst, index, loc)?;
                if checked {
                    self.check_not_in_flight(ctx, slot, &sel, "writes", loc)?;
                }
                let v = self.get(*value).clone();
                write_region(ctx, &mut refs[slot], &sel, &v, loc)?;
                return Ok(());
            }
            OpKind::Unary { .. } | OpKind::Binary { .. } | OpKind::Compare { .. } | OpKind::Select { .. } | OpKind::Cast { .. } | OpKind::Iota { .. } | OpKind::Roll { .. } => {
                let plan = &self.analysis.plan;
                match op.results.first().and_then(|r| plan.roles.get(r.index())) {
                    Some(Role::Absorbed) => return Ok(()),
                    Some(&Role::Root(g)) => match plan.groups.get(g) {
                        Some(group) => self.run_group(ctx, op, group)?,
                        None => return Err(ctx.runtime(loc, "internal: an elementwise group is missing")),
                    },
                    _ => return Err(ctx.runtime(loc, "internal: an elementwise op outside every group")),
                }
            }
            OpKind::Broadcast { x } if self.analysis.lazy_splats.contains(&op.results[0]) => Tensor::clone(self.get(*x)),
            OpKind::Broadcast { x } => {
                let shape = self.result_shape(op);
                let x = self.get(*x);
                let err = || ctx.runtime(loc, format!("cannot broadcast {:?} to {shape:?}", x.shape()));
                let data = match &x.data {
                    Data::F(a) => Data::F(broadcast(a, &shape).ok_or_else(err)?),
                    Data::I(a) => Data::I(broadcast(a, &shape).ok_or_else(err)?),
                    Data::B(a) => Data::B(broadcast(a, &shape).ok_or_else(err)?),
                };
                Tensor { dtype: x.dtype, data }
            }
            OpKind::Reshape { x } => {
                let shape = self.result_shape(op);
                let x = self.get(*x);
                let err = |_| ctx.runtime(loc, format!("cannot reshape {:?} to {shape:?}", x.shape()));
                let data = match &x.data {
                    Data::F(a) => Data::F(a.as_standard_layout().into_owned().into_shape_with_order(shape.clone()).map_err(err)?),
                    Data::I(a) => Data::I(a.as_standard_layout().into_owned().into_shape_with_order(shape.clone()).map_err(err)?),
                    Data::B(a) => Data::B(a.as_standard_layout().into_owned().into_shape_with_order(shape.clone()).map_err(err)?),
                };
                Tensor { dtype: x.dtype, data }
            }
            OpKind::Reduce { op: r, x, axis } => reduce(*r, self.get(*x), *axis),
            OpKind::Dot { lhs, rhs, transpose_lhs, transpose_rhs } => {
                let (a, b) = (self.get(*lhs), self.get(*rhs));
                let err = |_| ctx.runtime(loc, "dot operands are not 2-D");
                match (&a.data, &b.data) {
                    (Data::F(x), Data::F(y)) => {
                        let x = x.view().into_dimensionality::<Ix2>().map_err(err)?;
                        let y = y.view().into_dimensionality::<Ix2>().map_err(err)?;
                        let x = if *transpose_lhs { x.reversed_axes() } else { x };
                        let y = if *transpose_rhs { y.reversed_axes() } else { y };
                        Tensor::float(DType::F32, x.dot(&y).into_dyn())
                    }
                    (Data::I(x), Data::I(y)) => {
                        let x = x.view().into_dimensionality::<Ix2>().map_err(err)?;
                        let y = y.view().into_dimensionality::<Ix2>().map_err(err)?;
                        let x = if *transpose_lhs { x.reversed_axes() } else { x };
                        let y = if *transpose_rhs { y.reversed_axes() } else { y };
                        Tensor::int(DType::I32, dot_i32(x, y).into_dyn())
                    }
                    _ => return Err(ctx.runtime(loc, "dot of bool tiles")),
                }
            }
            OpKind::Slice { x, start } => {
                let sel: Vec<Sel> = start.iter().zip(self.result_dims(op)).map(|(&start, &len)| Sel { start, len, point: false }).collect();
                sliced(self.get(*x), &sel)
            }
            OpKind::Concat { xs, axis } => {
                let parts: Vec<Rc<Tensor>> = xs.iter().map(|&x| self.get(x).clone()).collect();
                let ax = Axis(*axis);
                let err = |e: ndarray::ShapeError| ctx.runtime(loc, format!("concatenate: {e}"));
                let dtype = parts.first().map_or(DType::F32, |p| p.dtype);
                macro_rules! join {
                    ($v:ident) => {{
                        let views: Vec<_> = parts.iter().filter_map(|p| if let Data::$v(a) = &p.data { Some(a.view()) } else { None }).collect();
                        if views.len() != parts.len() {
                            return Err(ctx.runtime(loc, "concatenated tiles differ in storage class"));
                        }
                        Data::$v(ndarray::concatenate(ax, &views).map_err(err)?)
                    }};
                }
                let data = match parts.first().map(|p| &p.data) {
                    Some(Data::F(_)) => join!(F),
                    Some(Data::I(_)) => join!(I),
                    Some(Data::B(_)) => join!(B),
                    None => return Err(ctx.runtime(loc, "concatenation of no tiles")),
                };
                Tensor { dtype, data }
            }
            OpKind::Transpose { x, perm } => each_data(self.get(*x), |d| {
                Ok(match d {
                    Data::F(a) => Data::F(a.view().permuted_axes(perm.clone()).as_standard_layout().into_owned()),
                    Data::I(a) => Data::I(a.view().permuted_axes(perm.clone()).as_standard_layout().into_owned()),
                    Data::B(a) => Data::B(a.view().permuted_axes(perm.clone()).as_standard_layout().into_owned()),
                })
            })?,
            OpKind::Bitcast { x } => {
                let x = self.get(*x);
                bitcast(x, self.result_dtype(op), self.result_dims(op))
                    .ok_or_else(|| ctx.runtime(loc, format!("bitcast of a {} tile of shape {:?} to {:?}", x.dtype, x.shape(), self.result_dims(op))))?
            }
            OpKind::AssumeMultiple { x, multiple } => {
                let t = self.get(*x);
                if let Data::I(a) = &t.data {
                    if let Some(v) = a.iter().find(|&&v| v % *multiple as i32 != 0) {
                        return Err(ctx.runtime(loc, format!("the kernel promised a multiple of {multiple} (`multiple_of`), but the value is {v}")));
                    }
                }
                Tensor::clone(t)
            }
            OpKind::PrngSeed { seeds } => {
                let seeds: Vec<u32> = seeds.iter().map(|&v| self.get(v).scalar_i64().unwrap_or(0) as u32).collect();
                self.prng = Some((random::seed_key(&mut random::Numbers, &seeds), 0));
                return Ok(());
            }
            OpKind::PrngRandomBits => {
                let Some((key, counter)) = self.prng else { return Err(ctx.runtime(loc, "prng_random_bits before prng_seed in this program: seed the generator first")) };
                let shape = self.result_shape(op);
                let n: usize = shape.iter().product();
                let bits: Vec<i32> = (0..n).map(|e| random::bits(&mut random::Numbers, &key, &counter, &(e as u32)) as i32).collect();
                self.prng = Some((key, counter.wrapping_add(n as u32)));
                Tensor::int(DType::I32, ArrayD::from_shape_vec(shape, bits).map_err(|e| ctx.runtime(loc, format!("random bits: {e}")))?)
            }
            OpKind::If { cond, then_region, else_region } => {
                let c = self.get(*cond).scalar_bool().ok_or_else(|| ctx.runtime(loc, "`if` condition is not a bool scalar"))?;
                let yields = self.region(ctx, if c { then_region } else { else_region }, refs, checked)?;
                for (&r, y) in op.results.iter().zip(yields) {
                    self.vals[r.index()] = Some(y);
                }
                return Ok(());
            }
            OpKind::While { inits, cond, body } => {
                let mut carried: Vec<Rc<Tensor>> = inits.iter().map(|&i| self.get(i).clone()).collect();
                let mut iterations = 0u64;
                loop {
                    for (&a, c) in cond.args.iter().zip(&carried) {
                        self.vals[a.index()] = Some(c.clone());
                    }
                    let go = self.region(ctx, cond, refs, checked)?;
                    if !go.first().and_then(|c| c.scalar_bool()).ok_or_else(|| ctx.runtime(loc, "`while` condition is not a bool scalar"))? {
                        break;
                    }
                    iterations += 1;
                    if iterations > MAX_WHILE_ITERATIONS {
                        return Err(ctx.runtime(
                            loc,
                            format!("this traced `while` ran {MAX_WHILE_ITERATIONS} iterations without its condition turning false: an infinite loop? (it would hang a TPU)"),
                        ));
                    }
                    for (&a, c) in body.args.iter().zip(carried.drain(..)) {
                        self.vals[a.index()] = Some(c);
                    }
                    carried = self.region(ctx, body, refs, checked)?;
                }
                for (&r, c) in op.results.iter().zip(carried) {
                    self.vals[r.index()] = Some(c);
                }
                return Ok(());
            }
            OpKind::For { lo, hi, inits, body } => {
                let bounds = (self.get(*lo).scalar_i64(), self.get(*hi).scalar_i64());
                let (Some(lo), Some(hi)) = bounds else { return Err(ctx.runtime(loc, "loop bounds are not i32 scalars")) };
                let mut carried: Vec<Rc<Tensor>> = inits.iter().map(|&i| self.get(i).clone()).collect();
                for iv in lo..hi {
                    self.set(body.args[0], Tensor::int(DType::I32, ArrayD::from_elem(vec![], iv as i32)));
                    for (&a, c) in body.args[1..].iter().zip(carried.drain(..)) {
                        self.vals[a.index()] = Some(c);
                    }
                    carried = self.region(ctx, body, refs, checked)?;
                }
                for (&r, c) in op.results.iter().zip(carried) {
                    self.vals[r.index()] = Some(c);
                }
                return Ok(());
            }
            OpKind::Yield { .. } => return Ok(()),
        };
        self.set(op.results[0], t);
        Ok(())
    }
}

/// The results of scalar-to-tile broadcasts that only elementwise ops (which broadcast as they
/// read) consume.
fn lazy_splats(func: &Func) -> HashSet<ValueId> {
    let mut candidates = HashSet::new();
    func.walk(&mut |op| {
        if let OpKind::Broadcast { x } = op.kind {
            if func.value_type(x).is_some_and(|t| t.is_scalar()) {
                candidates.extend(op.results.first());
            }
        }
    });
    func.walk(&mut |op| {
        if !matches!(op.kind, OpKind::Binary { .. } | OpKind::Compare { .. } | OpKind::Select { .. }) {
            for v in op.operands() {
                candidates.remove(&v);
            }
        }
    });
    for r in &func.results {
        candidates.remove(r);
    }
    candidates
}

/// `[0..8, 3]`: a region as indexing would write it.
fn describe(sel: &[Sel]) -> String {
    let parts: Vec<String> = sel.iter().map(|s| if s.point { s.start.to_string() } else { format!("{}..{}", s.start, s.start + s.len) }).collect();
    format!("[{}]", parts.join(", "))
}

fn overlaps(a: &[Sel], b: &[Sel]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.start < y.start + y.len && y.start < x.start + x.len)
}

fn same_region(a: &[Sel], b: &[Sel]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.start == y.start && x.len == y.len)
}

/// The region `sel` of a ref; in checked mode, an error where it holds memory nothing wrote.
fn read_region(ctx: &Ctx, buf: &RefBuf, slot: usize, sel: &[Sel], loc: Loc) -> Result<Tensor> {
    if let Some(init) = &buf.init {
        if slice_view(init, sel).iter().any(|&i| !i) {
            return Err(Error::UninitializedRead { kernel: ctx.kernel.to_string(), operand: ctx.ref_name(slot), grid_index: ctx.grid_index.to_vec(), loc, region: describe(sel) });
        }
    }
    Ok(sliced(&buf.data, sel))
}

/// The region `sel` of `t`, copied out.
fn sliced(t: &Tensor, sel: &[Sel]) -> Tensor {
    let data = match &t.data {
        Data::F(a) => Data::F(slice_view(a, sel).to_owned()),
        Data::I(a) => Data::I(slice_view(a, sel).to_owned()),
        Data::B(a) => Data::B(slice_view(a, sel).to_owned()),
    };
    Tensor { dtype: t.dtype, data }
}

/// Writes `v` into the region `sel` of a ref and marks it written.
fn write_region(ctx: &Ctx, buf: &mut RefBuf, sel: &[Sel], v: &Tensor, loc: Loc) -> Result<()> {
    match (&mut buf.data.data, &v.data) {
        (Data::F(a), Data::F(x)) => slice_view_mut(a, sel).assign(x),
        (Data::I(a), Data::I(x)) => slice_view_mut(a, sel).assign(x),
        (Data::B(a), Data::B(x)) => slice_view_mut(a, sel).assign(x),
        _ => return Err(ctx.runtime(loc, "a write of a value whose storage class differs from the ref's")),
    }
    if let Some(init) = &mut buf.init {
        slice_view_mut(init, sel).fill(true);
    }
    buf.last_store = Some(loc);
    Ok(())
}

fn standard_layout(t: &Tensor) -> bool {
    match &t.data {
        Data::F(a) => a.is_standard_layout(),
        Data::I(a) => a.is_standard_layout(),
        Data::B(a) => a.is_standard_layout(),
    }
}

/// `x` with its data replaced by `f`'s, dtype kept.
fn each_data(x: &Tensor, f: impl FnOnce(&Data) -> Result<Data>) -> Result<Tensor> {
    Ok(Tensor { dtype: x.dtype, data: f(&x.data)? })
}

/// A value's bits as an unsigned integer of its width.
fn to_bits(dtype: DType, v: f32) -> u32 {
    match dtype {
        DType::BF16 => u32::from(bf16_bits(v)),
        DType::F16 => u32::from(half::f16::from_f32(v).to_bits()),
        _ => v.to_bits(),
    }
}

fn from_bits(dtype: DType, bits: u32) -> f32 {
    match dtype {
        DType::BF16 => bf16_from_bits(bits as u16),
        DType::F16 => half::f16::from_bits(bits as u16).to_f32(),
        _ => f32::from_bits(bits),
    }
}

/// `x`'s bits read as `to`, with `shape` (see `ValueType::bitcast_to`); `None` for a bool or
/// a shape that does not hold them.
fn bitcast(x: &Tensor, to: DType, shape: &[usize]) -> Option<Tensor> {
    let from = x.dtype;
    let bits: Vec<u32> = match &x.data {
        Data::F(a) => a.iter().map(|&v| to_bits(from, v)).collect(),
        Data::I(a) if from == DType::I8 => a.iter().map(|&v| u32::from(v as u8)).collect(),
        Data::I(a) => a.iter().map(|&v| v as u32).collect(),
        Data::B(_) => return None,
    };
    let (narrow, wide) = (from.size_bytes() * 8, to.size_bytes() * 8);
    let (rows, lanes) = match x.shape() {
        [.., m, n] => (*m, *n),
        _ => (1, bits.len()),
    };
    let line = rows * lanes;
    let out: Vec<u32> = if narrow == wide || bits.is_empty() {
        bits
    } else if narrow < wide {
        // Rows `p * r .. p * r + p` become row `r`, the first in the lowest bits.
        let p = wide / narrow;
        let mut out = Vec::with_capacity(bits.len() / p);
        for block in bits.chunks(line) {
            for r in 0..rows / p {
                for c in 0..lanes {
                    out.push((0..p).try_fold(0u32, |acc, k| block.get((p * r + k) * lanes + c).map(|&b| acc | (b << (narrow * k))))?);
                }
            }
        }
        out
    } else {
        let p = narrow / wide;
        let mask = (1u32 << wide) - 1;
        let mut out = Vec::with_capacity(bits.len() * p);
        for block in bits.chunks(line) {
            for row in 0..rows * p {
                let (r, k) = (row / p, row % p);
                out.extend(block.get(r * lanes..(r + 1) * lanes)?.iter().map(|&b| (b >> (wide * k)) & mask));
            }
        }
        out
    };
    Some(if to.is_float() {
        Tensor::float(to, ArrayD::from_shape_vec(shape, out.into_iter().map(|b| from_bits(to, b)).collect()).ok()?)
    } else {
        Tensor::int(to, ArrayD::from_shape_vec(shape, out.into_iter().map(|b| if to == DType::I8 { i32::from(b as u8 as i8) } else { b as i32 }).collect()).ok()?)
    })
}

/// `a` broadcast to `shape`, materialized (a generic element-by-element copy of a broadcast
/// view is several times slower than filling or assigning).
fn broadcast<E: Copy + Default>(a: &ArrayD<E>, shape: &[usize]) -> Option<ArrayD<E>> {
    if a.len() == 1 {
        return a.first().map(|&v| ArrayD::from_elem(shape, v));
    }
    let view = a.broadcast(shape)?;
    let mut out = ArrayD::from_elem(shape, E::default());
    out.assign(&view);
    Some(out)
}

fn reduce(op: ReduceOp, x: &Tensor, axis: usize) -> Tensor {
    let ax = Axis(axis);
    match &x.data {
        Data::F(a) => {
            let r = match op {
                // Accumulated in f64: a sequential f32 sum of a long row loses digits a TPU's
                // tree reduction (and PJRT's) keeps.
                ReduceOp::Sum => a.map_axis(ax, |lane| lane.iter().map(|&v| v as f64).sum::<f64>() as f32),
                ReduceOp::Max => a.fold_axis(ax, f32::NEG_INFINITY, |&acc, &v| nan_max(acc, v)),
                ReduceOp::Min => a.fold_axis(ax, f32::INFINITY, |&acc, &v| nan_min(acc, v)),
            };
            Tensor::float(x.dtype, r)
        }
        Data::I(a) => {
            let r = match op {
                ReduceOp::Sum => a.fold_axis(ax, 0i32, |&acc, &v| acc.wrapping_add(v)),
                ReduceOp::Max => a.fold_axis(ax, i32::MIN, |&acc, &v| acc.max(v)),
                ReduceOp::Min => a.fold_axis(ax, i32::MAX, |&acc, &v| acc.min(v)),
            };
            Tensor::int(x.dtype, r)
        }
        Data::B(a) => {
            let r = match op {
                ReduceOp::Sum | ReduceOp::Max => a.fold_axis(ax, false, |&acc, &v| acc | v),
                ReduceOp::Min => a.fold_axis(ax, true, |&acc, &v| acc & v),
            };
            Tensor::boolean(r)
        }
    }
}
