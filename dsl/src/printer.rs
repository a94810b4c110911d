//! A readable text form of the IR, for debugging (`Display` on [`Func`]).

use std::fmt::{self, Write};

use crate::ir::{Func, Index, Op, OpKind, Region};

impl fmt::Display for Func {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "func @{}(", self.name)?;
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}: {}", self.ty(*a))?;
        }
        f.write_str(") {\n")?;
        let mut out = String::new();
        print_region(self, &self.body, 1, &mut out)?;
        f.write_str(&out)?;
        if !self.results.is_empty() {
            let r: Vec<String> = self.results.iter().map(|v| v.to_string()).collect();
            writeln!(f, "  return {}", r.join(", "))?;
        }
        f.write_str("}\n")
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn index(ix: &[Index]) -> String {
    format!("[{}]", list(ix))
}

fn print_region(func: &Func, region: &Region, depth: usize, out: &mut String) -> fmt::Result {
    for op in &region.ops {
        print_op(func, op, depth, out)?;
    }
    Ok(())
}

fn print_op(func: &Func, op: &Op, depth: usize, out: &mut String) -> fmt::Result {
    let pad = "  ".repeat(depth);
    out.push_str(&pad);
    if !op.results.is_empty() {
        write!(out, "{} = ", list(&op.results))?;
    }
    use OpKind::*;
    match &op.kind {
        Constant(l) => write!(out, "constant {l}")?,
        ProgramId { axis } => write!(out, "program_id {axis}")?,
        NumPrograms { axis } => write!(out, "num_programs {axis}")?,
        Load { src, index: ix } => write!(out, "load {src}{}", index(ix))?,
        Store { dst, index: ix, value } => write!(out, "store {value} -> {dst}{}", index(ix))?,
        Unary { op: u, x } => write!(out, "{} {x}", u.name())?,
        Binary { op: b, lhs, rhs } => write!(out, "{} {lhs}, {rhs}", b.name())?,
        Compare { op: c, lhs, rhs } => write!(out, "cmp {} {lhs}, {rhs}", c.name())?,
        Select { cond, on_true, on_false } => write!(out, "select {cond}, {on_true}, {on_false}")?,
        Cast { x } => write!(out, "cast {x}")?,
        Broadcast { x } => write!(out, "broadcast {x}")?,
        Reshape { x } => write!(out, "reshape {x}")?,
        Reduce { op: r, x, axis } => write!(out, "reduce_{} {x} axis {axis}", r.name())?,
        Dot { lhs, rhs, transpose_lhs, transpose_rhs } => write!(out, "dot {lhs}{}, {rhs}{}", if *transpose_lhs { "ᵀ" } else { "" }, if *transpose_rhs { "ᵀ" } else { "" })?,
        Iota { dim } => write!(out, "iota dim {dim}")?,
        Roll { x, shift, axis, stride: None } => write!(out, "roll {x} by {shift} axis {axis}")?,
        Roll { x, shift, axis, stride: Some(s) } => write!(out, "roll {x} by {shift} axis {axis} stride {} axis {}", s.stride, s.axis)?,
        Slice { x, start } => write!(out, "slice {x} at {start:?}")?,
        Concat { xs, axis } => write!(out, "concat {} axis {axis}", list(xs))?,
        Transpose { x, perm } => write!(out, "transpose {x} {perm:?}")?,
        Bitcast { x } => write!(out, "bitcast {x}")?,
        AssumeMultiple { x, multiple } => write!(out, "assume_multiple {x}, {multiple}")?,
        PrngSeed { seeds } => write!(out, "prng_seed {}", list(seeds))?,
        PrngRandomBits => write!(out, "prng_random_bits")?,
        DmaStart(c) | DmaWait(c) => write!(
            out,
            "{} {}{} -> {}{} signalling {}{}",
            if matches!(op.kind, DmaStart(_)) { "dma_start" } else { "dma_wait" },
            c.src,
            index(&c.src_index),
            c.dst,
            index(&c.dst_index),
            c.sem,
            index(&c.sem_index)
        )?,
        Yield { values } => write!(out, "yield {}", list(values))?,
        If { cond, then_region, else_region } => {
            writeln!(out, "if {cond} {{")?;
            print_region(func, then_region, depth + 1, out)?;
            writeln!(out, "{pad}}} else {{")?;
            print_region(func, else_region, depth + 1, out)?;
            write!(out, "{pad}}}")?;
        }
        While { inits, cond, body } => {
            writeln!(out, "while ({}) carrying ({}) {{", list(&cond.args), list(inits))?;
            print_region(func, cond, depth + 1, out)?;
            writeln!(out, "{pad}}} do ({}) {{", list(&body.args))?;
            print_region(func, body, depth + 1, out)?;
            write!(out, "{pad}}}")?;
        }
        For { lo, hi, inits, body } => {
            let args = list(&body.args);
            writeln!(out, "for ({args}) in {lo}..{hi} carrying ({}) {{", list(inits))?;
            print_region(func, body, depth + 1, out)?;
            write!(out, "{pad}}}")?;
        }
    }
    if op.results.len() == 1 {
        write!(out, " : {}", func.ty(op.results[0]))?;
    }
    writeln!(out, "    // {}:{}", op.loc.file, op.loc.line)
}
