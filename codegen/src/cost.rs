//! A cost estimate computed from the IR, for the compiler's scheduler and our autotuner.

use torchtpu_dsl::ir::{Func, Literal, OpKind, Region};
use torchtpu_dsl::TracedCall;

/// Work of the whole call (every program), in Pallas' `CostEstimate` terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CostEstimate {
    pub flops: u64,
    pub transcendentals: u64,
    pub bytes_accessed: u64,
}

/// The value of a constant i32 op defining `v`, if it is one (to count loop trips).
fn constant_of(func: &Func, region: &Region, v: torchtpu_dsl::ir::ValueId) -> Option<i64> {
    let mut found = None;
    let mut visit = |r: &Region| {
        for op in &r.ops {
            if op.results.first() == Some(&v) {
                if let OpKind::Constant(Literal::Int(i)) = op.kind {
                    found = Some(i);
                }
            }
        }
    };
    visit(&func.body);
    visit(region);
    found
}

/// (flops, transcendentals) of one run of `region`; a traced `if` counts its dearer branch.
fn region_cost(func: &Func, region: &Region) -> (u64, u64) {
    let elems = |v: torchtpu_dsl::ir::ValueId| func.value_type(v).map_or(1, |t| t.num_elements() as u64);
    let (mut flops, mut trans) = (0u64, 0u64);
    for op in &region.ops {
        match &op.kind {
            OpKind::Dot { lhs, transpose_lhs, .. } => {
                let a = func.value_type(*lhs).map(|t| t.shape.clone()).unwrap_or_default();
                let k = if *transpose_lhs { a.first() } else { a.get(1) }.copied().unwrap_or(1) as u64;
                flops += 2 * k * elems(op.results[0]);
            }
            OpKind::Unary { op: u, .. } => {
                let n = elems(op.results[0]);
                if u.def().transcendental {
                    trans += n;
                } else {
                    flops += n;
                }
            }
            OpKind::Binary { op: b, .. } => {
                let n = elems(op.results[0]);
                if b.def().transcendental {
                    trans += n;
                } else {
                    flops += n;
                }
            }
            OpKind::Compare { .. } | OpKind::Select { .. } => flops += elems(op.results[0]),
            OpKind::Reduce { x, .. } => flops += elems(*x),
            OpKind::If { then_region, else_region, .. } => {
                let (a, b) = (region_cost(func, then_region), region_cost(func, else_region));
                flops += a.0.max(b.0);
                trans += a.1.max(b.1);
            }
            // Its trip count is data: counted as one pass.
            OpKind::While { cond, body, .. } => {
                for r in [cond, body] {
                    let (f, t) = region_cost(func, r);
                    flops += f;
                    trans += t;
                }
            }
            OpKind::For { lo, hi, body, .. } => {
                let trips = match (constant_of(func, region, *lo), constant_of(func, region, *hi)) {
                    (Some(l), Some(h)) => (h - l).max(0) as u64,
                    _ => 1,
                };
                let (f, t) = region_cost(func, body);
                flops += f * trips;
                trans += t * trips;
            }
            _ => {}
        }
    }
    (flops, trans)
}

/// Flops and transcendentals over all programs; bytes are every operand array read or written once.
pub fn estimate(call: &TracedCall) -> CostEstimate {
    let (f, t) = region_cost(&call.body, &call.body.body);
    let programs = call.num_programs() as u64;
    let bytes = call.operand_types().chain(call.outputs.iter().map(|o| &o.array)).map(|a| a.size_bytes() as u64).sum();
    CostEstimate { flops: f * programs, transcendentals: t * programs, bytes_accessed: bytes }
}
