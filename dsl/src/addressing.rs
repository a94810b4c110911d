//! Which dynamic slice offsets a TPU can address.
//!
//! A TPU loads and stores whole (sublane, lane) tiles of VMEM, so Mosaic must prove, from the
//! ops that computed it, that an offset along a tiled dim is a whole number of tiles; when it
//! cannot, libtpu refuses the kernel (E2003, or "dynamic load with unaligned indices") with no
//! Rust line. The interpreter and PJRT CPU run such kernels happily. This module makes the same
//! proof over the kernel IR, so that `lower()` for a TPU and the checked interpreter refuse the
//! kernel at its Rust line instead. What it accepts and refuses was measured against libtpu
//! 0.0.52 (`codegen/tests/dynamic_offsets.rs`):
//! - offsets that fold to a constant are always addressable (Mosaic treats them as static);
//! - along lanes, an offset must be a multiple of 128;
//! - along sublanes, a multiple of 8 — except, for 32-bit types, in a ref at most 128 lanes
//!   wide (one column of tiles, which Mosaic re-tiles by single rows) or when one row is read.

use std::collections::HashMap;

use crate::call::{memref_access, RefLayout, TracedCall, LANES, MIN_SUBLANES};
use crate::ir::{BinaryOp, Func, Index, Literal, Loc, Offset, OpKind, ValueId};

/// What is known about an i32 scalar at trace time.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    Const(i64),
    /// A multiple of this (at least 1).
    Multiple(u64),
}

impl Known {
    /// The largest number it is known to be a multiple of; 0 for the constant 0.
    fn multiple(self) -> u64 {
        match self {
            Known::Const(c) => c.unsigned_abs(),
            Known::Multiple(m) => m,
        }
    }

    fn divisible_by(self, d: u64) -> bool {
        self.multiple() % d == 0
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A multiple of `m`, where `m` = 0 means the value is 0.
fn multiple_of(m: u64) -> Known {
    if m == 0 {
        Known::Const(0)
    } else {
        Known::Multiple(m)
    }
}

/// Folds constants and tracks divisibility through the ops Mosaic's prover looks through
/// (add, sub, mul, division by a constant, rem, min, select, casts); anything else is a multiple of 1 only.
fn combine(op: BinaryOp, a: Known, b: Known) -> Known {
    use Known::Const;
    let folded = match (a, b) {
        (Const(x), Const(y)) => match op {
            BinaryOp::Add => x.checked_add(y),
            BinaryOp::Sub => x.checked_sub(y),
            BinaryOp::Mul => x.checked_mul(y),
            BinaryOp::Rem => x.checked_rem(y),
            BinaryOp::Min => Some(x.min(y)),
            BinaryOp::Max => Some(x.max(y)),
            _ => None,
        },
        _ => None,
    };
    if let Some(c) = folded {
        return Const(c);
    }
    match op {
        BinaryOp::Mul if a == Const(0) || b == Const(0) => Const(0),
        BinaryOp::Mul => Known::Multiple(a.multiple().saturating_mul(b.multiple()).max(1)),
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Rem | BinaryOp::Min => multiple_of(gcd(a.multiple(), b.multiple())),
        BinaryOp::Div => match b {
            Const(c) if c != 0 && a.multiple() % c.unsigned_abs() == 0 => multiple_of(a.multiple() / c.unsigned_abs()),
            _ => Known::Multiple(1),
        },
        _ => Known::Multiple(1),
    }
}

/// What is known about every i32 scalar the kernel body computes.
fn knowledge(call: &TracedCall) -> HashMap<ValueId, Known> {
    let body = &call.body;
    let mut known: HashMap<ValueId, Known> = HashMap::new();
    body.walk(&mut |op| {
        let get = |v: &ValueId, known: &HashMap<ValueId, Known>| known.get(v).copied().unwrap_or(Known::Multiple(1));
        let result = match &op.kind {
            OpKind::Constant(Literal::Int(c)) => Known::Const(*c),
            OpKind::NumPrograms { axis } => call.grid.get(*axis).map_or(Known::Multiple(1), |&n| Known::Const(n as i64)),
            OpKind::Binary { op: bin, lhs, rhs } => combine(*bin, get(lhs, &known), get(rhs, &known)),
            OpKind::Cast { x } => get(x, &known),
            OpKind::AssumeMultiple { x, multiple } => match get(x, &known) {
                Known::Const(c) => Known::Const(c),
                // Known to be a multiple of both: of their least common multiple.
                k => {
                    let (a, b) = (k.multiple().max(1), u64::from(*multiple));
                    multiple_of(a / gcd(a, b) * b)
                }
            },
            OpKind::Select { on_true, on_false, .. } => match (get(on_true, &known), get(on_false, &known)) {
                (a, b) if a == b => a,
                (a, b) => multiple_of(gcd(a.multiple(), b.multiple())),
            },
            _ => return,
        };
        if let Some(&r) = op.results.first() {
            known.insert(r, result);
        }
    });
    known
}

/// Every dynamic offset in `call`'s body that a TPU cannot address, as messages naming the
/// ref, the dim, the kernel's Rust line, and what would be addressable.
pub(crate) fn unaligned_offsets(call: &TracedCall) -> Vec<String> {
    let known = knowledge(call);
    let layouts: HashMap<ValueId, RefLayout> = call.ref_layouts().into_iter().map(|l| (l.arg, l)).collect();
    let mut out = Vec::new();
    call.body.walk(&mut |op| {
        let (r, index) = match &op.kind {
            OpKind::Load { src, index } => (src, index),
            OpKind::Store { dst, index, .. } => (dst, index),
            _ => return,
        };
        let Some(layout) = layouts.get(r) else { return };
        if layout.memref.space != crate::ir::MemorySpace::Vmem {
            return;
        }
        out.extend(check_access(&call.body, layout, index, &known, op.loc));
    });
    out
}

fn check_access(body: &Func, layout: &RefLayout, index: &[Index], known: &HashMap<ValueId, Known>, loc: Loc) -> Vec<String> {
    let access = memref_access(&layout.memref.shape, &layout.squeezed, index);
    let rank = access.len();
    let shape = &layout.memref.shape;
    let wide_32bit = layout.memref.dtype.size_bytes() == 4;
    let mut out = Vec::new();
    for (dim, &(offset, len)) in access.iter().enumerate() {
        let Offset::Dynamic(v) = offset else { continue };
        let k = known.get(&v).copied().unwrap_or(Known::Multiple(1));
        if matches!(k, Known::Const(_)) {
            continue;
        }
        let (tile, what) = if dim + 1 == rank {
            (LANES as u64, "lanes")
        } else if dim + 2 == rank {
            let lanes = shape.last().copied().unwrap_or(0);
            let lanes_read = access.last().map_or(0, |a| a.1);
            if wide_32bit && (lanes <= LANES || (len == 1 && lanes_read > LANES)) {
                continue;
            }
            (MIN_SUBLANES as u64, "rows")
        } else {
            continue;
        };
        if !k.divisible_by(tile) {
            let name = body.loc(v);
            out.push(format!(
                "{loc}: a dynamic offset along {what} (dim {dim} of a {} block) is not provably a multiple of {tile}; a TPU addresses whole {tile}-{what} tiles, so compute the offset as a multiple of {tile} (e.g. `i * {tile}`, offset computed at {name}), or load the aligned block and slice the loaded value",
                layout.memref
            ));
        }
    }
    out
}
