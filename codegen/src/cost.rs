//! A cost estimate computed from the IR, for the compiler's scheduler and our autotuner.
//!
//! Work is counted per grid step. Conditions and loop bounds computed from the grid indices
//! and constants alone (a causal kernel's `pl.when` over blocks right of the diagonal) are
//! evaluated at every step, so a step whose branch does nothing costs nothing; so are those
//! read from scalar-prefetch tables when the caller gives sample tables (a grouped matmul's
//! group ends). Any other condition counts its dearer branch, and a loop whose trip count is
//! data counts one pass.

use std::collections::{BTreeMap, HashMap};

use torchtpu_dsl::ir::{Func, Literal, OpKind, Region, ValueId};
use torchtpu_dsl::scalar::{self, Sources};
use torchtpu_dsl::{DType, HostArray, TracedCall};

/// Work of the whole call (every program), in Pallas' `CostEstimate` terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CostEstimate {
    pub flops: u64,
    pub transcendentals: u64,
    pub bytes_accessed: u64,
}

/// What a call's programs ask of a TPU core's units, summed over the grid.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    /// Matrix flops as traced.
    pub dot_flops: f64,
    /// Matrix flops with M, N and K padded to the matrix unit's tile.
    pub mxu_flops: f64,
    /// The part of `mxu_flops` whose operands are f32 (several MXU passes each).
    pub f32_mxu_flops: f64,
    /// Element operations on the vector unit: arithmetic, compares, selects, reductions.
    pub vector_ops: f64,
    /// Transcendental elements (exp, log, tanh, ...).
    pub transcendentals: f64,
    /// Grid steps that run any of it (a skipped step still pays the pipeline's overhead).
    pub active_steps: f64,
}

impl Work {
    fn add(&mut self, o: Work, times: f64) {
        self.dot_flops += o.dot_flops * times;
        self.mxu_flops += o.mxu_flops * times;
        self.f32_mxu_flops += o.f32_mxu_flops * times;
        self.vector_ops += o.vector_ops * times;
        self.transcendentals += o.transcendentals * times;
        self.active_steps += o.active_steps * times;
    }

    /// Each field the larger of the two: a branch nobody can predict.
    fn dearer(self, o: Work) -> Work {
        Work {
            dot_flops: self.dot_flops.max(o.dot_flops),
            mxu_flops: self.mxu_flops.max(o.mxu_flops),
            f32_mxu_flops: self.f32_mxu_flops.max(o.f32_mxu_flops),
            vector_ops: self.vector_ops.max(o.vector_ops),
            transcendentals: self.transcendentals.max(o.transcendentals),
            active_steps: self.active_steps.max(o.active_steps),
        }
    }

    fn is_zero(&self) -> bool {
        self.dot_flops == 0.0 && self.vector_ops == 0.0 && self.transcendentals == 0.0
    }
}

/// The most grid points whose conditions are evaluated one by one; past it, every condition
/// counts its dearer branch.
const MAX_EVALUATED_POINTS: usize = 1 << 18;

/// Integer and bool scalars (bools as 0 and 1) known before a step runs.
type Known = HashMap<ValueId, i64>;

/// Where a step's work forks on a value: an `if`'s condition or a loop's bounds.
fn decisions(region: &Region, out: &mut Vec<ValueId>) {
    region.walk(&mut |op| match &op.kind {
        OpKind::If { cond, .. } => out.push(*cond),
        OpKind::For { lo, hi, .. } => out.extend([*lo, *hi]),
        _ => {}
    });
}

/// The grid axes each top-level scalar is computed from, as a bit set.
fn axes_of(func: &Func) -> HashMap<ValueId, u64> {
    let mut axes: HashMap<ValueId, u64> = HashMap::new();
    for op in &func.body.ops {
        let mask = match op.kind {
            OpKind::ProgramId { axis } if axis < 64 => 1 << axis,
            _ => op.operands().iter().map(|v| axes.get(v).copied().unwrap_or(0)).fold(0, |a, b| a | b),
        };
        for &r in &op.results {
            axes.insert(r, mask);
        }
    }
    axes
}

/// One run of `region` with the decisions in `known`.
fn region_work(func: &Func, region: &Region, known: &Known, mxu: usize) -> Work {
    let elems = |v: ValueId| func.value_type(v).map_or(1.0, |t| t.num_elements() as f64);
    // Scalars (grid indices, loop counters) run on the scalar unit, beside the vector work.
    let vector = |v: ValueId| func.value_type(v).is_some_and(|t| !t.shape.is_empty());
    let mut w = Work::default();
    for op in &region.ops {
        match &op.kind {
            OpKind::Dot { lhs, transpose_lhs, .. } => {
                let lhs_type = func.value_type(*lhs);
                let a = lhs_type.map(|t| t.shape.clone()).unwrap_or_default();
                let r = func.value_type(op.results[0]).map(|t| t.shape.clone()).unwrap_or_default();
                let k = if *transpose_lhs { a.first() } else { a.get(1) }.copied().unwrap_or(1);
                let (m, n) = (r.first().copied().unwrap_or(1), r.get(1).copied().unwrap_or(1));
                let pad = |d: usize| d.div_ceil(mxu.max(1)) * mxu.max(1);
                let padded = 2.0 * (pad(m) * pad(n) * pad(k)) as f64;
                w.dot_flops += 2.0 * (m * n * k) as f64;
                w.mxu_flops += padded;
                if lhs_type.is_some_and(|t| t.dtype == DType::F32) {
                    w.f32_mxu_flops += padded;
                }
            }
            OpKind::Unary { .. } | OpKind::Binary { .. } | OpKind::Compare { .. } | OpKind::Select { .. } if !vector(op.results[0]) => {}
            OpKind::Unary { op: u, .. } if u.def().transcendental => w.transcendentals += elems(op.results[0]),
            OpKind::Binary { op: b, .. } if b.def().transcendental => w.transcendentals += elems(op.results[0]),
            OpKind::Unary { .. } | OpKind::Binary { .. } | OpKind::Compare { .. } | OpKind::Select { .. } => w.vector_ops += elems(op.results[0]),
            OpKind::Reduce { x, .. } => w.vector_ops += elems(*x),
            OpKind::If { cond, then_region, else_region } => {
                let (a, b) = (region_work(func, then_region, known, mxu), region_work(func, else_region, known, mxu));
                w.add(
                    match known.get(cond) {
                        Some(&c) if c != 0 => a,
                        Some(_) => b,
                        None => a.dearer(b),
                    },
                    1.0,
                );
            }
            // Its trip count is data: counted as one pass.
            OpKind::While { cond, body, .. } => {
                for r in [cond, body] {
                    w.add(region_work(func, r, known, mxu), 1.0);
                }
            }
            OpKind::For { lo, hi, body, .. } => {
                let trips = match (known.get(lo), known.get(hi)) {
                    (Some(&l), Some(&h)) => (h - l).max(0) as f64,
                    _ => 1.0,
                };
                w.add(region_work(func, body, known, mxu), trips);
            }
            _ => {}
        }
    }
    w.active_steps = if w.is_zero() { 0.0 } else { 1.0 };
    w
}

/// The work of every grid step of `call`, with matrix dims padded to `mxu` (1: none), and
/// `tables` standing for its scalar-prefetch arrays (none: conditions they decide count their
/// dearer branch).
pub fn work(call: &TracedCall, mxu: usize, tables: &[HostArray]) -> Work {
    let func = &call.body;
    let mut sites = Vec::new();
    decisions(&func.body, &mut sites);
    // Constants anywhere are known at every step (a loop's bounds inside a branch).
    let mut constants = Known::new();
    func.body.walk(&mut |op| {
        if let (OpKind::Constant(Literal::Int(i)), Some(&r)) = (&op.kind, op.results.first()) {
            constants.insert(r, *i);
        }
    });
    let axes = axes_of(func);
    let varying: u64 = sites.iter().map(|s| axes.get(s).copied().unwrap_or(0)).fold(0, |a, b| a | b);
    let varying_axes: Vec<usize> = (0..call.grid.len()).filter(|&a| a < 64 && varying & (1 << a) != 0).collect();
    // Past the cap (or past usize), every condition counts its dearer branch.
    let evaluated = varying_axes.iter().try_fold(1usize, |n, &a| n.checked_mul(call.grid[a])).unwrap_or(usize::MAX);
    let programs = call.num_programs() as f64;
    if evaluated == 0 || programs == 0.0 {
        return Work::default();
    }
    if evaluated > MAX_EVALUATED_POINTS {
        let mut w = Work::default();
        w.add(region_work(func, &func.body, &constants, mxu), programs);
        return w;
    }
    // Steps that take the same decisions do the same work: each distinct set is walked once.
    // Ordered, so that the totals are summed in the same order on every call.
    let mut counts: BTreeMap<Vec<Option<i64>>, (Known, usize)> = BTreeMap::new();
    let mut point = vec![0usize; call.grid.len()];
    // One map for every point, refilled from the constants (a clone per point would allocate).
    let mut known = Known::new();
    for mut flat in 0..evaluated {
        for &a in varying_axes.iter().rev() {
            point[a] = flat % call.grid[a];
            flat /= call.grid[a];
        }
        known.clone_from(&constants);
        let sources = Sources { grid: &call.grid, point: &point, table_refs: func.args.get(..call.prefetch.len()).unwrap_or_default(), tables };
        for op in &func.body.ops {
            if let Some(v) = scalar::value(func, op, |v| known.get(&v).copied(), &sources) {
                known.insert(op.results[0], v);
            }
        }
        let key: Vec<Option<i64>> = sites.iter().map(|s| known.get(s).copied()).collect();
        counts.entry(key).or_insert_with(|| (known.clone(), 0)).1 += 1;
    }
    let per_point = programs / evaluated as f64;
    let mut total = Work::default();
    for (known, n) in counts.into_values() {
        total.add(region_work(func, &func.body, &known, mxu), n as f64 * per_point);
    }
    total
}

/// Flops and transcendentals over all programs; bytes are every operand array read or written once.
pub fn estimate(call: &TracedCall) -> CostEstimate {
    let w = work(call, 1, &[]);
    let bytes = call.operand_types().chain(call.outputs.iter().map(|o| &o.array)).map(|a| a.size_bytes() as u64).sum();
    CostEstimate { flops: (w.dot_flops + w.vector_ops).round() as u64, transcendentals: w.transcendentals.round() as u64, bytes_accessed: bytes }
}
