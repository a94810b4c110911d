//! Shape-checked op construction on the builder: broadcasting, arithmetic, reductions, dot.

use crate::dtype::DType;
use crate::ir::{BinaryOp, CmpOp, Literal, Loc, OpKind, ReduceOp, RollStride, UnaryOp, ValueId, ValueType};
use crate::trace::builder::Builder;

/// Numpy broadcasting of two shapes, or `None` when they are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i < rank - a.len() { 1 } else { a[i - (rank - a.len())] };
        let db = if i < rank - b.len() { 1 } else { b[i - (rank - b.len())] };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn undefined_for(op: &str, dtype: DType, takes: &[DType]) -> String {
    let takes: Vec<String> = takes.iter().map(|d| d.to_string()).collect();
    format!("`{op}` is not defined for {dtype}; it takes {}", takes.join(", "))
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

impl Builder {
    pub(crate) fn broadcast_to(&mut self, x: ValueId, shape: &[usize], loc: Loc) -> ValueId {
        let t = self.vty(x);
        if t.shape == shape {
            return x;
        }
        match broadcast_shapes(&t.shape, shape) {
            Some(s) if s == shape => self.push(OpKind::Broadcast { x }, ValueType::new(t.dtype, shape), loc),
            _ => self.fail(loc, format!("cannot broadcast a value of shape {} to shape {}", shape_str(&t.shape), shape_str(shape)), ValueType::new(t.dtype, shape)),
        }
    }

    /// Broadcasts `vals` to one shape; reports `what` on mismatch.
    fn broadcast_all(&mut self, vals: &[ValueId], what: &str, loc: Loc) -> Option<(Vec<ValueId>, Vec<usize>)> {
        let mut shape: Vec<usize> = Vec::new();
        for &v in vals {
            let s = self.vty(v).shape;
            match broadcast_shapes(&shape, &s) {
                Some(b) => shape = b,
                None => {
                    let shapes: Vec<String> = vals.iter().map(|&v| shape_str(&self.vty(v).shape)).collect();
                    self.fail_silent(loc, format!("{what}: shapes {} do not broadcast together", shapes.join(" and ")));
                    return None;
                }
            }
        }
        let out = vals.iter().map(|&v| self.broadcast_to(v, &shape, loc)).collect();
        Some((out, shape))
    }

    pub(crate) fn binary(&mut self, op: BinaryOp, lhs: ValueId, rhs: ValueId, loc: Loc) -> ValueId {
        let (ta, tb) = (self.vty(lhs), self.vty(rhs));
        if ta.dtype != tb.dtype {
            let msg = format!("`{}` of {} and {}: dtypes differ; cast one side first", op.name(), ta.dtype, tb.dtype);
            return self.fail(loc, msg, ta);
        }
        let def = op.def();
        if def.lowerings(ta.dtype).is_none() {
            return self.fail(loc, undefined_for(def.name, ta.dtype, &def.dtypes()), ta);
        }
        match self.broadcast_all(&[lhs, rhs], op.name(), loc) {
            Some((v, shape)) => self.push(OpKind::Binary { op, lhs: v[0], rhs: v[1] }, ValueType::new(ta.dtype, shape), loc),
            None => self.new_value(crate::ir::Type::Value(ta), loc),
        }
    }

    pub(crate) fn compare(&mut self, op: CmpOp, lhs: ValueId, rhs: ValueId, loc: Loc) -> ValueId {
        let (ta, tb) = (self.vty(lhs), self.vty(rhs));
        if ta.dtype != tb.dtype {
            let msg = format!("comparison `{}` of {} and {}: dtypes differ; cast one side first", op.name(), ta.dtype, tb.dtype);
            return self.fail(loc, msg, ValueType::new(DType::Bool, ta.shape));
        }
        match self.broadcast_all(&[lhs, rhs], op.name(), loc) {
            Some((v, shape)) => self.push(OpKind::Compare { op, lhs: v[0], rhs: v[1] }, ValueType::new(DType::Bool, shape), loc),
            None => self.new_value(crate::ir::Type::Value(ValueType::new(DType::Bool, ta.shape)), loc),
        }
    }

    pub(crate) fn select(&mut self, cond: ValueId, on_true: ValueId, on_false: ValueId, loc: Loc) -> ValueId {
        let (tc, ta, tb) = (self.vty(cond), self.vty(on_true), self.vty(on_false));
        if tc.dtype != DType::Bool {
            return self.fail(loc, format!("select: the condition must be bool, not {}", tc.dtype), ta);
        }
        if ta.dtype != tb.dtype {
            return self.fail(loc, format!("select: branches have dtypes {} and {}", ta.dtype, tb.dtype), ta);
        }
        match self.broadcast_all(&[cond, on_true, on_false], "select", loc) {
            Some((v, shape)) => self.push(OpKind::Select { cond: v[0], on_true: v[1], on_false: v[2] }, ValueType::new(ta.dtype, shape), loc),
            None => self.new_value(crate::ir::Type::Value(ta), loc),
        }
    }

    pub(crate) fn unary(&mut self, op: UnaryOp, x: ValueId, loc: Loc) -> ValueId {
        let t = self.vty(x);
        let def = op.def();
        if def.lowerings(t.dtype).is_none() {
            return self.fail(loc, undefined_for(def.name, t.dtype, &def.dtypes()), t);
        }
        self.push(OpKind::Unary { op, x }, t, loc)
    }

    pub(crate) fn cast(&mut self, x: ValueId, dtype: DType, loc: Loc) -> ValueId {
        let t = self.vty(x);
        if t.dtype == dtype {
            return x;
        }
        self.push(OpKind::Cast { x }, ValueType::new(dtype, t.shape), loc)
    }

    pub(crate) fn reshape(&mut self, x: ValueId, shape: &[usize], loc: Loc) -> ValueId {
        let t = self.vty(x);
        let n: usize = shape.iter().product();
        if n != t.num_elements() {
            let msg = format!("cannot reshape {} ({} elements) to {:?}", shape_str(&t.shape), t.num_elements(), shape);
            return self.fail(loc, msg, ValueType::new(t.dtype, shape));
        }
        if t.shape == shape {
            return x;
        }
        self.push(OpKind::Reshape { x }, ValueType::new(t.dtype, shape), loc)
    }

    pub(crate) fn reduce(&mut self, op: ReduceOp, x: ValueId, axis: usize, loc: Loc) -> ValueId {
        let t = self.vty(x);
        if axis >= t.shape.len() {
            let msg = format!("reduction over axis {axis} of a rank-{} value of shape {}", t.shape.len(), shape_str(&t.shape));
            return self.fail(loc, msg, ValueType::scalar(t.dtype));
        }
        let mut shape = t.shape.clone();
        shape.remove(axis);
        self.push(OpKind::Reduce { op, x, axis }, ValueType::new(t.dtype, shape), loc)
    }

    pub(crate) fn dot(&mut self, lhs: ValueId, rhs: ValueId, transpose_lhs: bool, transpose_rhs: bool, loc: Loc) -> ValueId {
        let (ta, tb) = (self.vty(lhs), self.vty(rhs));
        let acc = ta.dtype.dot_accumulator().unwrap_or(DType::F32);
        let fallback = ValueType::new(acc, vec![1, 1]);
        if ta.shape.len() != 2 || tb.shape.len() != 2 {
            let msg = format!("dot takes 2-D tiles, got shapes {} and {}", shape_str(&ta.shape), shape_str(&tb.shape));
            return self.fail(loc, msg, fallback);
        }
        if ta.dtype != tb.dtype {
            return self.fail(loc, format!("dot of {} and {}: operand dtypes differ", ta.dtype, tb.dtype), fallback);
        }
        let (m, ka) = if transpose_lhs { (ta.shape[1], ta.shape[0]) } else { (ta.shape[0], ta.shape[1]) };
        let (kb, n) = if transpose_rhs { (tb.shape[1], tb.shape[0]) } else { (tb.shape[0], tb.shape[1]) };
        if ka != kb {
            let msg = format!(
                "dot: contracting dims differ: lhs {}{} has {ka}, rhs {}{} has {kb}",
                shape_str(&ta.shape),
                if transpose_lhs { " (transposed)" } else { "" },
                shape_str(&tb.shape),
                if transpose_rhs { " (transposed)" } else { "" },
            );
            return self.fail(loc, msg, ValueType::new(acc, vec![m, n]));
        }
        self.push(OpKind::Dot { lhs, rhs, transpose_lhs, transpose_rhs }, ValueType::new(acc, vec![m, n]), loc)
    }

    pub(crate) fn iota(&mut self, dtype: DType, shape: &[usize], dim: usize, loc: Loc) -> ValueId {
        if dim >= shape.len() {
            let msg = format!("iota along dim {dim} of a rank-{} shape {}", shape.len(), shape_str(shape));
            return self.fail(loc, msg, ValueType::new(dtype, shape));
        }
        self.push(OpKind::Iota { dim }, ValueType::new(dtype, shape), loc)
    }

    pub(crate) fn roll(&mut self, x: ValueId, shift: ValueId, axis: usize, stride: Option<RollStride>, loc: Loc) -> ValueId {
        let t = self.vty(x);
        if let Some(s) = stride {
            if s.axis >= t.shape.len() || s.axis == axis {
                let msg = format!(
                    "roll along axis {axis} with a stride along axis {} of a value of shape {}: the stride's axis must be another axis of the tile (0..{})",
                    s.axis,
                    shape_str(&t.shape),
                    t.shape.len()
                );
                return self.fail(loc, msg, t);
            }
        }
        if axis >= t.shape.len() {
            return self.fail(
                loc,
                format!("roll along axis {axis} of a value of shape {}; a tile of rank {} has axes 0..{}", shape_str(&t.shape), t.shape.len(), t.shape.len()),
                t,
            );
        }
        let st = self.vty(shift);
        if st != ValueType::scalar(DType::I32) {
            return self.fail(loc, format!("roll: the shift must be an i32 scalar, not {st}"), t);
        }
        self.push(OpKind::Roll { x, shift, axis, stride }, t, loc)
    }

    pub(crate) fn slice(&mut self, x: ValueId, start: &[usize], shape: &[usize], loc: Loc) -> ValueId {
        let t = self.vty(x);
        let out = ValueType::new(t.dtype, shape);
        let fits =
            start.len() == t.shape.len() && shape.len() == t.shape.len() && start.iter().zip(shape).zip(&t.shape).all(|((s, l), d)| s.checked_add(*l).is_some_and(|e| e <= *d));
        if shape.contains(&0) {
            return self.fail(loc, format!("a slice of shape {} holds no elements; a tile has at least one along each axis", shape_str(shape)), out);
        }
        if !fits {
            return self.fail(loc, format!("slice of shape {} at {} does not fit in a value of shape {}", shape_str(shape), shape_str(start), shape_str(&t.shape)), out);
        }
        if shape == t.shape {
            return x;
        }
        self.push(OpKind::Slice { x, start: start.to_vec() }, out, loc)
    }

    pub(crate) fn concat(&mut self, xs: &[ValueId], axis: usize, loc: Loc) -> ValueId {
        let types: Vec<ValueType> = xs.iter().map(|&x| self.vty(x)).collect();
        let Some(first) = types.first().cloned() else { return self.fail(loc, "concatenate of no tiles", ValueType::scalar(DType::F32)) };
        if axis >= first.shape.len() {
            return self.fail(loc, format!("concatenate along axis {axis} of values of rank {}", first.shape.len()), first);
        }
        let mut shape = first.shape.clone();
        shape[axis] = 0;
        for t in &types {
            let mut other = t.shape.clone();
            if let Some(a) = other.get_mut(axis) {
                *a = 0;
            }
            if t.dtype != first.dtype || other != shape {
                let all: Vec<String> = types.iter().map(|t| t.to_string()).collect();
                return self.fail(loc, format!("concatenate along axis {axis}: values {} differ in dtype or in a dim other than {axis}", all.join(", ")), first);
            }
        }
        shape[axis] = types.iter().map(|t| t.shape[axis]).sum();
        if xs.len() == 1 {
            return xs[0];
        }
        self.push(OpKind::Concat { xs: xs.to_vec(), axis }, ValueType::new(first.dtype, shape), loc)
    }

    pub(crate) fn transpose(&mut self, x: ValueId, perm: &[usize], loc: Loc) -> ValueId {
        let t = self.vty(x);
        let mut sorted = perm.to_vec();
        sorted.sort_unstable();
        if sorted != (0..t.shape.len()).collect::<Vec<_>>() {
            return self.fail(loc, format!("transpose by {perm:?} of a rank-{} value: the permutation must list each of 0..{} once", t.shape.len(), t.shape.len()), t);
        }
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return x;
        }
        let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
        self.push(OpKind::Transpose { x, perm: perm.to_vec() }, ValueType::new(t.dtype, shape), loc)
    }

    pub(crate) fn bitcast(&mut self, x: ValueId, dtype: DType, loc: Loc) -> ValueId {
        let t = self.vty(x);
        let out = match t.bitcast_to(dtype) {
            Ok(out) => out,
            Err(why) => return self.fail(loc, why, ValueType::new(dtype, t.shape.clone())),
        };
        if t.dtype == dtype {
            return x;
        }
        self.push(OpKind::Bitcast { x }, out, loc)
    }

    pub(crate) fn assume_multiple(&mut self, x: ValueId, multiple: u32, loc: Loc) -> ValueId {
        let t = self.vty(x);
        if multiple == 0 {
            return self.fail(loc, "multiple_of(0): a value is a multiple of a positive number", t);
        }
        self.push(OpKind::AssumeMultiple { x, multiple }, t, loc)
    }

    pub(crate) fn prng_seed(&mut self, seeds: &[ValueId], loc: Loc) {
        if !self.in_kernel() {
            self.fail_silent(loc, "prng_seed is only available in a kernel body");
            return;
        }
        if seeds.is_empty() {
            self.fail_silent(loc, "prng_seed takes at least one seed");
            return;
        }
        for &s in seeds {
            let t = self.vty(s);
            if t != ValueType::scalar(DType::I32) {
                self.fail_silent(loc, format!("prng_seed: seeds are i32 scalars, not {t}"));
                return;
            }
        }
        self.seeded = true;
        self.push_op(crate::ir::Op { kind: OpKind::PrngSeed { seeds: seeds.to_vec() }, results: Vec::new(), loc });
    }

    pub(crate) fn prng_random_bits(&mut self, shape: &[usize], loc: Loc) -> ValueId {
        let t = ValueType::new(DType::I32, shape);
        if !self.in_kernel() {
            return self.fail(loc, "prng_random_bits is only available in a kernel body", t);
        }
        if shape.is_empty() {
            return self.fail(loc, "prng_random_bits gives a tile: pass a shape of rank 1 or more", t);
        }
        if !self.seeded {
            return self.fail(
                loc,
                "prng_random_bits before any prng_seed: seed the generator first (e.g. `prng_seed(&[seed, program_id(0)])`), so the bits are a function of the seeds",
                t,
            );
        }
        self.push(OpKind::PrngRandomBits, t, loc)
    }

    pub(crate) fn splat(&mut self, lit: Literal, dtype: DType, shape: &[usize], loc: Loc) -> ValueId {
        let c = self.constant(lit, dtype, loc);
        self.broadcast_to(c, shape, loc)
    }

    pub(crate) fn program_id(&mut self, axis: usize, num: bool, loc: Loc) -> ValueId {
        let t = ValueType::scalar(DType::I32);
        let what = if num { "num_programs" } else { "program_id" };
        if !self.in_kernel() {
            return self.fail(loc, format!("{what} is only available in a kernel body; index maps get the grid indices as arguments"), t);
        }
        if axis >= self.grid_rank() {
            return self.fail(loc, format!("{what}({axis}) on a grid of rank {}", self.grid_rank()), t);
        }
        let kind = if num { OpKind::NumPrograms { axis } } else { OpKind::ProgramId { axis } };
        self.push(kind, t, loc)
    }
}
