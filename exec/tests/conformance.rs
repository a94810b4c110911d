//! The conformance matrix: every elementwise op and cast, on every dtype it claims, on edge
//! values (0, ±0, ±1, ±inf, NaN, subnormals, the largest finite, integer min/max), run by the
//! interpreter and by PJRT CPU against an f64 (or exact integer) reference written here, and
//! compiled by libtpu for every chip. The table it measures is `docs/conformance.md`; run with
//! `TORCHTPU_WRITE_CONFORMANCE=1` to rewrite it after changing an op.

use std::collections::BTreeMap;
use std::fmt::Write;

use half::{bf16, f16};
use ndarray::ArrayD;
use torchtpu_codegen::{lower, stablehlo, Form, Target};
use torchtpu_dsl::ir::{BinaryOp, CmpOp, UnaryOp, ValueType};
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::KernelDef;
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::{Chip, TpuCompiler};

/// One tile, tall enough for the narrowest dtype's native tiling (i8 tiles are 32 × 128).
const SHAPE: [usize; 2] = [32, 128];
const N: usize = SHAPE[0] * SHAPE[1];

/// Bool operands travel as i32 (0 or 1): refs of i1 are not a TPU memory layout.
#[tpu_kernel]
fn unary_kernel<T: Element>(x: &Ref<T>, y: &mut Ref<T>, op: UnaryOp) {
    y.store(x.load().unary_op(op));
}

#[tpu_kernel]
fn unary_bool_kernel(x: &Ref<i32>, y: &mut Ref<i32>, op: UnaryOp) {
    y.store(x.load().cast::<bool>().unary_op(op).cast::<i32>());
}

#[tpu_kernel]
fn binary_kernel<T: Element>(a: &Ref<T>, b: &Ref<T>, y: &mut Ref<T>, op: BinaryOp) {
    y.store(a.load().binary_op(op, b.load()));
}

#[tpu_kernel]
fn binary_bool_kernel(a: &Ref<i32>, b: &Ref<i32>, y: &mut Ref<i32>, op: BinaryOp) {
    y.store(a.load().cast::<bool>().binary_op(op, b.load().cast::<bool>()).cast::<i32>());
}

#[tpu_kernel]
fn compare_kernel<T: Element>(a: &Ref<T>, b: &Ref<T>, y: &mut Ref<i32>, op: CmpOp) {
    y.store(a.load().compare_op(op, b.load()).cast::<i32>());
}

#[tpu_kernel]
fn compare_bool_kernel(a: &Ref<i32>, b: &Ref<i32>, y: &mut Ref<i32>, op: CmpOp) {
    y.store(a.load().cast::<bool>().compare_op(op, b.load().cast::<bool>()).cast::<i32>());
}

/// `cast::<U>()` from any dtype to any other; operands and results travel as in the others.
#[tpu_kernel]
fn cast_kernel<T: Element, U: Element>(x: &Ref<T>, y: &mut Ref<U>, through_bool: bool) {
    let v = x.load();
    y.store(if through_bool { v.cast::<bool>().cast::<U>() } else { v.cast::<U>() });
}

const DTYPES: [DType; 6] = [DType::F32, DType::BF16, DType::F16, DType::I32, DType::I8, DType::Bool];

#[derive(Clone, Copy, Debug)]
enum Op {
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    /// A conversion to this dtype.
    Cast(DType),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Cast(to) => match to {
                DType::F32 => "cast to f32",
                DType::BF16 => "cast to bf16",
                DType::F16 => "cast to f16",
                DType::I32 => "cast to i32",
                DType::I8 => "cast to i8",
                DType::Bool => "cast to bool",
            },
        }
    }

    fn arity(self) -> usize {
        match self {
            Op::Unary(_) | Op::Cast(_) => 1,
            _ => 2,
        }
    }

    fn dtypes(self) -> Vec<DType> {
        match self {
            Op::Unary(u) => u.def().dtypes(),
            Op::Binary(b) => b.def().dtypes(),
            Op::Compare(_) => DTYPES.to_vec(),
            Op::Cast(to) => DTYPES.into_iter().filter(|&d| d != to).collect(),
        }
    }

    /// The dtype of the result for operands of `dtype`.
    fn result(self, dtype: DType) -> DType {
        match self {
            Op::Cast(to) => to,
            Op::Compare(_) => DType::Bool,
            _ => dtype,
        }
    }

    /// How far from the reference an output may be, in units in the last place of its dtype.
    /// Ops IEEE rounds correctly get one (the interpreter rounds f32 results to narrow dtypes,
    /// a second rounding); transcendentals get the spread of the backends' approximations.
    fn ulps(self) -> f64 {
        match self {
            Op::Unary(UnaryOp::Exp | UnaryOp::Exp2 | UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Logistic | UnaryOp::Erf | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Rsqrt) => 4.0,
            Op::Binary(BinaryOp::Pow) => 4.0,
            _ => 1.0,
        }
    }
}

fn kernel(op: Op, dtype: DType) -> KernelDef {
    macro_rules! typed {
        ($k:ident, $op:expr) => {
            match dtype {
                DType::F32 => $k::kernel::<f32>($op),
                DType::BF16 => $k::kernel::<bf16>($op),
                DType::F16 => $k::kernel::<f16>($op),
                DType::I32 | DType::Bool => $k::kernel::<i32>($op),
                DType::I8 => $k::kernel::<i8>($op),
            }
        };
    }
    macro_rules! cast {
        ($t:ty, $through:expr) => {
            match op {
                Op::Cast(DType::F32) => cast_kernel::kernel::<$t, f32>($through),
                Op::Cast(DType::BF16) => cast_kernel::kernel::<$t, bf16>($through),
                Op::Cast(DType::F16) => cast_kernel::kernel::<$t, f16>($through),
                Op::Cast(DType::I8) => cast_kernel::kernel::<$t, i8>($through),
                _ => cast_kernel::kernel::<$t, i32>($through),
            }
        };
    }
    if let Op::Cast(to) = op {
        let through = dtype == DType::Bool || to == DType::Bool;
        return match dtype {
            DType::F32 => cast!(f32, through),
            DType::BF16 => cast!(bf16, through),
            DType::F16 => cast!(f16, through),
            DType::I8 => cast!(i8, through),
            DType::I32 | DType::Bool => cast!(i32, through),
        };
    }
    match (op, dtype) {
        (Op::Cast(_), _) => unreachable!("handled above"),
        (Op::Unary(u), DType::Bool) => unary_bool_kernel::kernel(u),
        (Op::Binary(b), DType::Bool) => binary_bool_kernel::kernel(b),
        (Op::Compare(c), DType::Bool) => compare_bool_kernel::kernel(c),
        (Op::Unary(u), _) => typed!(unary_kernel, u),
        (Op::Binary(b), _) => typed!(binary_kernel, b),
        (Op::Compare(c), _) => typed!(compare_kernel, c),
    }
}

/// The dtype operands are stored in (bools as i32).
fn storage(dtype: DType) -> DType {
    if dtype == DType::Bool {
        DType::I32
    } else {
        dtype
    }
}

fn call(op: Op, dtype: DType) -> PallasCall {
    let spec = || BlockSpec::new(SHAPE, |[_i]| (0, 0));
    let ins: Vec<BlockSpec> = (0..op.arity()).map(|_| spec()).collect();
    PallasCall::new(kernel(op, dtype)).grid([1]).in_specs(ins).out_specs([spec()]).out_shapes([SHAPE])
}

fn finfo(dtype: DType) -> (f64, f64, i32) {
    // (largest finite, smallest normal, mantissa bits)
    match dtype {
        DType::F32 => (f32::MAX as f64, f32::MIN_POSITIVE as f64, 23),
        DType::BF16 => (bf16::MAX.to_f64(), bf16::MIN_POSITIVE.to_f64(), 7),
        _ => (f16::MAX.to_f64(), f16::MIN_POSITIVE.to_f64(), 10),
    }
}

fn edge_values(dtype: DType) -> Vec<f64> {
    match dtype {
        DType::Bool => vec![0.0, 1.0],
        DType::I32 => [0, 1, -1, 2, -2, 3, 7, -7, 31, 32, 33, 100, -100, 12345, -12345, 65536, i32::MAX - 1, i32::MAX, i32::MIN + 1, i32::MIN].map(f64::from).to_vec(),
        DType::I8 => [0, 1, -1, 2, -2, 3, 7, -7, 31, 32, 33, 100, -100, 126, 127, -127, -128].map(f64::from).to_vec(),
        _ => {
            let (max, min_normal, _) = finfo(dtype);
            let mut v = vec![0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, 0.1, -0.1, 10.0, -10.0, 20.0, 88.0, -88.0, 1e4, -1e4];
            v.extend([max, -max, max / 2.0, min_normal, -min_normal, min_normal / 4.0, -min_normal / 4.0, std::f64::consts::PI, -std::f64::consts::PI]);
            v.extend([f64::INFINITY, f64::NEG_INFINITY, f64::NAN]);
            v.into_iter().map(|x| dtype.round(x)).collect()
        }
    }
}

/// What `op` computes on `args` (already of the dtype), exactly or in f64; `None` outside its
/// domain (the interpreter reports those, tested separately).
fn reference(op: Op, dtype: DType, args: &[f64]) -> Option<f64> {
    let (x, y) = (args[0], args.get(1).copied().unwrap_or(0.0));
    let float = dtype.is_float();
    let wrap = |v: i64| -> f64 {
        match dtype {
            DType::I8 => v as i8 as f64,
            DType::Bool => (v & 1) as f64,
            _ => v as i32 as f64,
        }
    };
    let (a, b) = (x as i64, y as i64);
    let r = match op {
        Op::Unary(u) if float => match u {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Exp2 => x.exp2(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Logistic => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Erf => libm::erf(x),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Floor => x.floor(),
            UnaryOp::Ceil => x.ceil(),
            UnaryOp::Not => return None,
        },
        Op::Unary(u) => match u {
            UnaryOp::Neg => wrap(-a),
            UnaryOp::Abs => wrap(a.abs()),
            UnaryOp::Not if dtype == DType::Bool => 1.0 - x,
            UnaryOp::Not => wrap(!a),
            _ => return None,
        },
        Op::Binary(o) if float => match o {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Rem => x % y,
            BinaryOp::Max if x.is_nan() || y.is_nan() => f64::NAN,
            BinaryOp::Min if x.is_nan() || y.is_nan() => f64::NAN,
            BinaryOp::Max => x.max(y),
            BinaryOp::Min => x.min(y),
            BinaryOp::Pow => x.powf(y),
            _ => return None,
        },
        Op::Binary(o) => match o {
            BinaryOp::Add => wrap(a + b),
            BinaryOp::Sub => wrap(a - b),
            BinaryOp::Mul => wrap(a.wrapping_mul(b)),
            BinaryOp::Div if b == 0 => return None,
            BinaryOp::Rem if b == 0 => return None,
            BinaryOp::Div => wrap(a / b),
            BinaryOp::Rem => wrap(a % b),
            BinaryOp::Max | BinaryOp::Or => wrap(if matches!(o, BinaryOp::Max) { a.max(b) } else { a | b }),
            BinaryOp::Min => wrap(a.min(b)),
            BinaryOp::And => wrap(a & b),
            BinaryOp::Xor => wrap(a ^ b),
            BinaryOp::ShiftLeft | BinaryOp::ShiftRightArithmetic | BinaryOp::ShiftRightLogical if !(0..32).contains(&b) => return None,
            BinaryOp::ShiftLeft => wrap(a << b),
            BinaryOp::ShiftRightArithmetic => wrap(a >> b),
            BinaryOp::ShiftRightLogical => wrap(((a as u32) >> b) as i64),
            BinaryOp::Pow => return None,
        },
        Op::Cast(to) => {
            let v = match (dtype, to) {
                (_, DType::Bool) => f64::from(u8::from(x != 0.0)),
                (DType::Bool, _) => x,
                (_, t) if t.is_float() => t.round(x),
                (f, t) if f.is_float() => {
                    // Outside the integer range (NaN, inf, too large) a conversion is unspecified.
                    let (lo, hi) = if t == DType::I8 { (-128.0, 127.0) } else { (f64::from(i32::MIN), f64::from(i32::MAX)) };
                    let v = x.trunc();
                    if !(lo..=hi).contains(&v) {
                        return None;
                    }
                    v
                }
                (_, DType::I8) => f64::from(x as i64 as i8),
                _ => x,
            };
            return Some(v);
        }
        Op::Compare(c) => {
            let holds = match c {
                CmpOp::Eq => x == y,
                CmpOp::Ne => x != y,
                CmpOp::Lt => x < y,
                CmpOp::Le => x <= y,
                CmpOp::Gt => x > y,
                CmpOp::Ge => x >= y,
            };
            f64::from(u8::from(holds))
        }
    };
    Some(if float && !matches!(op, Op::Compare(_)) { dtype.round(r) } else { r })
}

/// The operand tuples a case runs: every edge value (unary) or every pair of them (binary),
/// inside the op's domain, repeated to fill the tile.
fn operand_tuples(op: Op, dtype: DType) -> Vec<Vec<f64>> {
    let edges = edge_values(dtype);
    let all: Vec<Vec<f64>> = if op.arity() == 1 { edges.iter().map(|&x| vec![x]).collect() } else { edges.iter().flat_map(|&x| edges.iter().map(move |&y| vec![x, y])).collect() };
    let valid: Vec<Vec<f64>> = all.into_iter().filter(|t| reference(op, dtype, t).is_some()).collect();
    assert!(!valid.is_empty() && valid.len() <= N, "{} {dtype}: {} tuples", op.name(), valid.len());
    (0..N).map(|i| valid[i % valid.len()].clone()).collect()
}

fn inputs(op: Op, dtype: DType, tuples: &[Vec<f64>]) -> Vec<HostArray> {
    (0..op.arity())
        .map(|k| {
            let values: Vec<f64> = tuples.iter().map(|t| t[k]).collect();
            HostArray::from_f64(storage(dtype), &ArrayD::from_shape_vec(SHAPE.to_vec(), values).expect("tile-sized"))
        })
        .collect()
}

/// The unit in the last place of `dtype` at `r`.
fn ulp(dtype: DType, r: f64) -> f64 {
    let (_, min_normal, bits) = finfo(dtype);
    let e = r.abs().max(min_normal).log2().floor();
    2f64.powf(e - bits as f64)
}

/// Whether `got` is within `ulps` of `want`. Subnormals may be flushed to zero (TPUs and XLA
/// CPU do), so values below the smallest normal count as equal to zero.
fn close(dtype: DType, got: f64, want: f64, ulps: f64) -> bool {
    if !dtype.is_float() {
        return got == want;
    }
    let (_, min_normal, _) = finfo(dtype);
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    if got.is_infinite() || want.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= ulps * ulp(dtype, want) || (got.abs() < min_normal && want.abs() < min_normal)
}

/// The references an output may match: computed on the operands, and on them with subnormals
/// flushed to zero.
fn accepted(op: Op, dtype: DType, t: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = reference(op, dtype, t).into_iter().collect();
    if dtype.is_float() {
        let (_, min_normal, _) = finfo(dtype);
        let flushed: Vec<f64> = t.iter().map(|&x| if x.abs() < min_normal { 0.0 * x.signum() } else { x }).collect();
        if flushed != t {
            out.extend(reference(op, dtype, &flushed));
        }
    }
    out
}

/// A measured departure of one backend from an op's reference, shown in the table.
struct Deviation {
    op: Op,
    backend: &'static str,
    applies: fn(DType, &[f64]) -> bool,
    note: &'static str,
}

fn subnormal(dtype: DType, x: f64) -> bool {
    x != 0.0 && x.abs() < finfo(dtype).1
}

const DEVIATIONS: &[Deviation] = &[Deviation {
    op: Op::Binary(BinaryOp::Pow),
    backend: "PJRT CPU",
    applies: |dtype, t| subnormal(dtype, t[0]),
    note: "XLA CPU's `power` of a subnormal base is neither the exact value nor the flushed one (2.9e-39 ^ 0.5 gives 2.6e-23, not 5.4e-20 or 0); TPUs flush the base",
}];

fn deviation(op: Op, backend: &str, dtype: DType, t: &[f64]) -> Option<usize> {
    DEVIATIONS.iter().position(|d| {
        d.op.name() == op.name() && matches!((d.op, op), (Op::Binary(_), Op::Binary(_)) | (Op::Unary(_), Op::Unary(_))) && d.backend == backend && (d.applies)(dtype, t)
    })
}

/// The first operands whose output is off (outside the known deviations), or `None` when all agree.
fn first_mismatch(op: Op, backend: &str, dtype: DType, tuples: &[Vec<f64>], out: &HostArray) -> Option<String> {
    let out = out.to_f64();
    tuples.iter().zip(out.iter()).find_map(|(t, &got)| {
        let want = accepted(op, dtype, t);
        let off = !want.iter().any(|&w| close(op.result(dtype), got, w, op.ulps())) && deviation(op, backend, dtype, t).is_none();
        off.then(|| format!("{} of {t:?}: got {got:e}, want {want:?}", op.name()))
    })
}

struct Row {
    op: Op,
    dtype: DType,
    interpret: Result<(), String>,
    cpu: Result<(), String>,
    /// Whether `lower()` for a TPU refuses the op, and libtpu's answer per chip.
    refused: bool,
    tpu: Vec<Result<(), String>>,
}

fn mark(r: &Result<(), String>) -> &'static str {
    if r.is_ok() {
        "✓"
    } else {
        "✗"
    }
}

/// A CPU backend's cell: ✓, with the footnotes of the deviations that apply to this dtype.
fn cpu_cell(row: &Row, backend: &str, r: &Result<(), String>) -> String {
    let notes: Vec<String> = DEVIATIONS
        .iter()
        .enumerate()
        .filter(|(_, d)| d.backend == backend && d.op.name() == row.op.name() && operand_tuples(row.op, row.dtype).iter().any(|t| (d.applies)(row.dtype, t)))
        .map(|(i, _)| format!("<sup>{}</sup>", i + 1))
        .collect();
    format!("{}{}", mark(r), notes.concat())
}

fn tpu_cell(row: &Row, r: &Result<(), String>) -> &'static str {
    match (r, row.refused) {
        (Ok(_), _) => "✓",
        (Err(_), true) => "refused",
        (Err(_), false) => "✗",
    }
}

fn all_ops() -> Vec<Op> {
    let ops = UnaryOp::ALL.iter().map(|&u| Op::Unary(u)).chain(BinaryOp::ALL.iter().map(|&b| Op::Binary(b))).chain(CmpOp::ALL.iter().map(|&c| Op::Compare(c)));
    ops.chain(DTYPES.into_iter().map(Op::Cast)).collect()
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Elementwise conformance");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Written by `exec/tests/conformance.rs` (`TORCHTPU_WRITE_CONFORMANCE=1 cargo test -p torchtpu-exec --test conformance`), which fails when this file and the measurement differ."
    );
    let _ = writeln!(s, "Each op runs on every edge value (every pair, for two operands) of each dtype its definition in `dsl/src/elementwise.rs` claims:");
    let _ = writeln!(s, "0, ±0, ±1, ±0.5, ±2, 3, ±0.1, ±10, 20, ±88, ±1e4, the largest finite, the smallest normal, a subnormal, ±π, ±inf and NaN for floats;");
    let _ = writeln!(s, "0, ±1, ±2, 3, ±7, 31, 32, 33, ±100, ±12345, 65536 and the extremes for integers. References are f64 or exact integers, computed in the test;");
    let _ = writeln!(s, "floats may differ by the ulps shown, and subnormals may flush to zero (TPUs and XLA CPU do). Operands outside an op's domain");
    let _ = writeln!(s, "(integer division by zero, shift amounts outside 0..32) are errors in the interpreter and unspecified on a TPU; so is a float");
    let _ = writeln!(s, "cast to an integer type of NaN, ±inf or a value outside its range. Casts convert between every pair of dtypes (bool as 0/1, `!= 0` into bool).");
    let _ = writeln!(s, "A ✓ under a chip means libtpu compiles the op for it; \"refused\" means libtpu cannot, and `lower()` says so first.");
    let _ = writeln!(s);
    let chips: Vec<String> = Chip::ALL.iter().map(|c| c.to_string()).collect();
    let _ = writeln!(s, "| op | dtype | ulps | interpreter | PJRT CPU | {} |", chips.join(" | "));
    let _ = writeln!(s, "|---|---|---|---|---|{}", "---|".repeat(chips.len()));
    for r in rows {
        let ulps = if r.op.result(r.dtype).is_float() { format!("{}", r.op.ulps()) } else { "exact".into() };
        let tpu: Vec<&str> = r.tpu.iter().map(|t| tpu_cell(r, t)).collect();
        let _ =
            writeln!(s, "| `{}` | {} | {ulps} | {} | {} | {} |", r.op.name(), r.dtype, cpu_cell(r, "interpreter", &r.interpret), cpu_cell(r, "PJRT CPU", &r.cpu), tpu.join(" | "));
    }
    let _ = writeln!(s);
    for (i, d) in DEVIATIONS.iter().enumerate() {
        let _ = writeln!(s, "{}. `{}` on {}: {}.", i + 1, d.op.name(), d.backend, d.note);
    }
    s
}

#[test]
fn every_elementwise_op_agrees_with_its_reference_on_every_backend() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for op in all_ops() {
        for dtype in op.dtypes() {
            let call = call(op, dtype);
            let tuples = operand_tuples(op, dtype);
            let ins = inputs(op, dtype, &tuples);
            let traced = call.trace(&ins.iter().map(|a| a.value_type()).collect::<Vec<ValueType>>()).unwrap_or_else(|e| panic!("{} {dtype}: {e}", op.name()));
            let check = |backend: &str, out: Result<Vec<HostArray>, String>| -> Result<(), String> {
                out.and_then(|o| first_mismatch(op, backend, dtype, &tuples, &o[0]).map_or(Ok(()), Err))
            };
            let interpret = check("interpreter", call.interpret(&ins).map_err(|e| e.to_string()));
            let cpu = check("PJRT CPU", Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&ins)).map_err(|e| e.to_string()));
            let ours = lower(&traced, Target::TpuStableHlo);
            let module = stablehlo::tpu_custom_call(&traced, Form::Stable).map_err(|e| e.to_string());
            let tpu: Vec<Result<(), String>> = Chip::ALL
                .iter()
                .map(|&chip| match &module {
                    Ok(m) => compiler.compile(chip, m).map(|_| ()).map_err(|e| e.message),
                    Err(e) => Err(e.clone()),
                })
                .collect();
            for (what, r) in [("interpreter", &interpret), ("PJRT CPU", &cpu)] {
                if let Err(e) = r {
                    failures.push(format!("{} {dtype} on the {what}: {e}", op.name()));
                }
            }
            for (chip, r) in Chip::ALL.iter().zip(&tpu) {
                match (r, &ours) {
                    (Err(e), Ok(_)) => failures.push(format!("{} {dtype}: lower() accepts it but libtpu rejects it for {chip}: {e}", op.name())),
                    (Ok(_), Err(e)) => failures.push(format!("{} {dtype}: libtpu compiles it for {chip} but lower() refuses it: {e}", op.name())),
                    _ => {}
                }
            }
            rows.push(Row { op, dtype, interpret, cpu, refused: ours.is_err(), tpu });
        }
    }
    let measured = table(&rows);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/conformance.md");
    if std::env::var_os("TORCHTPU_WRITE_CONFORMANCE").is_some() {
        std::fs::write(path, &measured).expect("writes docs/conformance.md");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(committed, measured, "docs/conformance.md is out of date: rerun with TORCHTPU_WRITE_CONFORMANCE=1");
}

#[test]
fn the_interpreter_reports_operands_outside_an_ops_domain() {
    let cases: BTreeMap<&str, (BinaryOp, i32, i32)> = [
        ("division by zero", (BinaryOp::Div, 7, 0)),
        ("remainder by zero", (BinaryOp::Rem, 7, 0)),
        ("shift by 32", (BinaryOp::ShiftLeft, 1, 32)),
        ("shift by -1", (BinaryOp::ShiftRightLogical, 1, -1)),
    ]
    .into_iter()
    .collect();
    for (what, (op, a, b)) in cases {
        let ins = [HostArray::from(ArrayD::from_elem(SHAPE.to_vec(), a)), HostArray::from(ArrayD::from_elem(SHAPE.to_vec(), b))];
        let err = call(Op::Binary(op), DType::I32).interpret(&ins).expect_err(what).to_string();
        assert!(err.contains(op.name()) && err.contains("unspecified on a TPU"), "{what}: {err}");
    }
}
