//! Refs a kernel reads and writes: operand blocks (`Ref`), scratch (`Scratch`), and
//! scalar-prefetch tables (`Prefetch`), with whole, sliced and element access.

use std::marker::PhantomData;
use std::ops::{Range, RangeFull};

use crate::dtype::{DType, Element};
use crate::ir::{DmaCopy, Index, Literal, Loc, MemorySpace, Offset, Op, OpKind, Type, ValueId, ValueType};
use crate::trace::builder::{self, Builder};
use crate::trace::values::{Scalar, Tile};

/// Where a slice or element starts along one axis.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    Static(i64),
    Dynamic(Scalar<i32>),
}

impl From<usize> for Start {
    fn from(s: usize) -> Self {
        Start::Static(s as i64)
    }
}
impl From<i32> for Start {
    fn from(s: i32) -> Self {
        Start::Static(s as i64)
    }
}
impl From<Scalar<i32>> for Start {
    fn from(s: Scalar<i32>) -> Self {
        Start::Dynamic(s)
    }
}

/// How to address one axis of a ref: `..` (all), `a..b`, [`ds`]`(start, len)`, or one element.
#[derive(Clone, Copy, Debug)]
pub enum Ix {
    Full,
    Slice(Start, usize),
    Point(Start),
}

/// A slice of `len` elements from `start`, which may be traced (Pallas' `pl.ds`).
pub fn ds(start: impl Into<Start>, len: usize) -> Ix {
    Ix::Slice(start.into(), len)
}

impl From<RangeFull> for Ix {
    fn from(_: RangeFull) -> Self {
        Ix::Full
    }
}
impl From<Range<usize>> for Ix {
    fn from(r: Range<usize>) -> Self {
        Ix::Slice(Start::Static(r.start as i64), r.end.saturating_sub(r.start))
    }
}
impl From<usize> for Ix {
    fn from(i: usize) -> Self {
        Ix::Point(Start::Static(i as i64))
    }
}
impl From<i32> for Ix {
    fn from(i: i32) -> Self {
        Ix::Point(Start::Static(i as i64))
    }
}
impl From<Scalar<i32>> for Ix {
    fn from(i: Scalar<i32>) -> Self {
        Ix::Point(Start::Dynamic(i))
    }
}

/// An index into every axis of a ref: a tuple or array of [`Ix`]-convertible items.
pub trait IntoIndex {
    fn into_index(self) -> Vec<Ix>;
}

impl<I: Into<Ix>, const N: usize> IntoIndex for [I; N] {
    fn into_index(self) -> Vec<Ix> {
        self.into_iter().map(Into::into).collect()
    }
}

macro_rules! tuple_index {
    ($($n:ident),+) => {
        impl<$($n: Into<Ix>),+> IntoIndex for ($($n,)+) {
            #[allow(non_snake_case)]
            fn into_index(self) -> Vec<Ix> {
                let ($($n,)+) = self;
                vec![$($n.into()),+]
            }
        }
    };
}
tuple_index!(A);
tuple_index!(A, B);
tuple_index!(A, B, C);
tuple_index!(A, B, C, D);
tuple_index!(A, B, C, D, E);

/// What a store accepts: a tile, a scalar (broadcast), or a fill such as [`zeros`].
pub trait Storable<T> {
    #[doc(hidden)]
    fn value_for(self, shape: &[usize], loc: Loc) -> ValueId;
}

impl<T> Storable<T> for Tile<T> {
    fn value_for(self, _: &[usize], _: Loc) -> ValueId {
        self.id
    }
}
impl<T> Storable<T> for Scalar<T> {
    fn value_for(self, shape: &[usize], loc: Loc) -> ValueId {
        builder::with(|b| b.broadcast_to(self.id, shape, loc))
    }
}

/// A constant that takes the shape of whatever it is stored into.
#[derive(Clone, Copy, Debug)]
pub struct Fill(Literal);

/// Zeros shaped like the destination of the store.
pub fn zeros() -> Fill {
    Fill(Literal::Int(0))
}

/// `value` everywhere in the destination of the store (`f32::NEG_INFINITY` for a running max).
pub fn full(value: f64) -> Fill {
    Fill(Literal::Float(value))
}

impl<T: Element> Storable<T> for Fill {
    fn value_for(self, shape: &[usize], loc: Loc) -> ValueId {
        let lit = match (self.0, T::DTYPE) {
            (Literal::Int(i), d) if d.is_float() => Literal::Float(i as f64),
            (Literal::Float(x), d) if d.is_int() => Literal::Int(x as i64),
            (Literal::Int(i), DType::Bool) => Literal::Bool(i != 0),
            (Literal::Float(x), DType::Bool) => Literal::Bool(x != 0.0),
            (lit, _) => lit,
        };
        builder::with(|b| b.splat(lit, T::DTYPE, shape, loc))
    }
}

impl Builder {
    /// Resolves an index against a ref: the IR index and the shape it selects.
    fn resolve_index(&mut self, r: ValueId, ix: &[Ix], loc: Loc) -> Option<(Vec<Index>, Vec<usize>)> {
        let Type::Ref(rt) = self.ty(r).clone() else {
            self.fail_silent(loc, "indexing a value that is not a ref");
            return None;
        };
        let ix: Vec<Ix> = if ix.is_empty() { vec![Ix::Full; rt.shape.len()] } else { ix.to_vec() };
        if ix.len() != rt.shape.len() {
            let msg = format!("index with {} entries for a ref of rank {} (shape {:?})", ix.len(), rt.shape.len(), rt.shape);
            self.fail_silent(loc, msg);
            return None;
        }
        let mut index = Vec::new();
        let mut shape = Vec::new();
        for (axis, (i, &dim)) in ix.iter().zip(&rt.shape).enumerate() {
            let offset = |b: &mut Builder, s: &Start, len: usize| -> Option<Offset> {
                match s {
                    Start::Static(st) if *st < 0 || *st as usize + len > dim => {
                        let msg = format!("axis {axis}: elements {st}..{} are outside the ref's extent {dim} (shape {:?})", st + len as i64, rt.shape);
                        b.fail_silent(loc, msg);
                        None
                    }
                    Start::Static(st) => Some(Offset::Static(*st as usize)),
                    Start::Dynamic(v) => Some(Offset::Dynamic(v.id)),
                }
            };
            match i {
                Ix::Full => {
                    index.push(Index::Full);
                    shape.push(dim);
                }
                Ix::Slice(s, len) => {
                    index.push(Index::Slice { start: offset(self, s, *len)?, len: *len });
                    shape.push(*len);
                }
                Ix::Point(s) => index.push(Index::Point(offset(self, s, 1)?)),
            }
        }
        Some((index, shape))
    }

    /// Resolves an index for a load or store, which only VMEM and (element by element) SMEM
    /// refs take.
    fn resolve_access(&mut self, r: ValueId, ix: &[Ix], loc: Loc) -> Option<(Vec<Index>, Vec<usize>)> {
        let (index, shape) = self.resolve_index(r, ix, loc)?;
        let Type::Ref(rt) = self.ty(r).clone() else { return None };
        let refusal = match rt.space {
            MemorySpace::Smem if !shape.is_empty() => {
                Some(format!("vector access to an SMEM ref of shape {:?}: SMEM holds scalars, so index every axis with one element", rt.shape))
            }
            MemorySpace::Any => Some(
                "this ref is left in HBM (`BlockSpec::any()`): copy the part you need into VMEM scratch with `async_copy(src.at(..), dst.at(..), sem.at(..))` and read that"
                    .to_string(),
            ),
            MemorySpace::Semaphore => Some("DMA semaphores are only signalled and waited on by copies (`async_copy`), not read or written".to_string()),
            _ => None,
        };
        if let Some(msg) = refusal {
            self.fail_silent(loc, msg);
            return None;
        }
        Some((index, shape))
    }

    pub(crate) fn load(&mut self, r: ValueId, ix: &[Ix], dtype: DType, loc: Loc) -> ValueId {
        match self.resolve_access(r, ix, loc) {
            Some((index, shape)) => self.push(OpKind::Load { src: r, index }, ValueType::new(dtype, shape), loc),
            None => self.new_value(Type::Value(ValueType::scalar(dtype)), loc),
        }
    }

    fn push_store(&mut self, r: ValueId, index: Vec<Index>, shape: &[usize], value: ValueId, loc: Loc) {
        let vt = self.vty(value);
        if vt.shape != shape {
            if !self.has_error() {
                self.fail_silent(loc, format!("storing a value of shape {:?} into a region of shape {:?}", vt.shape, shape));
            }
            return;
        }
        self.push_op(Op { kind: OpKind::Store { dst: r, index, value }, results: Vec::new(), loc });
    }
}

/// Stores `value` into `r[ix]`: resolves the region, builds the value for its shape, then the store.
fn store<T, S: Storable<T>>(r: ValueId, ix: &[Ix], value: S, loc: Loc) {
    let Some((index, shape)) = builder::with(|b| b.resolve_access(r, ix, loc)) else { return };
    let v = value.value_for(&shape, loc);
    builder::with(|b| b.push_store(r, index, &shape, v, loc));
}

macro_rules! ref_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name<T> {
            pub(crate) id: ValueId,
            _t: PhantomData<fn() -> T>,
        }

        impl<T: Element> $name<T> {
            #[doc(hidden)]
            pub fn __bind(id: ValueId) -> Self {
                $name { id, _t: PhantomData }
            }

            /// The ref's static shape (for an operand: its block shape, squeezed dims removed).
            pub fn shape(&self) -> Vec<usize> {
                builder::with(|b| b.vty(self.id).shape)
            }

            /// A region of the ref, for a copy (`async_copy`).
            #[track_caller]
            pub fn at(&self, index: impl IntoIndex) -> Window {
                let loc = Loc::caller();
                let ix = index.into_index();
                builder::with(|b| b.window(self.id, &ix, loc))
            }

            /// One element, as a scalar: every axis indexed with one position.
            #[track_caller]
            pub fn get(&self, index: impl IntoIndex) -> Scalar<T> {
                let loc = Loc::caller();
                let ix = index.into_index();
                Scalar::from_id(builder::with(|b| {
                    let v = b.load(self.id, &ix, T::DTYPE, loc);
                    if !b.vty(v).shape.is_empty() && !b.has_error() {
                        return b.fail(loc, "`get` reads one element: index every axis with a position, not a range", ValueType::scalar(T::DTYPE));
                    }
                    v
                }))
            }
        }
    };
}

macro_rules! vector_access {
    ($name:ident) => {
        impl<T: Element> $name<T> {
            /// The whole ref as a tile.
            #[track_caller]
            pub fn load(&self) -> Tile<T> {
                let loc = Loc::caller();
                Tile::from_id(builder::with(|b| b.load(self.id, &[], T::DTYPE, loc)))
            }

            /// A slice of the ref as a tile; axes indexed with one position are dropped.
            #[track_caller]
            pub fn load_at(&self, index: impl IntoIndex) -> Tile<T> {
                let loc = Loc::caller();
                let ix = index.into_index();
                Tile::from_id(builder::with(|b| b.load(self.id, &ix, T::DTYPE, loc)))
            }

            /// Writes the whole ref.
            #[track_caller]
            pub fn store(&mut self, value: impl Storable<T>) {
                let loc = Loc::caller();
                store(self.id, &[], value, loc)
            }

            /// Writes a slice (or one element) of the ref.
            #[track_caller]
            pub fn store_at(&mut self, index: impl IntoIndex, value: impl Storable<T>) {
                let loc = Loc::caller();
                let ix = index.into_index();
                store(self.id, &ix, value, loc)
            }
        }
    };
}

ref_type!(
    /// A block of an operand in VMEM. `&Ref<T>` is an input, `&mut Ref<T>` an output.
    Ref
);
ref_type!(
    /// Scratch memory that persists across the sequential (`arbitrary`) grid steps of a core.
    Scratch
);
ref_type!(
    /// A scalar-prefetch table in SMEM, also readable from index maps.
    Prefetch
);
vector_access!(Ref);
vector_access!(Scratch);

impl<T: Element> Scratch<T> {
    /// Writes one element of an SMEM (or VMEM) scratch ref.
    #[track_caller]
    pub fn set(&mut self, index: impl IntoIndex, value: Scalar<T>) {
        self.store_at(index, value)
    }
}

/// A region of a ref: one side of a copy, or (one element of a semaphore ref) what it signals.
#[derive(Clone, Debug)]
pub struct Window {
    r: ValueId,
    index: Vec<Index>,
    /// `None` where resolving the index failed (the trace error is recorded).
    shape: Option<Vec<usize>>,
}

impl Builder {
    fn window(&mut self, r: ValueId, ix: &[Ix], loc: Loc) -> Window {
        match self.resolve_index(r, ix, loc) {
            Some((index, shape)) => Window { r, index, shape: Some(shape) },
            None => Window { r, index: Vec::new(), shape: None },
        }
    }

    fn dma(&mut self, copy: &AsyncCopy, start: bool, loc: Loc) {
        let (src, dst, sem) = (&copy.src, &copy.dst, &copy.sem);
        let (Some(src_shape), Some(dst_shape), Some(sem_shape)) = (&src.shape, &dst.shape, &sem.shape) else { return };
        let space = |b: &Builder, w: &Window| match b.ty(w.r) {
            Type::Ref(rt) => Some((rt.space, rt.dtype)),
            Type::Value(_) => None,
        };
        let (Some((src_space, src_dtype)), Some((dst_space, dst_dtype)), Some((sem_space, _))) = (space(self, src), space(self, dst), space(self, sem)) else {
            self.fail_silent(loc, "async_copy takes regions of refs");
            return;
        };
        let problem = if sem_space != MemorySpace::Semaphore {
            Some("the third argument of async_copy is one DMA semaphore: `sems.at(i)` of a `&mut Scratch<DmaSemaphore>` declared with `DmaSemaphores::new(n)`".to_string())
        } else if !sem_shape.is_empty() {
            Some(format!("a copy signals one DMA semaphore: index every axis of the semaphore ref (this selects shape {sem_shape:?})"))
        } else if [src_space, dst_space].iter().any(|&s| matches!(s, MemorySpace::Semaphore | MemorySpace::Smem)) {
            Some("copies move data between HBM (`BlockSpec::any()`) and VMEM refs".to_string())
        } else if src_dtype != dst_dtype || src_shape != dst_shape {
            Some(format!("async_copy from a {src_shape:?} {src_dtype} region into a {dst_shape:?} {dst_dtype} one: the two sides must match"))
        } else {
            None
        };
        if let Some(msg) = problem {
            self.fail_silent(loc, msg);
            return;
        }
        let c = DmaCopy { src: src.r, src_index: src.index.clone(), dst: dst.r, dst_index: dst.index.clone(), sem: sem.r, sem_index: sem.index.clone() };
        let kind = if start { OpKind::DmaStart(c) } else { OpKind::DmaWait(c) };
        self.push_op(Op { kind, results: Vec::new(), loc });
    }
}

/// A copy from `src` to `dst` that signals `sem` (Pallas' `pltpu.make_async_copy`): `start()`
/// it, do other work, then `wait()` before reading `dst`. Either side may be a ref left in HBM
/// (`BlockSpec::any()`) or VMEM; the interpreter's checked mode reports a wait without a start,
/// a read of `dst` before its wait, and a copy never waited for.
#[derive(Clone, Debug)]
pub struct AsyncCopy {
    src: Window,
    dst: Window,
    sem: Window,
}

/// Describes a copy; nothing moves until [`AsyncCopy::start`].
pub fn async_copy(src: Window, dst: Window, sem: Window) -> AsyncCopy {
    AsyncCopy { src, dst, sem }
}

impl AsyncCopy {
    /// Starts the copy.
    #[track_caller]
    pub fn start(&self) {
        let loc = Loc::caller();
        builder::with(|b| b.dma(self, true, loc));
    }

    /// Waits until the copy has landed in `dst`.
    #[track_caller]
    pub fn wait(&self) {
        let loc = Loc::caller();
        builder::with(|b| b.dma(self, false, loc));
    }
}
