//! The kernel IR: SSA values with static shapes, ops that may own regions, and functions.
//!
//! A kernel body and every index map are each one [`Func`]. Values live in the function's
//! arena and are referred to by [`ValueId`]; every op records the Rust source location of
//! the expression that produced it, so errors anywhere downstream can point at user code.

use std::fmt;

use crate::dtype::DType;

/// A Rust source location (from `#[track_caller]`), attached to every op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub file: &'static str,
    pub line: u32,
    pub column: u32,
}

impl Loc {
    #[track_caller]
    pub fn caller() -> Loc {
        let l = std::panic::Location::caller();
        Loc { file: l.file(), line: l.line(), column: l.column() }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The type of a traced value: a dtype and a static shape (rank 0 is a scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValueType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl ValueType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        ValueType { dtype, shape: shape.into() }
    }

    /// This value's bits read as `to`, as Pallas' `pltpu.bitcast`: the same shape between
    /// dtypes of one width; between widths the second-minor dimension scales by the ratio
    /// of the widths (a TPU packs narrow rows into one 32-bit sublane), so row `p * r + k`
    /// of the narrow side is bits `k * narrow..(k + 1) * narrow` of wide row `r`.
    pub fn bitcast_to(&self, to: DType) -> Result<ValueType, String> {
        let (from, wide) = (self.dtype.size_bytes() * 8, to.size_bytes() * 8);
        if self.dtype == DType::Bool || to == DType::Bool {
            return Err(format!("bitcast from {} to {to}: bool has no bit pattern to share", self.dtype));
        }
        if from == wide {
            return Ok(ValueType::new(to, self.shape.clone()));
        }
        let rank = self.shape.len();
        let Some(&rows) = self.shape.get(rank.wrapping_sub(2)) else {
            return Err(format!("bitcast of {self} to {to}, a dtype of another width: that needs a tile of rank 2 or more, whose second-minor rows it packs or unpacks"));
        };
        if (rows * from) % wide != 0 {
            return Err(format!("bitcast of {self} to {to}: {rows} rows of {from} bits do not fill whole rows of {wide} bits; use a multiple of {} rows", (wide / from).max(1)));
        }
        let mut shape = self.shape.clone();
        shape[rank - 2] = rows * from / wide;
        Ok(ValueType::new(to, shape))
    }

    pub fn scalar(dtype: DType) -> Self {
        ValueType { dtype, shape: Vec::new() }
    }

    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of a dense array of this type.
    pub fn size_bytes(&self) -> usize {
        self.num_elements() * self.dtype.size_bytes()
    }

    /// Bytes of a dense array of this type, or `None` where that overflows a `usize`.
    pub fn checked_size_bytes(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.shape {
            write!(f, "{d}x")?;
        }
        write!(f, "{}", self.dtype)
    }
}

/// Where a ref lives on the TPU core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemorySpace {
    /// Vector memory: blocks of operands and vector scratch.
    Vmem,
    /// Scalar memory: scalar prefetch tables and scalar scratch.
    Smem,
    /// Left where it is (HBM), unblocked (Pallas' `memory_space=ANY`): reached only by copies.
    Any,
    /// DMA semaphores: what a copy signals and a wait consumes.
    Semaphore,
}

impl fmt::Display for MemorySpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemorySpace::Vmem => "vmem",
            MemorySpace::Smem => "smem",
            MemorySpace::Any => "any",
            MemorySpace::Semaphore => "semaphore",
        })
    }
}

/// The type of a ref: a buffer in VMEM or SMEM that the kernel loads from and stores to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RefType {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub space: MemorySpace,
}

impl fmt::Display for RefType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ref<")?;
        for d in &self.shape {
            write!(f, "{d}x")?;
        }
        write!(f, "{}, {}>", self.dtype, self.space)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Value(ValueType),
    Ref(RefType),
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Value(v) => v.fmt(f),
            Type::Ref(r) => r.fmt(f),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub ty: Type,
    pub loc: Loc,
}

/// A constant, splatted over the result's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Literal {
    Float(f64),
    Int(i64),
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Float(x) => write!(f, "{x:?}"),
            Literal::Int(x) => write!(f, "{x}"),
            Literal::Bool(x) => write!(f, "{x}"),
        }
    }
}

/// A position along one axis of a ref: known at trace time, or an i32 scalar value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offset {
    Static(usize),
    Dynamic(ValueId),
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Offset::Static(s) => write!(f, "{s}"),
            Offset::Dynamic(v) => write!(f, "{v}"),
        }
    }
}

/// How a load or store addresses one axis of a ref.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Index {
    /// The whole axis.
    Full,
    /// `len` elements from `start` (Pallas' `pl.ds`).
    Slice { start: Offset, len: usize },
    /// One element; the axis is dropped from the loaded tile.
    Point(Offset),
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Index::Full => write!(f, ":"),
            Index::Slice { start, len } => write!(f, "{start}+:{len}"),
            Index::Point(o) => write!(f, "{o}"),
        }
    }
}

/// Code run once per variant of an op enum, the variant being `ALL[I]`.
pub trait Specialized<E> {
    type Out;
    fn run<const I: usize>(self) -> Self::Out;
}

/// Declares an op enum with `ALL`, every variant in order, so tables over ops (the
/// conformance matrix, the docs) cannot miss one.
macro_rules! op_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),*];

            /// Runs `v` compiled once per variant, with the variant a compile-time constant
            /// (`$name::ALL[I]`): the interpreter's loops inline the op's scalar function.
            #[inline(always)]
            pub fn specialize<V: Specialized<$name>>(self, v: V) -> V::Out {
                match self { $($name::$v => v.run::<{ $name::$v as usize }>()),* }
            }
        }
    };
}

op_enum!(
    /// Elementwise ops of one operand; their semantics and lowerings are in [`crate::elementwise`].
    UnaryOp {
        Neg,
        Exp,
        Exp2,
        Log,
        Sqrt,
        Rsqrt,
        Tanh,
        Logistic,
        Erf,
        Abs,
        Sin,
        Cos,
        Floor,
        Ceil,
        /// Logical not for bool, bitwise not for integers.
        Not,
    }
);

op_enum!(
    /// Elementwise ops of two operands of one dtype; see [`crate::elementwise`].
    BinaryOp {
        Add,
        Sub,
        Mul,
        Div,
        Rem,
        Max,
        Min,
        Pow,
        And,
        Or,
        Xor,
        ShiftLeft,
        ShiftRightArithmetic,
        ShiftRightLogical,
    }
);

op_enum!(
    /// Comparisons; see [`crate::elementwise`].
    CmpOp { Eq, Ne, Lt, Le, Gt, Ge }
);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

/// An asynchronous copy between two ref regions, signalling one DMA semaphore (Pallas'
/// `make_async_copy(src.at[...], dst.at[...], sem.at[...])`).
#[derive(Clone, Debug, PartialEq)]
pub struct DmaCopy {
    pub src: ValueId,
    pub src_index: Vec<Index>,
    pub dst: ValueId,
    pub dst_index: Vec<Index>,
    /// A ref of DMA semaphores, indexed down to one.
    pub sem: ValueId,
    pub sem_index: Vec<Index>,
}

impl DmaCopy {
    fn operands(&self, out: &mut Vec<ValueId>) {
        for (r, index) in [(self.src, &self.src_index), (self.dst, &self.dst_index), (self.sem, &self.sem_index)] {
            out.push(r);
            out.extend(dynamic_offsets(index));
        }
    }
}

/// The traced values an index reads.
pub fn dynamic_offsets(index: &[Index]) -> impl Iterator<Item = ValueId> + '_ {
    index.iter().filter_map(|ix| match ix {
        Index::Slice { start: Offset::Dynamic(v), .. } | Index::Point(Offset::Dynamic(v)) => Some(*v),
        _ => None,
    })
}

#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    Constant(Literal),
    ProgramId {
        axis: usize,
    },
    NumPrograms {
        axis: usize,
    },
    Load {
        src: ValueId,
        index: Vec<Index>,
    },
    Store {
        dst: ValueId,
        index: Vec<Index>,
        value: ValueId,
    },
    Unary {
        op: UnaryOp,
        x: ValueId,
    },
    /// Both operands have the result's shape; the tracer inserts broadcasts.
    Binary {
        op: BinaryOp,
        lhs: ValueId,
        rhs: ValueId,
    },
    Compare {
        op: CmpOp,
        lhs: ValueId,
        rhs: ValueId,
    },
    Select {
        cond: ValueId,
        on_true: ValueId,
        on_false: ValueId,
    },
    /// Converts to the result's dtype.
    Cast {
        x: ValueId,
    },
    /// Numpy-style broadcast to the result's shape (also scalar to vector).
    Broadcast {
        x: ValueId,
    },
    Reshape {
        x: ValueId,
    },
    /// Reduces `axis` away.
    Reduce {
        op: ReduceOp,
        x: ValueId,
        axis: usize,
    },
    /// A 2-D matrix product accumulated in the result's dtype.
    Dot {
        lhs: ValueId,
        rhs: ValueId,
        transpose_lhs: bool,
        transpose_rhs: bool,
    },
    Iota {
        dim: usize,
    },
    /// `x` rotated along `axis` as `jnp.roll`: element `i` moves to `(i + shift) mod n`, for
    /// an i32 scalar `shift` of any sign. With a stride, slice `j` along the stride's axis
    /// moves by `shift + j * stride` (Pallas' `pltpu.roll(..., stride, stride_axis)`).
    Roll {
        x: ValueId,
        shift: ValueId,
        axis: usize,
        stride: Option<RollStride>,
    },
    /// The window of `x` starting at `start`, of the result's shape.
    Slice {
        x: ValueId,
        start: Vec<usize>,
    },
    /// `xs` joined along `axis`.
    Concat {
        xs: Vec<ValueId>,
        axis: usize,
    },
    /// `x` with its axes permuted: the result's axis `i` is `x`'s axis `perm[i]`.
    Transpose {
        x: ValueId,
        perm: Vec<usize>,
    },
    /// `x`'s bits read as the result's dtype, of the same width.
    Bitcast {
        x: ValueId,
    },
    /// `x`, which the kernel promises is a multiple of `multiple` (the interpreter checks).
    AssumeMultiple {
        x: ValueId,
        multiple: u32,
    },
    /// Seeds the core's random number generator from i32 scalars (Pallas' `prng_seed`).
    PrngSeed {
        seeds: Vec<ValueId>,
    },
    /// An i32 tile of random bits from the generator (Pallas' `prng_random_bits`); see
    /// [`crate::random`] for what the CPU backends compute.
    PrngRandomBits,
    /// Starts a copy; it lands by the matching `DmaWait`.
    DmaStart(DmaCopy),
    /// Waits for a copy started with the same source, destination and semaphore.
    DmaWait(DmaCopy),
    If {
        cond: ValueId,
        then_region: Region,
        else_region: Region,
    },
    /// `for iv in lo..hi` with carried values; the body's args are `[iv, carried...]`.
    For {
        lo: ValueId,
        hi: ValueId,
        inits: Vec<ValueId>,
        body: Region,
    },
    /// `while cond(carried) { carried = body(carried) }`: both regions take the carried values
    /// as arguments; `cond` yields one bool scalar and only computes (no stores, copies or
    /// random bits), `body` yields the next carried values.
    While {
        inits: Vec<ValueId>,
        cond: Region,
        body: Region,
    },
    /// Ends an `If`, `For` or `While` region with the values it passes on.
    Yield {
        values: Vec<ValueId>,
    },
}

/// A roll whose shift grows by `stride` with each index along `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollStride {
    pub stride: u32,
    pub axis: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    pub results: Vec<ValueId>,
    pub loc: Loc,
}

impl Op {
    /// The values this op reads (not counting values used inside its regions).
    pub fn operands(&self) -> Vec<ValueId> {
        use OpKind::*;
        let mut out = Vec::new();
        let index_values = |index: &[Index], out: &mut Vec<ValueId>| out.extend(dynamic_offsets(index));
        match &self.kind {
            Constant(_) | ProgramId { .. } | NumPrograms { .. } | Iota { .. } | PrngRandomBits => {}
            PrngSeed { seeds } => out.extend(seeds),
            DmaStart(copy) | DmaWait(copy) => copy.operands(&mut out),
            Load { src, index } => {
                out.push(*src);
                index_values(index, &mut out);
            }
            Store { dst, index, value } => {
                out.push(*dst);
                index_values(index, &mut out);
                out.push(*value);
            }
            Unary { x, .. }
            | Cast { x }
            | Broadcast { x }
            | Reshape { x }
            | Reduce { x, .. }
            | Slice { x, .. }
            | Transpose { x, .. }
            | Bitcast { x }
            | AssumeMultiple { x, .. } => out.push(*x),
            Roll { x, shift, .. } => out.extend([*x, *shift]),
            Concat { xs, .. } => out.extend(xs),
            Binary { lhs, rhs, .. } | Compare { lhs, rhs, .. } | Dot { lhs, rhs, .. } => out.extend([*lhs, *rhs]),
            Select { cond, on_true, on_false } => out.extend([*cond, *on_true, *on_false]),
            If { cond, .. } => out.push(*cond),
            For { lo, hi, inits, .. } => {
                out.extend([*lo, *hi]);
                out.extend(inits);
            }
            While { inits, .. } => out.extend(inits),
            Yield { values } => out.extend(values),
        }
        out
    }

    pub fn regions(&self) -> Vec<&Region> {
        match &self.kind {
            OpKind::If { then_region, else_region, .. } => vec![then_region, else_region],
            OpKind::For { body, .. } => vec![body],
            OpKind::While { cond, body, .. } => vec![cond, body],
            _ => Vec::new(),
        }
    }
}

/// A list of ops with block arguments; regions of `If`/`For` end with a `Yield`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Region {
    pub args: Vec<ValueId>,
    pub ops: Vec<Op>,
}

impl Region {
    /// Visits every op of the region and of the regions within it, depth first, in program
    /// order.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Op)) {
        for op in &self.ops {
            f(op);
            for sub in op.regions() {
                sub.walk(f);
            }
        }
    }
}

/// A traced function: a kernel body or an index map.
#[derive(Clone, Debug, PartialEq)]
pub struct Func {
    pub name: String,
    pub values: Vec<ValueInfo>,
    pub args: Vec<ValueId>,
    pub body: Region,
    pub results: Vec<ValueId>,
}

impl Func {
    pub fn ty(&self, v: ValueId) -> &Type {
        &self.values[v.index()].ty
    }

    /// The value type of `v`; refs have none (the verifier guarantees they are never used as values).
    pub fn value_type(&self, v: ValueId) -> Option<&ValueType> {
        match self.ty(v) {
            Type::Value(t) => Some(t),
            Type::Ref(_) => None,
        }
    }

    pub fn ref_type(&self, v: ValueId) -> Option<&RefType> {
        match self.ty(v) {
            Type::Ref(r) => Some(r),
            Type::Value(_) => None,
        }
    }

    pub fn loc(&self, v: ValueId) -> Loc {
        self.values[v.index()].loc
    }

    /// The literal `v` is, where a constant op defines it.
    pub fn constant_value(&self, v: ValueId) -> Option<Literal> {
        let mut found = None;
        self.walk(&mut |op| {
            if let (OpKind::Constant(lit), Some(&r)) = (&op.kind, op.results.first()) {
                if r == v {
                    found = Some(*lit);
                }
            }
        });
        found
    }

    /// Visits every op, depth first, in program order.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Op)) {
        self.body.walk(f);
    }
}
