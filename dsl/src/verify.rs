//! The IR verifier: types, dominance and region structure, reported at the op's Rust line.

use std::collections::HashSet;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ir::{Func, Index, Loc, MemorySpace, Offset, Op, OpKind, Region, Type, ValueId, ValueType};
use crate::trace::broadcast_shapes;

struct Verifier<'a> {
    func: &'a Func,
    /// Values defined so far on the path to the op being checked (scoped by region).
    visible: Vec<HashSet<ValueId>>,
}

/// Checks that `func` is well formed; the tracer runs this on everything it builds.
pub fn verify(func: &Func) -> Result<()> {
    let mut v = Verifier { func, visible: vec![func.args.iter().copied().collect()] };
    v.region(&func.body, &[], None, &func.results)
}

impl Verifier<'_> {
    fn err(&self, loc: Loc, message: impl Into<String>) -> Error {
        Error::Verify { func: self.func.name.clone(), loc, message: message.into() }
    }

    fn use_value(&self, v: ValueId, loc: Loc) -> Result<()> {
        if v.index() >= self.func.values.len() {
            return Err(self.err(loc, format!("{v} does not exist")));
        }
        if !self.visible.iter().any(|s| s.contains(&v)) {
            return Err(self.err(loc, format!("{v} is used where it is not defined (a value from inside a traced `if`/`for` used outside it?)")));
        }
        Ok(())
    }

    fn vt(&self, v: ValueId, loc: Loc) -> Result<&ValueType> {
        self.func.value_type(v).ok_or_else(|| self.err(loc, format!("{v} is a ref where a value is expected")))
    }

    fn result_vt(&self, op: &Op) -> Result<&ValueType> {
        match op.results.as_slice() {
            [r] => self.vt(*r, op.loc),
            _ => Err(self.err(op.loc, format!("op {:?} must have exactly one result", std::mem::discriminant(&op.kind)))),
        }
    }

    /// Checks `region`; `yield_types` are what its `Yield` must pass on (None: no yield allowed),
    /// and `returned` values must be defined by its end (a function's results).
    fn region(&mut self, region: &Region, arg_types: &[Type], yield_types: Option<&[Type]>, returned: &[ValueId]) -> Result<()> {
        self.visible.push(region.args.iter().copied().collect());
        let loc = region.ops.first().map_or(Loc::caller(), |o| o.loc);
        for (a, t) in region.args.iter().zip(arg_types) {
            if self.func.ty(*a) != t {
                return Err(self.err(loc, format!("region argument {a} has type {} but {t} is passed in", self.func.ty(*a))));
            }
        }
        for (i, op) in region.ops.iter().enumerate() {
            let last = i + 1 == region.ops.len();
            if let OpKind::Yield { values } = &op.kind {
                let Some(expected) = yield_types else { return Err(self.err(op.loc, "`yield` outside an `if` or `for` region")) };
                if !last {
                    return Err(self.err(op.loc, "`yield` must end its region"));
                }
                for &v in values {
                    self.use_value(v, op.loc)?;
                }
                let got: Vec<&Type> = values.iter().map(|&v| self.func.ty(v)).collect();
                if got.len() != expected.len() || got.iter().zip(expected).any(|(g, e)| *g != e) {
                    return Err(self.err(op.loc, format!("region yields {} values, expected {}", got.len(), expected.len())));
                }
            } else {
                self.op(op)?;
            }
            let scope = self.visible.last_mut().expect("pushed above");
            scope.extend(op.results.iter().copied());
        }
        let ends_in_yield = matches!(region.ops.last().map(|o| &o.kind), Some(OpKind::Yield { .. }));
        if yield_types.is_some() && !ends_in_yield {
            return Err(self.err(loc, "an `if`/`for` region must end with `yield`"));
        }
        for &r in returned {
            self.use_value(r, self.func.values.get(r.index()).map_or(loc, |i| i.loc))?;
        }
        self.visible.pop();
        Ok(())
    }

    fn index(&self, index: &[Index], shape: &[usize], loc: Loc) -> Result<Vec<usize>> {
        if index.len() != shape.len() {
            return Err(self.err(loc, format!("index of rank {} into a ref of shape {shape:?}", index.len())));
        }
        let mut out = Vec::new();
        for (ix, &d) in index.iter().zip(shape) {
            let check = |o: &Offset, len: usize| -> Result<()> {
                match o {
                    Offset::Static(s) if s + len > d => Err(self.err(loc, format!("static slice {s}+{len} past extent {d}"))),
                    Offset::Static(_) => Ok(()),
                    Offset::Dynamic(v) => {
                        self.use_value(*v, loc)?;
                        let t = self.vt(*v, loc)?;
                        if t.dtype != DType::I32 || !t.is_scalar() {
                            return Err(self.err(loc, format!("a dynamic offset must be an i32 scalar, got {t}")));
                        }
                        Ok(())
                    }
                }
            };
            match ix {
                Index::Full => out.push(d),
                Index::Slice { start, len } => {
                    check(start, *len)?;
                    out.push(*len);
                }
                Index::Point(o) => check(o, 1)?,
            }
        }
        Ok(out)
    }

    fn op(&mut self, op: &Op) -> Result<()> {
        let loc = op.loc;
        for v in op.operands() {
            self.use_value(v, loc)?;
        }
        let same = |a: &ValueType, b: &ValueType, what: &str| -> Result<()> {
            if a == b {
                Ok(())
            } else {
                Err(self.err(loc, format!("{what}: {a} vs {b}")))
            }
        };
        match &op.kind {
            OpKind::Constant(lit) => {
                let t = self.result_vt(op)?;
                let ok = match lit {
                    crate::ir::Literal::Float(_) => t.dtype.is_float(),
                    crate::ir::Literal::Int(_) => t.dtype.is_int(),
                    crate::ir::Literal::Bool(_) => t.dtype == DType::Bool,
                };
                if !ok || !t.is_scalar() {
                    return Err(self.err(loc, format!("constant {lit} cannot have type {t}")));
                }
            }
            OpKind::ProgramId { .. } | OpKind::NumPrograms { .. } => {
                same(self.result_vt(op)?, &ValueType::scalar(DType::I32), "program id type")?;
            }
            OpKind::Load { src, index } => {
                let r = self.func.ref_type(*src).ok_or_else(|| self.err(loc, "load from a value, not a ref"))?;
                let shape = self.index(index, &r.shape, loc)?;
                same(self.result_vt(op)?, &ValueType::new(r.dtype, shape), "load result")?;
            }
            OpKind::Store { dst, index, value } => {
                let r = self.func.ref_type(*dst).ok_or_else(|| self.err(loc, "store to a value, not a ref"))?;
                let shape = self.index(index, &r.shape, loc)?;
                same(self.vt(*value, loc)?, &ValueType::new(r.dtype, shape), "stored value vs destination")?;
            }
            OpKind::Unary { x, .. } => same(self.vt(*x, loc)?, self.result_vt(op)?, "unary operand vs result")?,
            OpKind::Binary { lhs, rhs, .. } => {
                let r = self.result_vt(op)?;
                same(self.vt(*lhs, loc)?, r, "binary lhs vs result")?;
                same(self.vt(*rhs, loc)?, r, "binary rhs vs result")?;
            }
            OpKind::Compare { lhs, rhs, .. } => {
                let (a, b) = (self.vt(*lhs, loc)?, self.vt(*rhs, loc)?);
                same(a, b, "compare operands")?;
                same(self.result_vt(op)?, &ValueType::new(DType::Bool, a.shape.clone()), "compare result")?;
            }
            OpKind::Select { cond, on_true, on_false } => {
                let r = self.result_vt(op)?;
                same(self.vt(*on_true, loc)?, r, "select true branch")?;
                same(self.vt(*on_false, loc)?, r, "select false branch")?;
                same(self.vt(*cond, loc)?, &ValueType::new(DType::Bool, r.shape.clone()), "select condition")?;
            }
            OpKind::Cast { x } => {
                if self.vt(*x, loc)?.shape != self.result_vt(op)?.shape {
                    return Err(self.err(loc, "cast changes shape"));
                }
            }
            OpKind::Broadcast { x } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                if a.dtype != r.dtype || broadcast_shapes(&a.shape, &r.shape).as_deref() != Some(&r.shape[..]) {
                    return Err(self.err(loc, format!("cannot broadcast {a} to {r}")));
                }
            }
            OpKind::Reshape { x } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                if a.dtype != r.dtype || a.num_elements() != r.num_elements() {
                    return Err(self.err(loc, format!("cannot reshape {a} to {r}")));
                }
            }
            OpKind::Reduce { x, axis, .. } => {
                let a = self.vt(*x, loc)?;
                if *axis >= a.shape.len() {
                    return Err(self.err(loc, format!("reduce over axis {axis} of {a}")));
                }
                let mut s = a.shape.clone();
                s.remove(*axis);
                same(self.result_vt(op)?, &ValueType::new(a.dtype, s), "reduce result")?;
            }
            OpKind::Dot { lhs, rhs, transpose_lhs, transpose_rhs } => {
                let (a, b, r) = (self.vt(*lhs, loc)?, self.vt(*rhs, loc)?, self.result_vt(op)?);
                if a.shape.len() != 2 || b.shape.len() != 2 || a.dtype != b.dtype {
                    return Err(self.err(loc, format!("dot of {a} and {b}")));
                }
                let (m, k1) = if *transpose_lhs { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
                let (k2, n) = if *transpose_rhs { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
                if k1 != k2 || r.shape != [m, n] || Some(r.dtype) != a.dtype.dot_accumulator() {
                    return Err(self.err(loc, format!("dot of {a} and {b} cannot give {r}")));
                }
            }
            OpKind::Iota { dim } => {
                let r = self.result_vt(op)?;
                if *dim >= r.shape.len() || !(r.dtype.is_int() || r.dtype.is_float()) {
                    return Err(self.err(loc, format!("iota along {dim} of {r}")));
                }
            }
            OpKind::Roll { x, shift, axis, stride } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                same(a, r, "roll operand vs result")?;
                same(self.vt(*shift, loc)?, &ValueType::scalar(DType::I32), "roll shift")?;
                if *axis >= a.shape.len() || stride.is_some_and(|s| s.axis >= a.shape.len() || s.axis == *axis) {
                    return Err(self.err(loc, format!("roll along axis {axis} (stride {stride:?}) of {a}")));
                }
            }
            OpKind::Slice { x, start } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                let fits = start.len() == a.shape.len() && r.shape.len() == a.shape.len() && start.iter().zip(&r.shape).zip(&a.shape).all(|((s, l), d)| s + l <= *d);
                if a.dtype != r.dtype || !fits {
                    return Err(self.err(loc, format!("slice of {a} at {start:?} cannot give {r}")));
                }
            }
            OpKind::Concat { xs, axis } => {
                let r = self.result_vt(op)?;
                let mut along = 0;
                for &x in xs {
                    let a = self.vt(x, loc)?;
                    let mut expected = r.shape.clone();
                    if let (Some(e), Some(&n)) = (expected.get_mut(*axis), a.shape.get(*axis)) {
                        *e = n;
                        along += n;
                    }
                    same(a, &ValueType::new(r.dtype, expected), "concatenated operand")?;
                }
                if xs.is_empty() || r.shape.get(*axis) != Some(&along) {
                    return Err(self.err(loc, format!("concatenation along {axis} cannot give {r}")));
                }
            }
            OpKind::Transpose { x, perm } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                let shape: Vec<usize> = perm.iter().filter_map(|&p| a.shape.get(p).copied()).collect();
                if sorted != (0..a.shape.len()).collect::<Vec<_>>() || ValueType::new(a.dtype, shape) != *r {
                    return Err(self.err(loc, format!("transpose {perm:?} of {a} cannot give {r}")));
                }
            }
            OpKind::Bitcast { x } => {
                let (a, r) = (self.vt(*x, loc)?, self.result_vt(op)?);
                if a.bitcast_to(r.dtype).as_ref() != Ok(r) {
                    return Err(self.err(loc, format!("bitcast of {a} to {r}")));
                }
            }
            OpKind::AssumeMultiple { x, multiple } => {
                let a = self.vt(*x, loc)?;
                same(a, self.result_vt(op)?, "assume_multiple operand vs result")?;
                if a.dtype != DType::I32 || *multiple == 0 {
                    return Err(self.err(loc, format!("assume_multiple of {a} by {multiple}")));
                }
            }
            OpKind::DmaStart(c) | OpKind::DmaWait(c) => {
                let refs = [(c.src, &c.src_index), (c.dst, &c.dst_index), (c.sem, &c.sem_index)];
                let mut regions = Vec::new();
                for (r, index) in refs {
                    let t = self.func.ref_type(r).ok_or_else(|| self.err(loc, "a copy between values, not refs"))?;
                    regions.push((t.clone(), self.index(index, &t.shape, loc)?));
                }
                let [(src, src_shape), (dst, dst_shape), (sem, sem_shape)] = &regions[..] else { unreachable!("three refs") };
                if src.dtype != dst.dtype || src_shape != dst_shape {
                    return Err(self.err(loc, format!("a copy of {src_shape:?} {} into {dst_shape:?} {}", src.dtype, dst.dtype)));
                }
                if sem.space != MemorySpace::Semaphore || !sem_shape.is_empty() {
                    return Err(self.err(loc, "a copy signals one DMA semaphore"));
                }
            }
            OpKind::PrngSeed { seeds } => {
                if seeds.is_empty() || !op.results.is_empty() {
                    return Err(self.err(loc, "prng_seed takes at least one seed and gives nothing"));
                }
                for &s in seeds {
                    same(self.vt(s, loc)?, &ValueType::scalar(DType::I32), "prng seed")?;
                }
            }
            OpKind::PrngRandomBits => {
                let r = self.result_vt(op)?;
                if r.dtype != DType::I32 || r.is_scalar() {
                    return Err(self.err(loc, format!("prng_random_bits gives an i32 tile, not {r}")));
                }
            }
            OpKind::If { cond, then_region, else_region } => {
                same(self.vt(*cond, loc)?, &ValueType::scalar(DType::Bool), "if condition")?;
                let types: Vec<Type> = op.results.iter().map(|&r| self.func.ty(r).clone()).collect();
                self.region(then_region, &[], Some(&types), &[])?;
                self.region(else_region, &[], Some(&types), &[])?;
            }
            OpKind::While { inits, cond, body } => {
                let types: Vec<Type> = inits.iter().map(|&i| self.func.ty(i).clone()).collect();
                let result_types: Vec<Type> = op.results.iter().map(|&r| self.func.ty(r).clone()).collect();
                if types != result_types {
                    return Err(self.err(loc, "loop results differ from its carried values"));
                }
                self.region(cond, &types, Some(&[Type::Value(ValueType::scalar(DType::Bool))]), &[])?;
                self.region(body, &types, Some(&types), &[])?;
            }
            OpKind::For { lo, hi, inits, body } => {
                for b in [lo, hi] {
                    same(self.vt(*b, loc)?, &ValueType::scalar(DType::I32), "loop bound")?;
                }
                let types: Vec<Type> = inits.iter().map(|&i| self.func.ty(i).clone()).collect();
                let result_types: Vec<Type> = op.results.iter().map(|&r| self.func.ty(r).clone()).collect();
                if types != result_types {
                    return Err(self.err(loc, "loop results differ from its carried values"));
                }
                let mut args = vec![Type::Value(ValueType::scalar(DType::I32))];
                args.extend(types.iter().cloned());
                self.region(body, &args, Some(&types), &[])?;
            }
            OpKind::Yield { .. } => unreachable!("handled by `region`"),
        }
        Ok(())
    }
}
