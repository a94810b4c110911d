//! Typed handles to traced values: `Scalar<T>` (rank 0) and `Tile<T>` (a vector in VMEM),
//! with arithmetic, math and reductions.

use std::marker::PhantomData;
use std::ops::{Add, BitAnd, BitOr, BitXor, Div, Mul, Neg, Not, Rem, Sub};

use crate::dtype::{DType, DotOperand, Element, Float, Int, Numeric};
use crate::ir::{BinaryOp, CmpOp, Literal, Loc, ReduceOp, RollStride, UnaryOp, ValueId};
use crate::trace::builder;

/// A traced value of rank 0: a program id, a loop index, a scalar loaded from SMEM.
pub struct Scalar<T> {
    pub(crate) id: ValueId,
    _t: PhantomData<fn() -> T>,
}

/// A traced vector value: what loading a VMEM block gives.
pub struct Tile<T> {
    pub(crate) id: ValueId,
    _t: PhantomData<fn() -> T>,
}

macro_rules! handle_impls {
    ($($ty:ident),*) => {$(
        impl<T> Clone for $ty<T> {
            fn clone(&self) -> Self { *self }
        }
        impl<T> Copy for $ty<T> {}
        impl<T> std::fmt::Debug for $ty<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($ty), self.id)
            }
        }
        impl<T> $ty<T> {
            pub(crate) fn from_id(id: ValueId) -> Self { $ty { id, _t: PhantomData } }
            /// The IR value this handle stands for.
            pub fn value_id(&self) -> ValueId { self.id }
        }
    )*};
}
handle_impls!(Scalar, Tile);

/// Values that a literal or traced operand converts to in a binary operation.
#[doc(hidden)]
pub trait Operand {
    fn operand_id(self, dtype: DType, loc: Loc) -> ValueId;
}

impl<T> Operand for Tile<T> {
    fn operand_id(self, _: DType, _: Loc) -> ValueId {
        self.id
    }
}
impl<T> Operand for Scalar<T> {
    fn operand_id(self, _: DType, _: Loc) -> ValueId {
        self.id
    }
}
impl Operand for f32 {
    fn operand_id(self, dtype: DType, loc: Loc) -> ValueId {
        builder::with(|b| b.constant(Literal::Float(self as f64), dtype, loc))
    }
}
impl Operand for i32 {
    fn operand_id(self, dtype: DType, loc: Loc) -> ValueId {
        builder::with(|b| b.constant(Literal::Int(self as i64), dtype, loc))
    }
}
impl Operand for bool {
    fn operand_id(self, dtype: DType, loc: Loc) -> ValueId {
        builder::with(|b| b.constant(Literal::Bool(self), dtype, loc))
    }
}

/// The combinations of operands an elementwise binary op accepts, and what it yields:
/// tile with tile, scalar or literal gives a tile; scalar with scalar or literal a scalar.
#[doc(hidden)]
pub trait Elementwise<Rhs> {
    type Output;
    type Elem: Element;
    fn lhs_id(self, loc: Loc) -> ValueId;
    fn rhs_id(rhs: Rhs, loc: Loc) -> ValueId;
    fn wrap(id: ValueId) -> Self::Output;
}

macro_rules! elementwise {
    ($([$($g:tt)*] $lhs:ty, $rhs:ty => $out:ident<$e:ty>;)*) => {$(
        impl<$($g)*> Elementwise<$rhs> for $lhs {
            type Output = $out<$e>;
            type Elem = $e;
            fn lhs_id(self, loc: Loc) -> ValueId { Operand::operand_id(self, <$e as Element>::DTYPE, loc) }
            fn rhs_id(rhs: $rhs, loc: Loc) -> ValueId { Operand::operand_id(rhs, <$e as Element>::DTYPE, loc) }
            fn wrap(id: ValueId) -> $out<$e> { $out::from_id(id) }
        }
    )*};
}
elementwise! {
    [T: Element] Tile<T>, Tile<T> => Tile<T>;
    [T: Element] Tile<T>, Scalar<T> => Tile<T>;
    [T: Element] Scalar<T>, Tile<T> => Tile<T>;
    [T: Element] Scalar<T>, Scalar<T> => Scalar<T>;
    [T: Float] Tile<T>, f32 => Tile<T>;
    [T: Float] Scalar<T>, f32 => Scalar<T>;
    [T: Float] f32, Tile<T> => Tile<T>;
    [T: Float] f32, Scalar<T> => Scalar<T>;
    [] Tile<i32>, i32 => Tile<i32>;
    [] Scalar<i32>, i32 => Scalar<i32>;
    [] i32, Tile<i32> => Tile<i32>;
    [] i32, Scalar<i32> => Scalar<i32>;
    [] Tile<bool>, bool => Tile<bool>;
    [] Scalar<bool>, bool => Scalar<bool>;
}

#[track_caller]
fn binary<A: Elementwise<B>, B>(a: A, b: B, op: BinaryOp) -> A::Output {
    let loc = Loc::caller();
    let (l, r) = (a.lhs_id(loc), A::rhs_id(b, loc));
    A::wrap(builder::with(|bd| bd.binary(op, l, r, loc)))
}

/// Marks element types that bitwise/logical operators apply to.
#[doc(hidden)]
pub trait Logical: Element {}
impl Logical for bool {}
impl<T: Int> Logical for T {}

macro_rules! operator {
    ($tr:ident, $m:ident, $op:expr, $bound:ident) => {
        impl<T: $bound, R> $tr<R> for Tile<T>
        where
            Tile<T>: Elementwise<R>,
        {
            type Output = <Tile<T> as Elementwise<R>>::Output;
            #[track_caller]
            fn $m(self, rhs: R) -> Self::Output {
                binary(self, rhs, $op)
            }
        }
        impl<T: $bound, R> $tr<R> for Scalar<T>
        where
            Scalar<T>: Elementwise<R>,
        {
            type Output = <Scalar<T> as Elementwise<R>>::Output;
            #[track_caller]
            fn $m(self, rhs: R) -> Self::Output {
                binary(self, rhs, $op)
            }
        }
    };
}
operator!(Add, add, BinaryOp::Add, Numeric);
operator!(Sub, sub, BinaryOp::Sub, Numeric);
operator!(Mul, mul, BinaryOp::Mul, Numeric);
operator!(Div, div, BinaryOp::Div, Numeric);
operator!(Rem, rem, BinaryOp::Rem, Numeric);
operator!(BitAnd, bitand, BinaryOp::And, Logical);
operator!(BitOr, bitor, BinaryOp::Or, Logical);
operator!(BitXor, bitxor, BinaryOp::Xor, Logical);

macro_rules! literal_lhs_operator {
    ($lit:ty, [$($g:tt)*] $elem:ty, $tr:ident $m:ident $op:expr) => {
        impl<$($g)*> $tr<Tile<$elem>> for $lit {
            type Output = Tile<$elem>;
            #[track_caller]
            fn $m(self, rhs: Tile<$elem>) -> Tile<$elem> { binary(self, rhs, $op) }
        }
        impl<$($g)*> $tr<Scalar<$elem>> for $lit {
            type Output = Scalar<$elem>;
            #[track_caller]
            fn $m(self, rhs: Scalar<$elem>) -> Scalar<$elem> { binary(self, rhs, $op) }
        }
    };
}
literal_lhs_operator!(f32, [T: Float] T, Add add BinaryOp::Add);
literal_lhs_operator!(f32, [T: Float] T, Sub sub BinaryOp::Sub);
literal_lhs_operator!(f32, [T: Float] T, Mul mul BinaryOp::Mul);
literal_lhs_operator!(f32, [T: Float] T, Div div BinaryOp::Div);
literal_lhs_operator!(i32, [] i32, Add add BinaryOp::Add);
literal_lhs_operator!(i32, [] i32, Sub sub BinaryOp::Sub);
literal_lhs_operator!(i32, [] i32, Mul mul BinaryOp::Mul);
literal_lhs_operator!(i32, [] i32, Div div BinaryOp::Div);
literal_lhs_operator!(i32, [] i32, Rem rem BinaryOp::Rem);

macro_rules! unary_operators {
    ($($ty:ident),*) => {$(
        impl<T: Numeric> Neg for $ty<T> {
            type Output = $ty<T>;
            #[track_caller]
            fn neg(self) -> $ty<T> { self.unary_op(UnaryOp::Neg) }
        }
        impl<T: Logical> Not for $ty<T> {
            type Output = $ty<T>;
            #[track_caller]
            fn not(self) -> $ty<T> { self.unary_op(UnaryOp::Not) }
        }
        impl<T: Element> $ty<T> {
            /// Applies the elementwise op `op` (what the named methods call), for code generic
            /// over ops; a trace error where `op` is not defined for `T`.
            #[track_caller]
            pub fn unary_op(self, op: UnaryOp) -> $ty<T> {
                let loc = Loc::caller();
                $ty::from_id(builder::with(|b| b.unary(op, self.id, loc)))
            }

            /// `self op rhs` for the elementwise op `op`, for code generic over ops.
            #[track_caller]
            pub fn binary_op(self, op: BinaryOp, rhs: $ty<T>) -> $ty<T> {
                binary(self, rhs, op)
            }

            /// `self op rhs` for the comparison `op`, for code generic over comparisons.
            #[track_caller]
            pub fn compare_op(self, op: CmpOp, rhs: $ty<T>) -> $ty<bool> {
                let loc = Loc::caller();
                $ty::from_id(builder::with(|b| b.compare(op, self.id, rhs.id, loc)))
            }

            /// Converts to element type `U` (rounding, truncating toward zero for float to int).
            #[track_caller]
            pub fn cast<U: Element>(self) -> $ty<U> {
                let loc = Loc::caller();
                $ty::from_id(builder::with(|b| b.cast(self.id, U::DTYPE, loc)))
            }
        }
        impl<T: Float> $ty<T> {
            #[track_caller] pub fn exp(self) -> Self { self.unary_op(UnaryOp::Exp) }
            #[track_caller] pub fn exp2(self) -> Self { self.unary_op(UnaryOp::Exp2) }
            #[track_caller] pub fn log(self) -> Self { self.unary_op(UnaryOp::Log) }
            #[track_caller] pub fn sqrt(self) -> Self { self.unary_op(UnaryOp::Sqrt) }
            #[track_caller] pub fn rsqrt(self) -> Self { self.unary_op(UnaryOp::Rsqrt) }
            #[track_caller] pub fn tanh(self) -> Self { self.unary_op(UnaryOp::Tanh) }
            #[track_caller] pub fn sigmoid(self) -> Self { self.unary_op(UnaryOp::Logistic) }
            #[track_caller] pub fn sin(self) -> Self { self.unary_op(UnaryOp::Sin) }
            #[track_caller] pub fn cos(self) -> Self { self.unary_op(UnaryOp::Cos) }
            #[track_caller] pub fn floor(self) -> Self { self.unary_op(UnaryOp::Floor) }
            #[track_caller] pub fn ceil(self) -> Self { self.unary_op(UnaryOp::Ceil) }
            #[track_caller] pub fn erf(self) -> Self { self.unary_op(UnaryOp::Erf) }
        }
        impl $ty<i32> {
            /// `self << amount`; amounts outside `0..32` are unspecified on a TPU (the
            /// interpreter reports them).
            #[track_caller]
            pub fn shift_left<R>(self, amount: R) -> <Self as Elementwise<R>>::Output where Self: Elementwise<R> {
                binary(self, amount, BinaryOp::ShiftLeft)
            }
            /// `self >> amount`, filling with the sign bit (Rust's `>>` on `i32`).
            #[track_caller]
            pub fn shift_right_arithmetic<R>(self, amount: R) -> <Self as Elementwise<R>>::Output where Self: Elementwise<R> {
                binary(self, amount, BinaryOp::ShiftRightArithmetic)
            }
            /// `self >> amount`, filling with zeros (Rust's `>>` on `u32`).
            #[track_caller]
            pub fn shift_right_logical<R>(self, amount: R) -> <Self as Elementwise<R>>::Output where Self: Elementwise<R> {
                binary(self, amount, BinaryOp::ShiftRightLogical)
            }
        }
        impl<T: Numeric> $ty<T> {
            #[track_caller] pub fn abs(self) -> Self { self.unary_op(UnaryOp::Abs) }
        }
    )*};
}
unary_operators!(Scalar, Tile);

/// Elementwise maximum (NaN-propagating), with broadcasting.
#[track_caller]
pub fn maximum<A: Elementwise<B>, B>(a: A, b: B) -> A::Output
where
    A::Elem: Numeric,
{
    binary(a, b, BinaryOp::Max)
}

/// Elementwise minimum (NaN-propagating), with broadcasting.
#[track_caller]
pub fn minimum<A: Elementwise<B>, B>(a: A, b: B) -> A::Output
where
    A::Elem: Numeric,
{
    binary(a, b, BinaryOp::Min)
}

/// Elementwise `a` to the power `b`.
#[track_caller]
pub fn pow<A: Elementwise<B>, B>(a: A, b: B) -> A::Output
where
    A::Elem: Float,
{
    binary(a, b, BinaryOp::Pow)
}

impl<T: Element> Scalar<T> {
    /// A traced constant.
    #[track_caller]
    pub fn constant(value: impl Operand) -> Scalar<T> {
        let loc = Loc::caller();
        Scalar::from_id(value.operand_id(T::DTYPE, loc))
    }

    /// This scalar broadcast over a tile of `shape`.
    #[track_caller]
    pub fn broadcast_to(self, shape: impl AsRef<[usize]>) -> Tile<T> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.broadcast_to(self.id, shape.as_ref(), loc)))
    }
}

impl<T: Element> Tile<T> {
    /// The tile's static shape.
    pub fn shape(&self) -> Vec<usize> {
        builder::with(|b| b.vty(self.id).shape)
    }

    /// A tile of `shape` filled with `value`.
    #[track_caller]
    pub fn full(shape: impl AsRef<[usize]>, value: impl Operand) -> Tile<T> {
        let loc = Loc::caller();
        let c = value.operand_id(T::DTYPE, loc);
        Tile::from_id(builder::with(|b| b.broadcast_to(c, shape.as_ref(), loc)))
    }

    #[track_caller]
    pub fn reshape(self, shape: impl AsRef<[usize]>) -> Tile<T> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.reshape(self.id, shape.as_ref(), loc)))
    }

    /// Numpy-style broadcast to `shape`.
    #[track_caller]
    pub fn broadcast_to(self, shape: impl AsRef<[usize]>) -> Tile<T> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.broadcast_to(self.id, shape.as_ref(), loc)))
    }

    /// Rotates along `axis` as `jnp.roll` (and Pallas' `pltpu.roll`): element `i` moves to
    /// `(i + shift) mod n`. `shift` is an `i32` or a traced `Scalar<i32>`, of either sign; on a
    /// TPU this is one lane or sublane rotate (`tpu.dynamic_rotate`).
    #[track_caller]
    pub fn roll(self, shift: impl Shift, axis: usize) -> Tile<T> {
        let loc = Loc::caller();
        let s = shift.shift_id(loc);
        Tile::from_id(builder::with(|b| b.roll(self.id, s, axis, None, loc)))
    }

    /// A roll whose shift grows along another axis, as Pallas' `pltpu.roll(x, shift, axis,
    /// stride, stride_axis)`: slice `j` along `stride_axis` rolls by `shift + j * stride`
    /// (one `tpu.dynamic_rotate` on a TPU).
    #[track_caller]
    pub fn roll_strided(self, shift: impl Shift, axis: usize, stride: u32, stride_axis: usize) -> Tile<T> {
        let loc = Loc::caller();
        let s = shift.shift_id(loc);
        Tile::from_id(builder::with(|b| b.roll(self.id, s, axis, Some(RollStride { stride, axis: stride_axis }), loc)))
    }

    /// The static window of `shape` at `start` (numpy's `x[s0:s0+n0, s1:s1+n1]`).
    #[track_caller]
    pub fn slice(self, start: impl AsRef<[usize]>, shape: impl AsRef<[usize]>) -> Tile<T> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.slice(self.id, start.as_ref(), shape.as_ref(), loc)))
    }

    /// Permutes the axes: the result's axis `i` is this tile's axis `perm[i]`.
    #[track_caller]
    pub fn transpose(self, perm: impl AsRef<[usize]>) -> Tile<T> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.transpose(self.id, perm.as_ref(), loc)))
    }

    /// The same bits read as `U`, as Pallas' `pltpu.bitcast`: between dtypes of one width
    /// (f32 and i32) the shape stays; between widths the second-minor rows pack or unpack
    /// (bf16 `[16, 128]` is i32 `[8, 128]`, rows `2r` and `2r + 1` in the low and high
    /// halves of row `r`).
    #[track_caller]
    pub fn bitcast<U: Element>(self) -> Tile<U> {
        let loc = Loc::caller();
        Tile::from_id(builder::with(|b| b.bitcast(self.id, U::DTYPE, loc)))
    }

    /// Inserts an axis of length 1 at `axis` (numpy's `x[:, None]` for `axis = 1`).
    #[track_caller]
    pub fn expand_dims(self, axis: usize) -> Tile<T> {
        let loc = Loc::caller();
        builder::with(|b| {
            let mut shape = b.vty(self.id).shape;
            if axis > shape.len() {
                let msg = format!("expand_dims({axis}) on a tile of rank {}", shape.len());
                return Tile::from_id(b.fail(loc, msg, crate::ir::ValueType::new(T::DTYPE, shape)));
            }
            shape.insert(axis, 1);
            Tile::from_id(b.reshape(self.id, &shape, loc))
        })
    }
}

macro_rules! reductions {
    ($($name:ident, $keep:ident, $op:expr, $doc:literal;)*) => {
        impl<T: Numeric> Tile<T> {$(
            #[doc = $doc]
            #[track_caller]
            pub fn $name(self, axis: usize) -> Tile<T> {
                let loc = Loc::caller();
                Tile::from_id(builder::with(|b| b.reduce($op, self.id, axis, loc)))
            }

            #[doc = $doc]
            /// The reduced axis is kept with length 1.
            #[track_caller]
            pub fn $keep(self, axis: usize) -> Tile<T> {
                let loc = Loc::caller();
                Tile::from_id(builder::with(|b| {
                    let mut shape = b.vty(self.id).shape;
                    let r = b.reduce($op, self.id, axis, loc);
                    if axis < shape.len() {
                        shape[axis] = 1;
                        b.reshape(r, &shape, loc)
                    } else {
                        r
                    }
                }))
            }
        )*}
    };
}
reductions! {
    sum, sum_keepdims, ReduceOp::Sum, "Sum over `axis`, which is removed.";
    max, max_keepdims, ReduceOp::Max, "Maximum over `axis` (NaN-propagating), which is removed.";
    min, min_keepdims, ReduceOp::Min, "Minimum over `axis` (NaN-propagating), which is removed.";
}

impl<T: Float> Tile<T> {
    /// The mean over `axis`, which is removed.
    #[track_caller]
    pub fn mean(self, axis: usize) -> Tile<T> {
        let n = self.shape().get(axis).copied().unwrap_or(1);
        self.sum(axis) / n as f32
    }

    /// The mean over `axis`, kept with length 1.
    #[track_caller]
    pub fn mean_keepdims(self, axis: usize) -> Tile<T> {
        let n = self.shape().get(axis).copied().unwrap_or(1);
        self.sum_keepdims(axis) / n as f32
    }
}

/// What `roll` takes as a shift: a literal or a traced scalar.
#[doc(hidden)]
pub trait Shift {
    fn shift_id(self, loc: Loc) -> ValueId;
}

impl Shift for i32 {
    fn shift_id(self, loc: Loc) -> ValueId {
        builder::with(|b| b.constant(Literal::Int(self as i64), DType::I32, loc))
    }
}

impl Shift for Scalar<i32> {
    fn shift_id(self, _: Loc) -> ValueId {
        self.id
    }
}

impl Scalar<i32> {
    /// This value, which the kernel promises is a multiple of `multiple` (Pallas'
    /// `pl.multiple_of`): lets a TPU prove offsets built from it aligned. The interpreter checks
    /// the promise.
    #[track_caller]
    pub fn multiple_of(self, multiple: u32) -> Scalar<i32> {
        let loc = Loc::caller();
        Scalar::from_id(builder::with(|b| b.assume_multiple(self.id, multiple, loc)))
    }
}

/// Seeds the core's random number generator (Pallas' `pltpu.prng_seed`). Bits drawn after
/// it are a function of the seeds; seed each program differently (with its `program_id`) for
/// different streams.
#[track_caller]
pub fn prng_seed(seeds: &[Scalar<i32>]) {
    let loc = Loc::caller();
    let ids: Vec<ValueId> = seeds.iter().map(|s| s.id).collect();
    builder::with(|b| b.prng_seed(&ids, loc));
}

/// A tile of random bits (Pallas' `pltpu.prng_random_bits`); each call draws new ones. On a
/// TPU the hardware generator; on the CPU backends the generator of [`crate::random`].
#[track_caller]
pub fn prng_random_bits(shape: impl AsRef<[usize]>) -> Tile<i32> {
    let loc = Loc::caller();
    Tile::from_id(builder::with(|b| b.prng_random_bits(shape.as_ref(), loc)))
}

/// A tile of floats uniform in [0, 1): the top 23 random bits as a mantissa.
#[track_caller]
pub fn random_uniform(shape: impl AsRef<[usize]>) -> Tile<f32> {
    let bits = prng_random_bits(shape).shift_right_logical(9) | 0x3f80_0000;
    bits.bitcast::<f32>() - 1.0
}

/// The tiles of the kernel being traced, as the u32 words of [`crate::random`]'s functions
/// (an `i32` tile holds the bits; its arithmetic wraps as `u32`'s does).
struct TracedWords;

impl crate::random::U32Ops for TracedWords {
    type V = Tile<i32>;
    fn constant(&mut self, c: u32) -> Tile<i32> {
        Tile::full([1, 1], c as i32)
    }
    fn xor(&mut self, a: &Tile<i32>, b: &Tile<i32>) -> Tile<i32> {
        *a ^ *b
    }
    fn add(&mut self, a: &Tile<i32>, b: &Tile<i32>) -> Tile<i32> {
        *a + *b
    }
    fn mul(&mut self, a: &Tile<i32>, b: &Tile<i32>) -> Tile<i32> {
        *a * *b
    }
    fn shr(&mut self, a: &Tile<i32>, by: u32) -> Tile<i32> {
        a.shift_right_logical(by as i32)
    }
}

/// The key of a stateless random stream (for [`random_bits_at`]): a function of `seeds`
/// alone, each a tile of one element (or tiles that broadcast together).
#[track_caller]
pub fn random_key(seeds: &[Tile<i32>]) -> Tile<i32> {
    crate::random::seed_key(&mut TracedWords, seeds)
}

/// Random bits for each element of `counters` under `key`: a function of the two alone, the
/// same on every backend and whatever the blocking (a counter-based generator, as
/// `jax.random` is), so that two kernels, or two block sizes, regenerate the same bits for the
/// same counters. The bits are those [`crate::random`]'s generator gives with the counter at 0.
/// [`prng_random_bits`] instead draws a TPU's hardware generator, which is faster there but
/// sequential, and not reproduced off the TPU.
#[track_caller]
pub fn random_bits_at(key: Tile<i32>, counters: Tile<i32>) -> Tile<i32> {
    let zero = Tile::full([1, 1], 0);
    crate::random::bits(&mut TracedWords, &key, &zero, &counters)
}

/// `tiles` joined along `axis` (they agree in every other dim).
#[track_caller]
pub fn concatenate<T: Element>(tiles: &[Tile<T>], axis: usize) -> Tile<T> {
    let loc = Loc::caller();
    let ids: Vec<ValueId> = tiles.iter().map(|t| t.id).collect();
    Tile::from_id(builder::with(|b| b.concat(&ids, axis, loc)))
}

/// Picks `on_true` where `cond` holds, else `on_false`, broadcasting all three.
#[track_caller]
pub fn select<C: Operand, A: Elementwise<B>, B>(cond: C, on_true: A, on_false: B) -> A::Output {
    let loc = Loc::caller();
    let c = cond.operand_id(DType::Bool, loc);
    let (t, f) = (on_true.lhs_id(loc), A::rhs_id(on_false, loc));
    A::wrap(builder::with(|b| b.select(c, t, f, loc)))
}

fn dot_impl<T: DotOperand>(a: Tile<T>, b: Tile<T>, ta: bool, tb: bool, loc: Loc) -> Tile<T::Acc> {
    Tile::from_id(builder::with(|bd| bd.dot(a.id, b.id, ta, tb, loc)))
}

/// `a · b` for 2-D tiles, accumulated in f32 (floats) or i32 (integers), on the MXU.
#[track_caller]
pub fn dot<T: DotOperand>(a: Tile<T>, b: Tile<T>) -> Tile<T::Acc> {
    dot_impl(a, b, false, false, Loc::caller())
}

/// `a · bᵀ` (as in `q · kᵀ`), accumulated like [`dot`].
#[track_caller]
pub fn dot_nt<T: DotOperand>(a: Tile<T>, b: Tile<T>) -> Tile<T::Acc> {
    dot_impl(a, b, false, true, Loc::caller())
}

/// `aᵀ · b` (as in `pᵀ · dO`), accumulated like [`dot`].
#[track_caller]
pub fn dot_tn<T: DotOperand>(a: Tile<T>, b: Tile<T>) -> Tile<T::Acc> {
    dot_impl(a, b, true, false, Loc::caller())
}

/// A tile of `shape` whose elements count up from 0 along `dim`.
#[track_caller]
pub fn iota<T: Numeric>(shape: impl AsRef<[usize]>, dim: usize) -> Tile<T> {
    let loc = Loc::caller();
    Tile::from_id(builder::with(|b| b.iota(T::DTYPE, shape.as_ref(), dim, loc)))
}

/// The index of the running program along grid axis `axis`.
#[track_caller]
pub fn program_id(axis: usize) -> Scalar<i32> {
    let loc = Loc::caller();
    Scalar::from_id(builder::with(|b| b.program_id(axis, false, loc)))
}

/// The grid's extent along `axis`.
#[track_caller]
pub fn num_programs(axis: usize) -> Scalar<i32> {
    let loc = Loc::caller();
    Scalar::from_id(builder::with(|b| b.program_id(axis, true, loc)))
}
