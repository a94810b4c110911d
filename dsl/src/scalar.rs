//! Integer and bool scalars evaluated straight from the IR, without the interpreter's
//! tensors: grid indices, constants, reads of scalar-prefetch tables and the integer ops
//! between them. The TPU model follows a kernel's index maps and conditions this way across
//! every step of a grid, for every candidate config, where the interpreter would take
//! seconds per config.

use crate::host::HostArray;
use crate::ir::{Func, Index, Literal, Offset, Op, OpKind, ValueId};
use crate::DType;

/// What a scalar is computed from besides other scalars.
pub struct Sources<'a> {
    /// The grid's bounds and the step's grid index (`ProgramId`, `NumPrograms`).
    pub grid: &'a [usize],
    pub point: &'a [usize],
    /// The refs that hold scalar-prefetch tables, and the tables, in the same order; a table
    /// missing here leaves its reads unknown.
    pub table_refs: &'a [ValueId],
    pub tables: &'a [HostArray],
}

/// The value of i32 or bool scalar `op` (bools as 0 and 1), if the operands it reads are known
/// (`get`) and it is an op this evaluator follows; the ops' own definitions compute it, in i32
/// as the kernels do. `None` for anything else, a constant past i32 included.
pub fn value(func: &Func, op: &Op, get: impl Fn(ValueId) -> Option<i64>, from: &Sources) -> Option<i64> {
    let result = *op.results.first()?;
    let ty = func.value_type(result)?;
    // i32 and bool only: narrower ints wrap in the interpreter, which this does not follow.
    if !ty.shape.is_empty() || !matches!(ty.dtype, DType::I32 | DType::Bool) {
        return None;
    }
    let is_bool = ty.dtype == DType::Bool;
    match &op.kind {
        OpKind::Constant(Literal::Int(i)) => i32::try_from(*i).ok().map(i64::from),
        OpKind::Constant(Literal::Bool(b)) => Some(i64::from(*b)),
        OpKind::ProgramId { axis } => from.point.get(*axis).map(|&i| i as i64),
        OpKind::NumPrograms { axis } => from.grid.get(*axis).map(|&n| n as i64),
        OpKind::Load { src, index } => table_element(from, *src, index, &get),
        OpKind::AssumeMultiple { x, .. } => get(*x),
        OpKind::Binary { op, lhs, rhs } => {
            let (a, b) = (get(*lhs)?, get(*rhs)?);
            let evals = op.def().evals();
            if is_bool {
                evals.boolean.map(|f| i64::from(f(a != 0, b != 0)))
            } else {
                evals.int.and_then(|f| f(i32::try_from(a).ok()?, i32::try_from(b).ok()?).ok()).map(i64::from)
            }
        }
        OpKind::Unary { op, x } => {
            let a = get(*x)?;
            let evals = op.def().evals();
            if is_bool {
                evals.boolean.map(|f| i64::from(f(a != 0)))
            } else {
                evals.int.and_then(|f| Some(i64::from(f(i32::try_from(a).ok()?))))
            }
        }
        OpKind::Compare { op, lhs, rhs } => Some(i64::from((op.def().eval)(get(*lhs)?.partial_cmp(&get(*rhs)?)))),
        OpKind::Select { cond, on_true, on_false } => get(if get(*cond)? != 0 { *on_true } else { *on_false }),
        OpKind::Cast { x } => {
            let a = get(*x)?;
            match ty.dtype {
                DType::Bool => Some(i64::from(a != 0)),
                DType::I32 => i32::try_from(a).ok().map(i64::from),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Element `index` of the i32 table behind ref `src`, if it is one of `from`'s and the index
/// is known and inside it.
fn table_element(from: &Sources, src: ValueId, index: &[Index], get: &impl Fn(ValueId) -> Option<i64>) -> Option<i64> {
    let position = from.table_refs.iter().position(|&r| r == src)?;
    let HostArray::I32(table) = from.tables.get(position)? else { return None };
    let at = index
        .iter()
        .map(|i| match i {
            Index::Point(Offset::Static(s)) => Some(*s),
            Index::Point(Offset::Dynamic(v)) => usize::try_from(get(*v)?).ok(),
            _ => None,
        })
        .collect::<Option<Vec<usize>>>()?;
    table.get(at.as_slice()).map(|&x| i64::from(x))
}

/// An index map read as integer scalars: its value arguments are the grid indices and its
/// ref arguments the scalar-prefetch tables, in order (told apart once, not at every point).
pub struct IndexMap<'f> {
    func: &'f Func,
    table_refs: Vec<ValueId>,
    grid_args: Vec<ValueId>,
}

impl<'f> IndexMap<'f> {
    pub fn new(func: &'f Func) -> Self {
        let (grid_args, table_refs) = func.args.iter().partition(|&&a| func.value_type(a).is_some());
        IndexMap { func, table_refs, grid_args }
    }

    /// The map's results at grid index `point`; `None` where it computes with anything
    /// [`value`] does not follow (the interpreter then runs it).
    pub fn at(&self, point: &[usize], tables: &[HostArray]) -> Option<Vec<i64>> {
        let func = self.func;
        let mut known: Vec<Option<i64>> = vec![None; func.values.len()];
        for (a, &i) in self.grid_args.iter().zip(point) {
            *known.get_mut(a.index())? = Some(i64::try_from(i).ok()?);
        }
        let from = Sources { grid: &[], point: &[], table_refs: &self.table_refs, tables };
        for op in &func.body.ops {
            let v = value(func, op, |x| known.get(x.index()).copied().flatten(), &from)?;
            *known.get_mut(op.results.first()?.index())? = Some(v);
        }
        func.results.iter().map(|r| known.get(r.index()).copied().flatten()).collect()
    }
}
