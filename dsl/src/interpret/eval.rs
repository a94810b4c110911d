//! Evaluates one traced function (a program of the kernel, or an index map) on tensors.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Ix2, Slice, Zip};

use crate::dtype::DType;
use crate::elementwise::{nan_max, nan_min};
use crate::error::{Error, Result};
use crate::interpret::tensor::{round_f32, wrap_i32, Data, Tensor};
use crate::ir::{BinaryOp, CmpOp, Func, Index, Literal, Loc, Offset, Op, OpKind, ReduceOp, Region, Specialized, Type, UnaryOp, ValueId};
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
    /// Scalars broadcast only into elementwise ops: kept as scalars, which those ops broadcast
    /// as they read (filling a tile with one value first would cost a pass over memory).
    lazy_splats: HashSet<ValueId>,
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
    pub fn new(func: &'f Func) -> Self {
        let ref_slot = func.args.iter().filter(|a| matches!(func.ty(**a), Type::Ref(_))).enumerate().map(|(i, &a)| (a, i)).collect();
        Eval { func, vals: vec![None; func.values.len()], ref_slot, prng: None, in_flight: Vec::new(), lazy_splats: lazy_splats(func) }
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
        for op in &region.ops {
            if let OpKind::Yield { values } = &op.kind {
                return Ok(values.iter().map(|&v| self.get(v).clone()).collect());
            }
            self.op(ctx, op, refs, checked)?;
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
            OpKind::Unary { op: u, x } => u.specialize(UnaryRun { ctx, x: self.get(*x), loc })?,
            OpKind::Binary { op: b, lhs, rhs } => b.specialize(PairRun { ctx, a: self.get(*lhs), b: self.get(*rhs), shape: self.result_dims(op), loc })?,
            OpKind::Compare { op: c, lhs, rhs } => c.specialize(PairRun { ctx, a: self.get(*lhs), b: self.get(*rhs), shape: self.result_dims(op), loc })?,
            OpKind::Select { cond, on_true, on_false } => {
                let (c, a, b) = (self.get(*cond), self.get(*on_true), self.get(*on_false));
                let shape = self.result_dims(op);
                let Data::B(c) = &c.data else { return Err(ctx.runtime(loc, "select condition is not bool")) };
                let c = view_as(ctx, c, shape, loc)?;
                fn pick<E: Copy>(ctx: &Ctx, c: ArrayViewD<bool>, x: &ArrayD<E>, y: &ArrayD<E>, shape: &[usize], loc: Loc) -> Result<ArrayD<E>> {
                    let scalar = |a: &ArrayD<E>| if a.ndim() == 0 && !shape.is_empty() { a.first().copied() } else { None };
                    Ok(match (scalar(x), scalar(y)) {
                        (None, Some(q)) => Zip::from(c).and(view_as(ctx, x, shape, loc)?).map_collect(|&c, &p| if c { p } else { q }),
                        (Some(p), None) => Zip::from(c).and(view_as(ctx, y, shape, loc)?).map_collect(|&c, &q| if c { p } else { q }),
                        _ => Zip::from(c).and(view_as(ctx, x, shape, loc)?).and(view_as(ctx, y, shape, loc)?).map_collect(|&c, &x, &y| if c { x } else { y }),
                    })
                }
                let data = match (&a.data, &b.data) {
                    (Data::F(x), Data::F(y)) => Data::F(pick(ctx, c, x, y, shape, loc)?),
                    (Data::I(x), Data::I(y)) => Data::I(pick(ctx, c, x, y, shape, loc)?),
                    (Data::B(x), Data::B(y)) => Data::B(pick(ctx, c, x, y, shape, loc)?),
                    _ => return Err(ctx.runtime(loc, "select branches differ in storage class")),
                };
                Tensor { dtype: a.dtype, data }
            }
            OpKind::Cast { x } => cast(self.get(*x), self.result_dtype(op)),
            OpKind::Broadcast { x } if self.lazy_splats.contains(&op.results[0]) => Tensor::clone(self.get(*x)),
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
            OpKind::Iota { dim } => {
                let (dtype, shape, dim) = (self.result_dtype(op), self.result_shape(op), *dim);
                if dtype.is_float() {
                    Tensor::float(dtype, iota(&shape, dim, |i| i as f32))
                } else {
                    Tensor::int(dtype, iota(&shape, dim, |i| i as i32))
                }
            }
            OpKind::Roll { x, shift, axis } => {
                let x = self.get(*x);
                let shift = self.get(*shift).scalar_i64().ok_or_else(|| ctx.runtime(loc, "roll shift is not an i32 scalar"))?;
                let n = x.shape().get(*axis).copied().unwrap_or(0);
                let s = usize::try_from(shift.rem_euclid(n.max(1) as i64)).unwrap_or(0);
                each_data(x, |d| {
                    Ok(match d {
                        Data::F(a) => Data::F(roll(a, Axis(*axis), s)),
                        Data::I(a) => Data::I(roll(a, Axis(*axis), s)),
                        Data::B(a) => Data::B(roll(a, Axis(*axis), s)),
                    })
                })?
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
            OpKind::Bitcast { x } => bitcast(self.get(*x), self.result_dtype(op)).ok_or_else(|| ctx.runtime(loc, "bitcast between dtypes of different widths"))?,
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

struct UnaryRun<'a> {
    ctx: &'a Ctx<'a>,
    x: &'a Tensor,
    loc: Loc,
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

impl Specialized<UnaryOp> for UnaryRun<'_> {
    type Out = Result<Tensor>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<Tensor> {
        let (ctx, x, loc) = (self.ctx, self.x, self.loc);
        let undefined = || ctx.runtime(loc, format!("`{}` of {}", const { UnaryOp::ALL[I].name() }, x.dtype));
        Ok(match &x.data {
            Data::F(a) => {
                defined_or!(UnaryOp, I, float, undefined());
                Tensor::float(x.dtype, a.mapv(|v| scalar_fn!(UnaryOp, I, float, |v| v)(v)))
            }
            Data::I(a) => {
                defined_or!(UnaryOp, I, int, undefined());
                Tensor::int(x.dtype, a.mapv(|v| scalar_fn!(UnaryOp, I, int, |v| v)(v)))
            }
            Data::B(a) => {
                defined_or!(UnaryOp, I, boolean, undefined());
                Tensor::boolean(a.mapv(|v| scalar_fn!(UnaryOp, I, boolean, |v| v)(v)))
            }
        })
    }
}

/// The operands of a binary op or a comparison.
struct PairRun<'a> {
    ctx: &'a Ctx<'a>,
    a: &'a Tensor,
    b: &'a Tensor,
    /// The result's shape: an operand may be a lazily broadcast scalar.
    shape: &'a [usize],
    loc: Loc,
}

impl Specialized<BinaryOp> for PairRun<'_> {
    type Out = Result<Tensor>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<Tensor> {
        let (ctx, a, b, shape, loc) = (self.ctx, self.a, self.b, self.shape, self.loc);
        let name = const { BinaryOp::ALL[I].name() };
        let undefined = || ctx.runtime(loc, format!("`{name}` of {}", a.dtype));
        Ok(match (&a.data, &b.data) {
            (Data::F(x), Data::F(y)) => {
                defined_or!(BinaryOp, I, float, undefined());
                Tensor::float(a.dtype, zip2(ctx, x, y, shape, loc, |p, q| scalar_fn!(BinaryOp, I, float, |p, _| p)(p, q))?)
            }
            (Data::I(x), Data::I(y)) => {
                defined_or!(BinaryOp, I, int, undefined());
                let mut outside = None;
                let r = zip2(ctx, x, y, shape, loc, |p, q| {
                    scalar_fn!(BinaryOp, I, int, |p, _| Ok(p))(p, q).unwrap_or_else(|why| {
                        outside.get_or_insert(why);
                        0
                    })
                })?;
                if let Some(why) = outside {
                    return Err(ctx.runtime(loc, format!("`{name}`: {why}")));
                }
                Tensor::int(a.dtype, r)
            }
            (Data::B(x), Data::B(y)) => {
                defined_or!(BinaryOp, I, boolean, undefined());
                Tensor::boolean(zip2(ctx, x, y, shape, loc, |p, q| scalar_fn!(BinaryOp, I, boolean, |p, _| p)(p, q))?)
            }
            _ => return Err(ctx.runtime(loc, format!("`{name}` of mismatched storage"))),
        })
    }
}

impl Specialized<CmpOp> for PairRun<'_> {
    type Out = Result<Tensor>;
    #[inline(always)]
    fn run<const I: usize>(self) -> Result<Tensor> {
        fn cmp<E: PartialOrd + Copy, const I: usize>(ctx: &Ctx, x: &ArrayD<E>, y: &ArrayD<E>, shape: &[usize], loc: Loc) -> Result<ArrayD<bool>> {
            zip2(ctx, x, y, shape, loc, |p, q| const { CmpOp::ALL[I].def().eval }(p.partial_cmp(&q)))
        }
        let (ctx, shape, loc) = (self.ctx, self.shape, self.loc);
        let out = match (&self.a.data, &self.b.data) {
            (Data::F(x), Data::F(y)) => cmp::<_, I>(ctx, x, y, shape, loc)?,
            (Data::I(x), Data::I(y)) => cmp::<_, I>(ctx, x, y, shape, loc)?,
            (Data::B(x), Data::B(y)) => cmp::<_, I>(ctx, x, y, shape, loc)?,
            _ => return Err(ctx.runtime(loc, "comparison of mismatched storage")),
        };
        Ok(Tensor::boolean(out))
    }
}

/// `f` over `x` and `y` at `shape`, where either may be a lazily broadcast scalar: a map over
/// the other then (a zero-stride view would cost the loop its vectorization).
#[inline(always)]
fn zip2<A: Copy, B: Copy, R>(ctx: &Ctx, x: &ArrayD<A>, y: &ArrayD<B>, shape: &[usize], loc: Loc, mut f: impl FnMut(A, B) -> R) -> Result<ArrayD<R>> {
    match (x.ndim() == 0 && !shape.is_empty(), y.ndim() == 0 && !shape.is_empty()) {
        (false, true) => {
            let q = y.first().copied().ok_or_else(|| ctx.runtime(loc, "an empty scalar"))?;
            Ok(view_as(ctx, x, shape, loc)?.map(|&p| f(p, q)))
        }
        (true, false) => {
            let p = x.first().copied().ok_or_else(|| ctx.runtime(loc, "an empty scalar"))?;
            Ok(view_as(ctx, y, shape, loc)?.map(|&q| f(p, q)))
        }
        _ => Ok(Zip::from(view_as(ctx, x, shape, loc)?).and(view_as(ctx, y, shape, loc)?).map_collect(|&p, &q| f(p, q))),
    }
}

/// `a` viewed at `shape`: itself, or a lazily broadcast scalar.
fn view_as<'a, E>(ctx: &Ctx, a: &'a ArrayD<E>, shape: &[usize], loc: Loc) -> Result<ArrayViewD<'a, E>> {
    if a.shape() == shape {
        return Ok(a.view());
    }
    a.broadcast(shape).ok_or_else(|| ctx.runtime(loc, format!("an operand of shape {:?} where {shape:?} is expected", a.shape())))
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

/// `a` rotated by `s` (less than its extent) along `axis`: element `i` moves to `i + s`, wrapping.
fn roll<E: Copy>(a: &ArrayD<E>, axis: Axis, s: usize) -> ArrayD<E> {
    let a = a.as_standard_layout();
    let (n, inner): (usize, usize) = (a.len_of(axis), a.shape()[axis.0 + 1..].iter().product());
    let (Some(src), false) = (a.as_slice(), a.is_empty()) else { return a.into_owned() };
    // In row-major order each run of `n * inner` elements is one line along `axis`: its last
    // `s` positions move to the front.
    let mut out = Vec::with_capacity(src.len());
    for line in src.chunks(n * inner) {
        let (head, tail) = line.split_at((n - s) * inner);
        out.extend_from_slice(tail);
        out.extend_from_slice(head);
    }
    ArrayD::from_shape_vec(a.raw_dim(), out).unwrap_or_else(|_| a.into_owned())
}

/// `x` with its data replaced by `f`'s, dtype kept.
fn each_data(x: &Tensor, f: impl FnOnce(&Data) -> Result<Data>) -> Result<Tensor> {
    Ok(Tensor { dtype: x.dtype, data: f(&x.data)? })
}

/// A value's bits as an unsigned integer of its width.
fn to_bits(dtype: DType, v: f32) -> u32 {
    match dtype {
        DType::BF16 => u32::from(half::bf16::from_f32(v).to_bits()),
        DType::F16 => u32::from(half::f16::from_f32(v).to_bits()),
        _ => v.to_bits(),
    }
}

fn from_bits(dtype: DType, bits: u32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_bits(bits as u16).to_f32(),
        DType::F16 => half::f16::from_bits(bits as u16).to_f32(),
        _ => f32::from_bits(bits),
    }
}

/// `x`'s bits read as `to` (of the same width), or `None` for widths that differ.
fn bitcast(x: &Tensor, to: DType) -> Option<Tensor> {
    if x.dtype.size_bytes() != to.size_bytes() {
        return None;
    }
    let from = x.dtype;
    Some(match (&x.data, to.is_float()) {
        (Data::F(a), true) => Tensor::float(to, a.mapv(|v| from_bits(to, to_bits(from, v)))),
        (Data::F(a), false) => Tensor::int(to, a.mapv(|v| to_bits(from, v) as i32)),
        (Data::I(a), true) => Tensor::float(to, a.mapv(|v| from_bits(to, v as u32))),
        (Data::I(a), false) => Tensor::int(to, a.clone()),
        (Data::B(_), _) => return None,
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

/// Counts up along `dim`: each run of `inner` elements holds one index.
fn iota<E: Copy>(shape: &[usize], dim: usize, cast: impl Fn(usize) -> E) -> ArrayD<E> {
    let inner: usize = shape[dim + 1..].iter().product();
    let outer: usize = shape[..dim].iter().product();
    let mut data = Vec::with_capacity(outer * shape[dim] * inner);
    // One line along `dim` and below, copied for each index above it.
    let mut line = Vec::with_capacity(shape[dim] * inner);
    for i in 0..shape[dim] {
        line.extend(std::iter::repeat_n(cast(i), inner));
    }
    for _ in 0..outer {
        data.extend_from_slice(&line);
    }
    ArrayD::from_shape_vec(shape, data).expect("iota fills exactly the shape's elements")
}

fn cast(x: &Tensor, to: DType) -> Tensor {
    match (&x.data, to) {
        (Data::F(a), d) if d.is_float() => Tensor::float(d, a.mapv(|v| round_f32(d, v))),
        (Data::F(a), d) if d.is_int() => Tensor::int(d, a.mapv(|v| if d == DType::I8 { v as i8 as i32 } else { v as i32 })),
        (Data::F(a), _) => Tensor::boolean(a.mapv(|v| v != 0.0)),
        (Data::I(a), d) if d.is_float() => Tensor::float(d, a.mapv(|v| v as f32)),
        (Data::I(a), d) if d.is_int() => Tensor::int(d, a.mapv(|v| wrap_i32(d, v))),
        (Data::I(a), _) => Tensor::boolean(a.mapv(|v| v != 0)),
        (Data::B(a), d) if d.is_float() => Tensor::float(d, a.mapv(|v| v as i32 as f32)),
        (Data::B(a), d) if d.is_int() => Tensor::int(d, a.mapv(|v| v as i32)),
        (Data::B(a), _) => Tensor::boolean(a.clone()),
    }
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
