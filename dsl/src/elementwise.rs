//! One definition of every elementwise op: the dtypes it takes, whether the cost model counts
//! it as a transcendental, what it computes (the interpreter runs exactly this), and how Mosaic
//! and portable StableHLO express it: one op of the target dialect, or a composite of other
//! elementwise ops that each backend builds the same way.
//!
//! Backends learn about an op only from here. A new op is one arm of `def`, and a struct
//! literal with every field: the compiler does not let it lack a backend.

use std::cmp::Ordering;

use crate::dtype::DType;
use crate::ir::{BinaryOp, CmpOp, Literal, UnaryOp};

/// The storage class an op computes in: narrow floats go through f32 (rounded after each op),
/// narrow integers through i32 (wrapped), as the interpreter holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Float,
    Int,
    Bool,
}

impl Class {
    pub fn of(dtype: DType) -> Class {
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => Class::Float,
            DType::I32 | DType::I8 => Class::Int,
            DType::Bool => Class::Bool,
        }
    }
}

/// Emits elementwise ops of one value type for a composite; values are the backend's SSA names.
pub trait Compose {
    fn unary(&mut self, op: UnaryOp, x: &str) -> String;
    fn binary(&mut self, op: BinaryOp, a: &str, b: &str) -> String;
    /// A constant of the composite's value type.
    fn constant(&mut self, value: Literal) -> String;
    /// A bool of the composite's shape.
    fn compare(&mut self, op: CmpOp, a: &str, b: &str) -> String;
    fn select(&mut self, cond: &str, a: &str, b: &str) -> String;
    /// Logical not of a bool of the composite's shape.
    fn logical_not(&mut self, mask: &str) -> String;
    /// One op of the target dialect on values of the composite's type, by its full name.
    fn target_op(&mut self, name: &str, args: &[&str]) -> String;
}

pub type UnaryComposite = fn(&mut dyn Compose, &str) -> String;
pub type BinaryComposite = fn(&mut dyn Compose, &str, &str) -> String;

/// How one backend expresses an op for one storage class.
#[derive(Clone, Copy)]
pub enum Lowering<C> {
    /// One op of the target dialect, by its full name (`math.exp`, `stablehlo.exponential`).
    Op(&'static str),
    /// Built from other elementwise ops.
    Composite(C),
}

/// An op for one storage class: its semantics and its two lowerings.
#[derive(Clone, Copy)]
pub struct Form<E, C> {
    /// The dtypes of the class the op takes.
    pub dtypes: &'static [DType],
    pub eval: E,
    pub mosaic: Lowering<C>,
    /// What Mosaic does for the dtypes `mosaic` does not take.
    pub mosaic_narrow: Narrow<C>,
    pub stablehlo: Lowering<C>,
}

/// How Mosaic computes an op for dtypes its form does not take (measured with libtpu).
#[derive(Clone, Copy)]
pub enum Narrow<C> {
    /// The form takes every dtype of the class.
    Same,
    /// These dtypes are computed in the class's 32-bit type and narrowed back (the same
    /// value: integer ops wrap, float ops round once more, as the interpreter does).
    Widen(&'static [DType]),
    /// These dtypes use this composite instead (where Mosaic folds a widened form back).
    Composite(&'static [DType], C),
}

/// What an integer op computes, or why an operand is outside its domain (division by zero).
pub type IntResult = Result<i32, &'static str>;

pub type UnaryForm<T> = Form<fn(T) -> T, UnaryComposite>;
pub type BinaryForm<E> = Form<E, BinaryComposite>;
pub type FloatBinary = BinaryForm<fn(f32, f32) -> f32>;
pub type IntBinary = BinaryForm<fn(i32, i32) -> IntResult>;
pub type BoolBinary = BinaryForm<fn(bool, bool) -> bool>;

/// An op's definition: its name, whether it counts as a transcendental, and its form for each
/// storage class it takes (`E*` are the scalar functions' types, `C` the composites').
pub struct OpDef<F, I, B, C> {
    pub name: &'static str,
    pub transcendental: bool,
    pub float: Option<Form<F, C>>,
    pub int: Option<Form<I, C>>,
    pub boolean: Option<Form<B, C>>,
}

pub type UnaryDef = OpDef<fn(f32) -> f32, fn(i32) -> i32, fn(bool) -> bool, UnaryComposite>;
pub type BinaryDef = OpDef<fn(f32, f32) -> f32, fn(i32, i32) -> IntResult, fn(bool, bool) -> bool, BinaryComposite>;

/// The lowerings of an op for one dtype, whatever its class.
#[derive(Clone, Copy)]
pub struct Lowerings<C> {
    pub mosaic: Lowering<C>,
    /// Whether Mosaic computes it in the 32-bit type of the class.
    pub mosaic_widened: bool,
    pub stablehlo: Lowering<C>,
}

fn takes<E, C: Copy>(form: &Option<Form<E, C>>, dtype: DType) -> Option<Lowerings<C>> {
    let f = form.as_ref().filter(|f| f.dtypes.contains(&dtype))?;
    let (mosaic, mosaic_widened) = match f.mosaic_narrow {
        Narrow::Widen(ds) if ds.contains(&dtype) => (f.mosaic, true),
        Narrow::Composite(ds, c) if ds.contains(&dtype) => (Lowering::Composite(c), false),
        _ => (f.mosaic, false),
    };
    Some(Lowerings { mosaic, mosaic_widened, stablehlo: f.stablehlo })
}

/// The scalar functions of a def as constants (`None` where the class is undefined), for
/// code that must see them at compile time (the interpreter's loops inline them).
pub struct Evals<F, I, B> {
    pub float: Option<F>,
    pub int: Option<I>,
    pub boolean: Option<B>,
}

const fn eval_of<E: Copy, C: Copy>(form: Option<Form<E, C>>) -> Option<E> {
    match form {
        Some(f) => Some(f.eval),
        None => None,
    }
}

impl<F: Copy, I: Copy, B: Copy, C: Copy> OpDef<F, I, B, C> {
    pub const fn evals(&self) -> Evals<F, I, B> {
        Evals { float: eval_of(self.float), int: eval_of(self.int), boolean: eval_of(self.boolean) }
    }

    /// The lowerings for `dtype`, or `None` where the op is not defined for it.
    pub fn lowerings(&self, dtype: DType) -> Option<Lowerings<C>> {
        match Class::of(dtype) {
            Class::Float => takes(&self.float, dtype),
            Class::Int => takes(&self.int, dtype),
            Class::Bool => takes(&self.boolean, dtype),
        }
    }

    /// Every dtype the op is defined for.
    pub fn dtypes(&self) -> Vec<DType> {
        [self.float.map(|f| f.dtypes), self.int.map(|f| f.dtypes), self.boolean.map(|f| f.dtypes)].into_iter().flatten().flatten().copied().collect()
    }
}

const FLOATS: &[DType] = &[DType::F32, DType::BF16, DType::F16];
const INTS: &[DType] = &[DType::I32, DType::I8];
const BOOL: &[DType] = &[DType::Bool];
/// Shifts take i32 only: an i8 held in i32 would shift its sign-extension bits in.
const I32: &[DType] = &[DType::I32];
/// Mosaic's integer arithmetic takes i16 and i32 vectors only (libtpu, every chip).
const MOSAIC_NO_I8: &[DType] = &[DType::I8];

/// A float op that is one op on both targets.
const fn float_op(eval: fn(f32) -> f32, mosaic: &'static str, stablehlo: &'static str) -> Option<UnaryForm<f32>> {
    Some(Form { dtypes: FLOATS, eval, mosaic: Lowering::Op(mosaic), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op(stablehlo) })
}

const fn float_binary(eval: fn(f32, f32) -> f32, mosaic: &'static str, stablehlo: &'static str) -> Option<FloatBinary> {
    Some(Form { dtypes: FLOATS, eval, mosaic: Lowering::Op(mosaic), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op(stablehlo) })
}

/// An integer op Mosaic computes natively for every integer dtype (bitwise ops).
const fn int_bitwise(dtypes: &'static [DType], eval: fn(i32, i32) -> IntResult, mosaic: &'static str, stablehlo: &'static str) -> Option<IntBinary> {
    Some(Form { dtypes, eval, mosaic: Lowering::Op(mosaic), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op(stablehlo) })
}

/// Integer arithmetic, which Mosaic computes on i8 in i32.
const fn int_arith(eval: fn(i32, i32) -> IntResult, mosaic: &'static str, stablehlo: &'static str) -> Option<IntBinary> {
    Some(Form { dtypes: INTS, eval, mosaic: Lowering::Op(mosaic), mosaic_narrow: Narrow::Widen(MOSAIC_NO_I8), stablehlo: Lowering::Op(stablehlo) })
}

const fn bool_binary(eval: fn(bool, bool) -> bool, mosaic: &'static str, stablehlo: &'static str) -> Option<BoolBinary> {
    Some(Form { dtypes: BOOL, eval, mosaic: Lowering::Op(mosaic), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op(stablehlo) })
}

/// `max` that propagates NaN, as `arith.maximumf` and `stablehlo.maximum` do.
pub(crate) fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// `min` that propagates NaN.
pub(crate) fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

/// The shift amount as a `u32`, or the domain error for one outside `0..32`.
fn shift_amount(s: i32) -> Result<u32, &'static str> {
    u32::try_from(s).ok().filter(|&s| s < 32).ok_or("shift amount outside 0..32 (unspecified on a TPU)")
}

const DIV_BY_ZERO: &str = "integer division by zero (unspecified on a TPU)";

/// `1 / (1 + exp(-x))`: Mosaic has no logistic op.
fn logistic(c: &mut dyn Compose, x: &str) -> String {
    let neg = c.unary(UnaryOp::Neg, x);
    let e = c.unary(UnaryOp::Exp, &neg);
    let one = c.constant(Literal::Float(1.0));
    let d = c.binary(BinaryOp::Add, &one, &e);
    c.binary(BinaryOp::Div, &one, &d)
}

/// `2^x` as a power: `exp(x ln 2)` loses digits for large `x`.
fn exp2_as_power(c: &mut dyn Compose, x: &str) -> String {
    let two = c.constant(Literal::Float(2.0));
    c.binary(BinaryOp::Pow, &two, x)
}

/// `stablehlo.maximum`/`minimum` with NaN passed through: XLA CPU's drop a NaN operand.
fn propagating_nan(c: &mut dyn Compose, target: &str, a: &str, b: &str) -> String {
    let m = c.target_op(target, &[a, b]);
    let a_nan = c.compare(CmpOp::Ne, a, a);
    let r = c.select(&a_nan, a, &m);
    let b_nan = c.compare(CmpOp::Ne, b, b);
    c.select(&b_nan, b, &r)
}

/// The larger (`larger`) or smaller of `a` and `b` as `a + select(a < b, b - a, 0)`, wrapping:
/// Mosaic cannot legalize an i8 `maxsi`/`minsi`, and folds a widened one, or a compare and
/// select, back into it.
fn extremum_by_offset(c: &mut dyn Compose, larger: bool, a: &str, b: &str) -> String {
    let moves = c.compare(if larger { CmpOp::Lt } else { CmpOp::Gt }, a, b);
    let d = c.binary(BinaryOp::Sub, b, a);
    let zero = c.constant(Literal::Int(0));
    let step = c.select(&moves, &d, &zero);
    c.binary(BinaryOp::Add, a, &step)
}

fn int_negate(c: &mut dyn Compose, x: &str) -> String {
    let zero = c.constant(Literal::Int(0));
    c.binary(BinaryOp::Sub, &zero, x)
}

fn int_not(c: &mut dyn Compose, x: &str) -> String {
    let ones = c.constant(Literal::Int(-1));
    c.binary(BinaryOp::Xor, x, &ones)
}

fn bool_not(c: &mut dyn Compose, x: &str) -> String {
    let t = c.constant(Literal::Bool(true));
    c.binary(BinaryOp::Xor, x, &t)
}

impl UnaryOp {
    #[inline(always)]
    pub const fn def(self) -> UnaryDef {
        const fn op(name: &'static str, transcendental: bool, float: Option<UnaryForm<f32>>) -> UnaryDef {
            UnaryDef { name, transcendental, float, int: None, boolean: None }
        }
        match self {
            UnaryOp::Neg => UnaryDef {
                name: "neg",
                transcendental: false,
                float: float_op(|v| -v, "arith.negf", "stablehlo.negate"),
                int: Some(Form {
                    dtypes: INTS,
                    eval: i32::wrapping_neg,
                    mosaic: Lowering::Composite(int_negate),
                    mosaic_narrow: Narrow::Same,
                    stablehlo: Lowering::Op("stablehlo.negate"),
                }),
                boolean: None,
            },
            UnaryOp::Exp => op("exp", true, float_op(f32::exp, "math.exp", "stablehlo.exponential")),
            UnaryOp::Exp2 => op(
                "exp2",
                true,
                Some(Form { dtypes: FLOATS, eval: f32::exp2, mosaic: Lowering::Op("math.exp2"), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Composite(exp2_as_power) }),
            ),
            UnaryOp::Log => op("log", true, float_op(f32::ln, "math.log", "stablehlo.log")),
            UnaryOp::Sqrt => op("sqrt", true, float_op(f32::sqrt, "math.sqrt", "stablehlo.sqrt")),
            UnaryOp::Rsqrt => op("rsqrt", true, float_op(|v| 1.0 / v.sqrt(), "math.rsqrt", "stablehlo.rsqrt")),
            UnaryOp::Tanh => op("tanh", true, float_op(f32::tanh, "math.tanh", "stablehlo.tanh")),
            UnaryOp::Logistic => op(
                "logistic",
                true,
                Some(Form {
                    dtypes: FLOATS,
                    eval: |v| 1.0 / (1.0 + (-v).exp()),
                    mosaic: Lowering::Composite(logistic),
                    mosaic_narrow: Narrow::Same,
                    stablehlo: Lowering::Op("stablehlo.logistic"),
                }),
            ),
            UnaryOp::Erf => op("erf", true, float_op(libm::erff, "math.erf", "chlo.erf")),
            UnaryOp::Sin => op("sin", true, float_op(f32::sin, "math.sin", "stablehlo.sine")),
            UnaryOp::Cos => op("cos", true, float_op(f32::cos, "math.cos", "stablehlo.cosine")),
            UnaryOp::Floor => op("floor", false, float_op(f32::floor, "math.floor", "stablehlo.floor")),
            UnaryOp::Ceil => op("ceil", false, float_op(f32::ceil, "math.ceil", "stablehlo.ceil")),
            UnaryOp::Abs => UnaryDef {
                name: "abs",
                transcendental: false,
                float: float_op(f32::abs, "math.absf", "stablehlo.abs"),
                int: Some(Form {
                    dtypes: INTS,
                    eval: i32::wrapping_abs,
                    mosaic: Lowering::Op("math.absi"),
                    mosaic_narrow: Narrow::Widen(MOSAIC_NO_I8),
                    stablehlo: Lowering::Op("stablehlo.abs"),
                }),
                boolean: None,
            },
            UnaryOp::Not => UnaryDef {
                name: "not",
                transcendental: false,
                float: None,
                int: Some(Form { dtypes: INTS, eval: |v| !v, mosaic: Lowering::Composite(int_not), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op("stablehlo.not") }),
                boolean: Some(Form { dtypes: BOOL, eval: |v| !v, mosaic: Lowering::Composite(bool_not), mosaic_narrow: Narrow::Same, stablehlo: Lowering::Op("stablehlo.not") }),
            },
        }
    }

    pub const fn name(self) -> &'static str {
        self.def().name
    }
}

impl BinaryOp {
    #[inline(always)]
    pub const fn def(self) -> BinaryDef {
        const fn arith(name: &'static str, float: Option<FloatBinary>, int: Option<IntBinary>, boolean: Option<BoolBinary>) -> BinaryDef {
            BinaryDef { name, transcendental: false, float, int, boolean }
        }
        match self {
            BinaryOp::Add => arith("add", float_binary(|a, b| a + b, "arith.addf", "stablehlo.add"), int_arith(|a, b| Ok(a.wrapping_add(b)), "arith.addi", "stablehlo.add"), None),
            BinaryOp::Sub => {
                arith("sub", float_binary(|a, b| a - b, "arith.subf", "stablehlo.subtract"), int_arith(|a, b| Ok(a.wrapping_sub(b)), "arith.subi", "stablehlo.subtract"), None)
            }
            BinaryOp::Mul => {
                arith("mul", float_binary(|a, b| a * b, "arith.mulf", "stablehlo.multiply"), int_arith(|a, b| Ok(a.wrapping_mul(b)), "arith.muli", "stablehlo.multiply"), None)
            }
            BinaryOp::Div => arith(
                "div",
                float_binary(|a, b| a / b, "arith.divf", "stablehlo.divide"),
                int_arith(|a, b| if b == 0 { Err(DIV_BY_ZERO) } else { Ok(a.wrapping_div(b)) }, "arith.divsi", "stablehlo.divide"),
                None,
            ),
            BinaryOp::Rem => arith(
                "rem",
                // Mosaic has no bf16 remainder (libtpu, every chip).
                Some(Form {
                    dtypes: FLOATS,
                    eval: |a, b| a % b,
                    mosaic: Lowering::Op("arith.remf"),
                    mosaic_narrow: Narrow::Widen(&[DType::BF16]),
                    stablehlo: Lowering::Op("stablehlo.remainder"),
                }),
                int_arith(|a, b| if b == 0 { Err(DIV_BY_ZERO) } else { Ok(a.wrapping_rem(b)) }, "arith.remsi", "stablehlo.remainder"),
                None,
            ),
            BinaryOp::Max => arith(
                "max",
                Some(Form {
                    dtypes: FLOATS,
                    eval: nan_max,
                    mosaic: Lowering::Op("arith.maximumf"),
                    mosaic_narrow: Narrow::Same,
                    stablehlo: Lowering::Composite(|c, a, b| propagating_nan(c, "stablehlo.maximum", a, b)),
                }),
                Some(Form {
                    dtypes: INTS,
                    eval: |a, b| Ok(a.max(b)),
                    mosaic: Lowering::Op("arith.maxsi"),
                    mosaic_narrow: Narrow::Composite(MOSAIC_NO_I8, |c, a, b| extremum_by_offset(c, true, a, b)),
                    stablehlo: Lowering::Op("stablehlo.maximum"),
                }),
                bool_binary(|a, b| a | b, "arith.ori", "stablehlo.or"),
            ),
            BinaryOp::Min => arith(
                "min",
                Some(Form {
                    dtypes: FLOATS,
                    eval: nan_min,
                    mosaic: Lowering::Op("arith.minimumf"),
                    mosaic_narrow: Narrow::Same,
                    stablehlo: Lowering::Composite(|c, a, b| propagating_nan(c, "stablehlo.minimum", a, b)),
                }),
                Some(Form {
                    dtypes: INTS,
                    eval: |a, b| Ok(a.min(b)),
                    mosaic: Lowering::Op("arith.minsi"),
                    mosaic_narrow: Narrow::Composite(MOSAIC_NO_I8, |c, a, b| extremum_by_offset(c, false, a, b)),
                    stablehlo: Lowering::Op("stablehlo.minimum"),
                }),
                bool_binary(|a, b| a & b, "arith.andi", "stablehlo.and"),
            ),
            BinaryOp::Pow => BinaryDef { name: "pow", transcendental: true, float: float_binary(f32::powf, "math.powf", "stablehlo.power"), int: None, boolean: None },
            BinaryOp::And => arith("and", None, int_bitwise(INTS, |a, b| Ok(a & b), "arith.andi", "stablehlo.and"), bool_binary(|a, b| a & b, "arith.andi", "stablehlo.and")),
            BinaryOp::Or => arith("or", None, int_bitwise(INTS, |a, b| Ok(a | b), "arith.ori", "stablehlo.or"), bool_binary(|a, b| a | b, "arith.ori", "stablehlo.or")),
            BinaryOp::Xor => arith("xor", None, int_bitwise(INTS, |a, b| Ok(a ^ b), "arith.xori", "stablehlo.xor"), bool_binary(|a, b| a ^ b, "arith.xori", "stablehlo.xor")),
            BinaryOp::ShiftLeft => arith("shift_left", None, int_bitwise(I32, |a, s| Ok(a << shift_amount(s)?), "arith.shli", "stablehlo.shift_left"), None),
            BinaryOp::ShiftRightArithmetic => {
                arith("shift_right_arithmetic", None, int_bitwise(I32, |a, s| Ok(a >> shift_amount(s)?), "arith.shrsi", "stablehlo.shift_right_arithmetic"), None)
            }
            BinaryOp::ShiftRightLogical => {
                arith("shift_right_logical", None, int_bitwise(I32, |a, s| Ok(((a as u32) >> shift_amount(s)?) as i32), "arith.shrui", "stablehlo.shift_right_logical"), None)
            }
        }
    }

    pub const fn name(self) -> &'static str {
        self.def().name
    }
}

/// How Mosaic compares one storage class: an `arith.cmpf`/`arith.cmpi` predicate (name and
/// enum value), or a composite on the operands.
#[derive(Clone, Copy)]
pub enum Predicate {
    Is(&'static str, u32),
    Composite(BinaryComposite),
}

impl crate::ir::ReduceOp {
    /// The elementwise op a reduction folds with, for values of `dtype`.
    pub const fn combiner(self, dtype: DType) -> BinaryOp {
        match (self, dtype) {
            (crate::ir::ReduceOp::Sum, DType::Bool) => BinaryOp::Or,
            (crate::ir::ReduceOp::Sum, _) => BinaryOp::Add,
            (crate::ir::ReduceOp::Max, _) => BinaryOp::Max,
            (crate::ir::ReduceOp::Min, _) => BinaryOp::Min,
        }
    }
}

/// A comparison: its semantics on an ordering (`None` where a NaN makes the operands
/// unordered) and its forms in each dialect.
pub struct CmpDef {
    pub name: &'static str,
    pub eval: fn(Option<Ordering>) -> bool,
    /// Ordered predicates: `ne` holds for NaN, which Mosaic's only NaN-true predicate
    /// (`une`) cannot say (libtpu rejects it), so it is `not eq`.
    pub mosaic_float: Predicate,
    pub mosaic_int: Predicate,
    /// Mosaic compares no `i1` vectors (libtpu, every chip): bools are compared logically.
    pub mosaic_bool: Predicate,
    pub stablehlo: &'static str,
}

impl CmpOp {
    #[inline(always)]
    pub const fn def(self) -> CmpDef {
        use Ordering::*;
        use Predicate::{Composite, Is};
        match self {
            CmpOp::Eq => CmpDef {
                name: "eq",
                eval: |o| o == Some(Equal),
                mosaic_float: Is("oeq", 1),
                mosaic_int: Is("eq", 0),
                mosaic_bool: Composite(|c, a, b| {
                    let x = c.binary(BinaryOp::Xor, a, b);
                    c.unary(UnaryOp::Not, &x)
                }),
                stablehlo: "EQ",
            },
            CmpOp::Ne => CmpDef {
                name: "ne",
                eval: |o| o != Some(Equal),
                mosaic_float: Composite(|c, a, b| {
                    let eq = c.compare(CmpOp::Eq, a, b);
                    c.logical_not(&eq)
                }),
                mosaic_int: Is("ne", 1),
                mosaic_bool: Composite(|c, a, b| c.binary(BinaryOp::Xor, a, b)),
                stablehlo: "NE",
            },
            CmpOp::Lt => CmpDef {
                name: "lt",
                eval: |o| o == Some(Less),
                mosaic_float: Is("olt", 4),
                mosaic_int: Is("slt", 2),
                mosaic_bool: Composite(|c, a, b| {
                    let na = c.unary(UnaryOp::Not, a);
                    c.binary(BinaryOp::And, &na, b)
                }),
                stablehlo: "LT",
            },
            CmpOp::Le => CmpDef {
                name: "le",
                eval: |o| matches!(o, Some(Less | Equal)),
                mosaic_float: Is("ole", 5),
                mosaic_int: Is("sle", 3),
                mosaic_bool: Composite(|c, a, b| {
                    let na = c.unary(UnaryOp::Not, a);
                    c.binary(BinaryOp::Or, &na, b)
                }),
                stablehlo: "LE",
            },
            CmpOp::Gt => CmpDef {
                name: "gt",
                eval: |o| o == Some(Greater),
                mosaic_float: Is("ogt", 2),
                mosaic_int: Is("sgt", 4),
                mosaic_bool: Composite(|c, a, b| {
                    let nb = c.unary(UnaryOp::Not, b);
                    c.binary(BinaryOp::And, a, &nb)
                }),
                stablehlo: "GT",
            },
            CmpOp::Ge => CmpDef {
                name: "ge",
                eval: |o| matches!(o, Some(Greater | Equal)),
                mosaic_float: Is("oge", 3),
                mosaic_int: Is("sge", 5),
                mosaic_bool: Composite(|c, a, b| {
                    let nb = c.unary(UnaryOp::Not, b);
                    c.binary(BinaryOp::Or, a, &nb)
                }),
                stablehlo: "GE",
            },
        }
    }

    pub const fn name(self) -> &'static str {
        self.def().name
    }

    /// Mosaic's form for operands of `dtype`.
    pub fn mosaic(self, dtype: DType) -> Predicate {
        let def = self.def();
        match Class::of(dtype) {
            Class::Float => def.mosaic_float,
            Class::Int => def.mosaic_int,
            Class::Bool => def.mosaic_bool,
        }
    }
}
