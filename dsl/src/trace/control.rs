//! What `#[tpu_kernel]` rewrites control flow and comparisons into.
//!
//! The macro cannot know types, so it emits the same code for every `if`, `for` and
//! comparison, and the types pick the behaviour: on plain Rust values everything stays
//! plain Rust (resolved or unrolled at trace time); on traced values it builds `If`/`For`
//! regions and compare ops. Variables assigned inside a traced region are "carried": the
//! macro hands each one to the scope, which threads it through the region's yields.

use crate::dtype::{DType, Element, Float};
use crate::ir::{CmpOp, Loc, Op, OpKind, Region, Type, ValueId, ValueType};
use crate::trace::builder::{self, Builder};
use crate::trace::values::{Elementwise, Scalar, Tile};

/// A value that can change inside a traced `if` or `for`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be assigned inside a traced `if` or `for`",
    label = "assigned in a branch or loop whose condition or bounds are traced",
    note = "only traced values (`Tile`, `Scalar`) and tuples, arrays and `Vec`s of them can change there; compute plain Rust values outside the traced region"
)]
pub trait Carry {
    fn collect_ids(&self, out: &mut Vec<ValueId>);
    fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self;
}

impl<T> Carry for Tile<T> {
    fn collect_ids(&self, out: &mut Vec<ValueId>) {
        out.push(self.id)
    }
    fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self {
        ids.next().map_or(*self, |&id| Tile::from_id(id))
    }
}
impl<T> Carry for Scalar<T> {
    fn collect_ids(&self, out: &mut Vec<ValueId>) {
        out.push(self.id)
    }
    fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self {
        ids.next().map_or(*self, |&id| Scalar::from_id(id))
    }
}
impl Carry for () {
    fn collect_ids(&self, _: &mut Vec<ValueId>) {}
    fn rebuild(&self, _: &mut std::slice::Iter<'_, ValueId>) -> Self {}
}
impl<C: Carry> Carry for Vec<C> {
    fn collect_ids(&self, out: &mut Vec<ValueId>) {
        self.iter().for_each(|c| c.collect_ids(out))
    }
    fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self {
        self.iter().map(|c| c.rebuild(ids)).collect()
    }
}
impl<C: Carry, const N: usize> Carry for [C; N] {
    fn collect_ids(&self, out: &mut Vec<ValueId>) {
        self.iter().for_each(|c| c.collect_ids(out))
    }
    fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self {
        std::array::from_fn(|i| self[i].rebuild(ids))
    }
}
macro_rules! tuple_carry {
    ($($n:ident $i:tt),+) => {
        impl<$($n: Carry),+> Carry for ($($n,)+) {
            fn collect_ids(&self, out: &mut Vec<ValueId>) { $(self.$i.collect_ids(out);)+ }
            fn rebuild(&self, ids: &mut std::slice::Iter<'_, ValueId>) -> Self { ($(self.$i.rebuild(ids),)+) }
        }
    };
}
tuple_carry!(A 0);
tuple_carry!(A 0, B 1);
tuple_carry!(A 0, B 1, C 2);
tuple_carry!(A 0, B 1, C 2, D 3);
tuple_carry!(A 0, B 1, C 2, D 3, E 4);

fn ids_of<C: Carry>(c: &C) -> Vec<ValueId> {
    let mut v = Vec::new();
    c.collect_ids(&mut v);
    v
}

fn rebuild_from<C: Carry>(template: C, ids: &[ValueId], pos: &mut usize) -> C {
    let n = ids_of(&template).len();
    let end = (*pos + n).min(ids.len());
    let out = template.rebuild(&mut ids[*pos..end].iter());
    *pos = end;
    out
}

/// The condition of an `if`: `bool` stays Rust, `Scalar<bool>` becomes an `If` region.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the condition of an `if` in a kernel",
    note = "use a `bool` (resolved at trace time) or a `Scalar<bool>` (a traced branch); a `Tile<bool>` is a mask: use `select`"
)]
pub trait IfCondition {
    type Scope;
    #[track_caller]
    fn scope(self) -> Self::Scope;
}

impl IfCondition for bool {
    type Scope = StaticIf;
    fn scope(self) -> StaticIf {
        StaticIf { cond: self }
    }
}

impl IfCondition for Scalar<bool> {
    type Scope = TracedIf;
    #[track_caller]
    fn scope(self) -> TracedIf {
        TracedIf {
            cond: self.id,
            loc: Loc::caller(),
            inits: Vec::new(),
            restore_pos: 0,
            then_yields: None,
            yields: Vec::new(),
            n_value: 0,
            then_region: None,
            results: Vec::new(),
            result_pos: 0,
        }
    }
}

#[doc(hidden)]
#[track_caller]
pub fn if_scope<C: IfCondition>(cond: C) -> C::Scope {
    cond.scope()
}

/// An `if` on a Rust `bool`: exactly one branch runs, at trace time.
#[doc(hidden)]
pub struct StaticIf {
    cond: bool,
}

#[doc(hidden)]
impl StaticIf {
    pub fn carry<V>(&mut self, _: &V) {}
    pub fn begin_then(&mut self) -> bool {
        self.cond
    }
    pub fn end_branch<V>(&mut self, _: &V) {}
    pub fn yield_<V>(&mut self, _: &V) {}
    pub fn restore<V>(&mut self, v: V) -> V {
        v
    }
    pub fn begin_else(&mut self) -> bool {
        !self.cond
    }
    pub fn finish<V>(&mut self, then_value: Option<V>, else_value: Option<V>) -> V {
        match (then_value, else_value) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => unreachable!("a static `if` runs exactly one branch"),
        }
    }
    pub fn result<V>(&mut self, v: V) -> V {
        v
    }
}

/// An `if` on a `Scalar<bool>`: both branches are traced into an `If` op.
#[doc(hidden)]
pub struct TracedIf {
    cond: ValueId,
    loc: Loc,
    inits: Vec<ValueId>,
    restore_pos: usize,
    then_yields: Option<Vec<ValueId>>,
    yields: Vec<ValueId>,
    n_value: usize,
    then_region: Option<Region>,
    results: Vec<ValueId>,
    result_pos: usize,
}

#[doc(hidden)]
impl TracedIf {
    pub fn carry<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.inits)
    }
    pub fn begin_then(&mut self) -> bool {
        builder::with(|b| b.begin_region(Vec::new()));
        true
    }
    pub fn end_branch<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.yields);
        self.n_value = self.yields.len();
    }
    pub fn yield_<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.yields)
    }
    pub fn restore<V: Carry>(&mut self, v: V) -> V {
        rebuild_from(v, &self.inits, &mut self.restore_pos)
    }
    pub fn begin_else(&mut self) -> bool {
        let yields = std::mem::take(&mut self.yields);
        self.then_region = builder::with(|b| close_region(b, yields.clone(), self.loc));
        self.then_yields = Some(yields);
        builder::with(|b| b.begin_region(Vec::new()));
        true
    }
    pub fn finish<V: Carry>(&mut self, then_value: Option<V>, else_value: Option<V>) -> V {
        let else_yields = std::mem::take(&mut self.yields);
        let then_yields = self.then_yields.take().unwrap_or_default();
        let template = then_value.or(else_value);
        let loc = self.loc;
        let (cond, then_region) = (self.cond, self.then_region.take());
        self.results = builder::with(|b| {
            let else_region = close_region(b, else_yields.clone(), loc);
            let (Some(then_region), Some(else_region)) = (then_region, else_region) else {
                b.fail_silent(loc, "internal: unbalanced regions in a traced `if`");
                return then_yields.clone();
            };
            if then_yields.len() != else_yields.len() {
                b.fail_silent(loc, "the branches of this traced `if` yield different numbers of values");
                return then_yields.clone();
            }
            for (t, e) in then_yields.iter().zip(&else_yields) {
                let (tt, et) = (b.vty(*t), b.vty(*e));
                if tt != et {
                    b.fail_silent(loc, format!("the branches of this traced `if` give a value different types: {tt} and {et}"));
                    return then_yields.clone();
                }
            }
            let results: Vec<ValueId> = then_yields
                .iter()
                .map(|&t| {
                    let ty = b.ty(t).clone();
                    b.new_value(ty, loc)
                })
                .collect();
            b.push_op(Op { kind: OpKind::If { cond, then_region, else_region }, results: results.clone(), loc });
            results
        });
        self.result_pos = self.n_value;
        match template {
            Some(t) => rebuild_from(t, &self.results[..self.n_value.min(self.results.len())], &mut 0),
            None => unreachable!("a traced `if` traces both branches"),
        }
    }
    pub fn result<V: Carry>(&mut self, v: V) -> V {
        rebuild_from(v, &self.results, &mut self.result_pos)
    }
}

fn close_region(b: &mut Builder, yields: Vec<ValueId>, loc: Loc) -> Option<Region> {
    b.push_op(Op { kind: OpKind::Yield { values: yields }, results: Vec::new(), loc });
    let r = b.end_region();
    if r.is_none() {
        b.fail_silent(loc, "internal: closing a region that is not open");
    }
    r
}

/// Closes a traced loop's body region (at `depth`) with `yields`, checking them against the
/// carried `inits`; returns the region and fresh values for the loop's results.
fn close_loop_body(b: &mut Builder, yields: Vec<ValueId>, inits: &[ValueId], depth: usize, loc: Loc, traced: &str) -> Option<(Region, Vec<ValueId>)> {
    // A `break` or `return` skipped the yields; regions opened inside were left open too.
    while b.region_depth() > depth {
        b.end_region();
    }
    if yields.len() != inits.len() {
        b.fail_silent(loc, format!("`break` and `continue` are not supported in a loop with {traced}"));
        b.end_region();
        return None;
    }
    for (y, i) in yields.iter().zip(inits) {
        let (yt, it) = (b.vty(*y), b.vty(*i));
        if yt != it {
            b.fail_silent(loc, format!("a value carried through this traced loop changes type from {it} to {yt}"));
        }
    }
    let body = close_region(b, yields, loc)?;
    let results = inits
        .iter()
        .map(|&i| {
            let t = b.ty(i).clone();
            b.new_value(t, loc)
        })
        .collect();
    Some((body, results))
}

/// The bounds of a `for` loop: Rust integers stay a Rust loop, a traced bound makes a `For` op.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the bounds of a `for` loop in a kernel",
    note = "use Rust integers (the loop is unrolled at trace time) or `Scalar<i32>`/`i32` bounds (a traced loop)"
)]
pub trait LoopBounds {
    type Scope;
    #[track_caller]
    fn scope(self) -> Self::Scope;
}

macro_rules! static_bounds {
    ($($t:ty),*) => {$(
        impl LoopBounds for ($t, $t) {
            type Scope = StaticFor<std::ops::Range<$t>>;
            fn scope(self) -> Self::Scope { StaticFor { iter: self.0..self.1 } }
        }
    )*};
}
static_bounds!(i32, i64, u32, u64, usize, isize);

macro_rules! traced_bounds {
    ($($a:ty, $b:ty;)*) => {$(
        impl LoopBounds for ($a, $b) {
            type Scope = TracedFor;
            #[track_caller]
            fn scope(self) -> TracedFor {
                let loc = Loc::caller();
                let lo = Scalar::<i32>::constant(self.0).id;
                let hi = Scalar::<i32>::constant(self.1).id;
                TracedFor { lo, hi, loc, inits: Vec::new(), args: Vec::new(), enter_pos: 0, yields: Vec::new(), results: Vec::new(), result_pos: 0, state: ForState::Start, depth: 0 }
            }
        }
    )*};
}
traced_bounds! {
    Scalar<i32>, Scalar<i32>;
    i32, Scalar<i32>;
    Scalar<i32>, i32;
}

#[doc(hidden)]
#[track_caller]
pub fn for_scope<A, B>(lo: A, hi: B) -> <(A, B) as LoopBounds>::Scope
where
    (A, B): LoopBounds,
{
    (lo, hi).scope()
}

/// A `for` over Rust integers: an ordinary loop at trace time.
#[doc(hidden)]
pub struct StaticFor<I> {
    iter: I,
}

#[doc(hidden)]
impl<I: Iterator> StaticFor<I> {
    pub fn carry<V>(&mut self, _: &V) {}
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<I::Item> {
        self.iter.next()
    }
    pub fn enter<V>(&mut self, v: V) -> V {
        v
    }
    pub fn yield_<V>(&mut self, _: &V) {}
    pub fn result<V>(&mut self, v: V) -> V {
        v
    }
}

#[derive(PartialEq)]
enum ForState {
    Start,
    Body,
    Done,
}

/// A `for` with traced bounds: the body is traced once into a `For` op.
#[doc(hidden)]
pub struct TracedFor {
    lo: ValueId,
    hi: ValueId,
    loc: Loc,
    inits: Vec<ValueId>,
    args: Vec<ValueId>,
    enter_pos: usize,
    yields: Vec<ValueId>,
    results: Vec<ValueId>,
    result_pos: usize,
    state: ForState,
    depth: usize,
}

#[doc(hidden)]
impl TracedFor {
    pub fn carry<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.inits)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Scalar<i32>> {
        match self.state {
            ForState::Start => {
                let loc = self.loc;
                let (iv, args) = builder::with(|b| {
                    let iv = b.new_value(Type::Value(ValueType::scalar(DType::I32)), loc);
                    let args: Vec<ValueId> = self
                        .inits
                        .iter()
                        .map(|&i| {
                            let t = b.ty(i).clone();
                            b.new_value(t, loc)
                        })
                        .collect();
                    let mut region_args = vec![iv];
                    region_args.extend(&args);
                    b.begin_region(region_args);
                    self.depth = b.region_depth();
                    (iv, args)
                });
                self.args = args;
                self.state = ForState::Body;
                Some(Scalar::from_id(iv))
            }
            ForState::Body => {
                self.close();
                None
            }
            ForState::Done => None,
        }
    }

    fn close(&mut self) {
        let loc = self.loc;
        let yields = std::mem::take(&mut self.yields);
        let (lo, hi, inits, depth) = (self.lo, self.hi, self.inits.clone(), self.depth);
        self.results = builder::with(|b| {
            let Some((body, results)) = close_loop_body(b, yields, &inits, depth, loc, "traced bounds") else { return inits };
            b.push_op(Op { kind: OpKind::For { lo, hi, inits, body }, results: results.clone(), loc });
            results
        });
        self.state = ForState::Done;
    }

    pub fn enter<V: Carry>(&mut self, v: V) -> V {
        rebuild_from(v, &self.args, &mut self.enter_pos)
    }
    pub fn yield_<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.yields)
    }
    pub fn result<V: Carry>(&mut self, v: V) -> V {
        if self.state == ForState::Body {
            // Reached only when the loop body broke out of the `while let` early.
            self.close();
        }
        rebuild_from(v, &self.results, &mut self.result_pos)
    }
}

/// The condition of a `while`: `bool` stays a Rust loop, `Scalar<bool>` becomes a `While` op.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the condition of a `while` in a kernel",
    note = "use a `bool` (a loop run at trace time) or a `Scalar<bool>` (a traced loop)"
)]
pub trait WhileCondition {
    type Scope;
    #[track_caller]
    fn scope() -> Self::Scope;
}

impl WhileCondition for bool {
    type Scope = StaticWhile;
    fn scope() -> StaticWhile {
        StaticWhile
    }
}

impl WhileCondition for Scalar<bool> {
    type Scope = TracedWhile;
    #[track_caller]
    fn scope() -> TracedWhile {
        TracedWhile { loc: Loc::caller(), inits: Vec::new(), args: Vec::new(), pos: 0, cond: None, yields: Vec::new(), results: Vec::new(), result_pos: 0, depth: 0, done: false }
    }
}

/// Picks the scope from the type `condition` returns; the closure is never called.
#[doc(hidden)]
#[track_caller]
pub fn while_scope<C: WhileCondition>(_condition: impl FnOnce() -> C) -> C::Scope {
    C::scope()
}

/// A `while` on a Rust `bool`: an ordinary loop at trace time.
#[doc(hidden)]
pub struct StaticWhile;

#[doc(hidden)]
impl StaticWhile {
    pub fn carry<V>(&mut self, _: &V) {}
    pub fn begin_condition(&mut self) {}
    pub fn enter_condition<V>(&mut self, v: V) -> V {
        v
    }
    pub fn test(&mut self, c: bool) -> bool {
        c
    }
    pub fn enter_body<V>(&mut self, v: V) -> V {
        v
    }
    pub fn yield_<V>(&mut self, _: &V) {}
    pub fn traced(&self) -> bool {
        false
    }
    pub fn result<V>(&mut self, v: V) -> V {
        v
    }
}

/// A `while` on a traced condition: the condition and the body are each traced once into
/// the regions of a `While` op.
#[doc(hidden)]
pub struct TracedWhile {
    loc: Loc,
    inits: Vec<ValueId>,
    /// The arguments of the region being traced.
    args: Vec<ValueId>,
    pos: usize,
    cond: Option<Region>,
    yields: Vec<ValueId>,
    results: Vec<ValueId>,
    result_pos: usize,
    depth: usize,
    done: bool,
}

#[doc(hidden)]
impl TracedWhile {
    pub fn carry<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.inits)
    }

    /// Opens a region whose arguments stand for the carried values.
    fn open(&mut self) {
        let (loc, inits) = (self.loc, self.inits.clone());
        self.args = builder::with(|b| {
            let args: Vec<ValueId> = inits
                .iter()
                .map(|&i| {
                    let t = b.ty(i).clone();
                    b.new_value(t, loc)
                })
                .collect();
            b.begin_region(args.clone());
            self.depth = b.region_depth();
            args
        });
        self.pos = 0;
    }

    /// Opens the condition's region, before the condition is evaluated in it.
    pub fn begin_condition(&mut self) {
        self.open();
    }

    pub fn enter_condition<V: Carry>(&mut self, v: V) -> V {
        rebuild_from(v, &self.args, &mut self.pos)
    }

    /// Closes the condition's region and opens the body's; true once.
    pub fn test(&mut self, c: Scalar<bool>) -> bool {
        let loc = self.loc;
        let cond = builder::with(|b| {
            let t = b.vty(c.id);
            if t != ValueType::scalar(DType::Bool) {
                b.fail_silent(loc, format!("a traced `while` condition is a bool scalar, not {t}"));
            }
            let region = close_region(b, vec![c.id], loc)?;
            let mut effects = false;
            let func_like = Region { args: Vec::new(), ops: region.ops.clone() };
            walk_region(&func_like, &mut |op| {
                effects |= matches!(op.kind, OpKind::Store { .. } | OpKind::DmaStart(_) | OpKind::DmaWait(_) | OpKind::PrngSeed { .. } | OpKind::PrngRandomBits)
            });
            if effects {
                b.fail_silent(loc, "a traced `while` condition only computes: move stores, copies and random draws into the loop body");
            }
            Some(region)
        });
        self.cond = cond;
        self.open();
        true
    }

    pub fn enter_body<V: Carry>(&mut self, v: V) -> V {
        rebuild_from(v, &self.args, &mut self.pos)
    }

    pub fn yield_<V: Carry>(&mut self, v: &V) {
        v.collect_ids(&mut self.yields)
    }

    /// Closes the body and emits the `While` op; the Rust loop around it runs once.
    pub fn traced(&mut self) -> bool {
        self.close();
        true
    }

    fn close(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let loc = self.loc;
        let (yields, inits, depth, cond) = (std::mem::take(&mut self.yields), self.inits.clone(), self.depth, self.cond.take());
        self.results = builder::with(|b| {
            let Some((body, results)) = close_loop_body(b, yields, &inits, depth, loc, "a traced condition") else { return inits };
            let Some(cond) = cond else { return inits };
            b.push_op(Op { kind: OpKind::While { inits, cond, body }, results: results.clone(), loc });
            results
        });
    }

    pub fn result<V: Carry>(&mut self, v: V) -> V {
        // Reached early only when the body broke out of the Rust loop.
        self.close();
        rebuild_from(v, &self.results, &mut self.result_pos)
    }
}

fn walk_region<'a>(r: &'a Region, f: &mut impl FnMut(&'a Op)) {
    for op in &r.ops {
        f(op);
        for sub in op.regions() {
            walk_region(sub, f);
        }
    }
}

/// `==` and `!=` as the macro emits them: `bool` on Rust values, traced on traced ones.
pub trait TraceEq<Rhs> {
    type Output;
    fn trace_eq(&self, rhs: &Rhs, loc: Loc) -> Self::Output;
    fn trace_ne(&self, rhs: &Rhs, loc: Loc) -> Self::Output;
}

/// `<`, `<=`, `>`, `>=` as the macro emits them.
pub trait TraceOrd<Rhs> {
    type Output;
    fn trace_cmp(&self, rhs: &Rhs, op: CmpOp, loc: Loc) -> Self::Output;
}

impl<A: PartialEq<B>, B> TraceEq<B> for A {
    type Output = bool;
    fn trace_eq(&self, rhs: &B, _: Loc) -> bool {
        self == rhs
    }
    fn trace_ne(&self, rhs: &B, _: Loc) -> bool {
        self != rhs
    }
}

impl<A: PartialOrd<B>, B> TraceOrd<B> for A {
    type Output = bool;
    fn trace_cmp(&self, rhs: &B, op: CmpOp, _: Loc) -> bool {
        match op {
            CmpOp::Lt => self < rhs,
            CmpOp::Le => self <= rhs,
            CmpOp::Gt => self > rhs,
            CmpOp::Ge => self >= rhs,
            CmpOp::Eq => self == rhs,
            CmpOp::Ne => self != rhs,
        }
    }
}

fn traced_compare<A: Elementwise<B> + Copy, B: Copy>(a: &A, b: &B, op: CmpOp, loc: Loc) -> ValueId {
    let (l, r) = (a.lhs_id(loc), A::rhs_id(*b, loc));
    builder::with(|bd| bd.compare(op, l, r, loc))
}

macro_rules! traced_cmp {
    ($([$($g:tt)*] $lhs:ty, $rhs:ty => $out:ident;)*) => {$(
        impl<$($g)*> TraceEq<$rhs> for $lhs {
            type Output = $out<bool>;
            fn trace_eq(&self, rhs: &$rhs, loc: Loc) -> $out<bool> { $out::from_id(traced_compare(self, rhs, CmpOp::Eq, loc)) }
            fn trace_ne(&self, rhs: &$rhs, loc: Loc) -> $out<bool> { $out::from_id(traced_compare(self, rhs, CmpOp::Ne, loc)) }
        }
        impl<$($g)*> TraceOrd<$rhs> for $lhs {
            type Output = $out<bool>;
            fn trace_cmp(&self, rhs: &$rhs, op: CmpOp, loc: Loc) -> $out<bool> { $out::from_id(traced_compare(self, rhs, op, loc)) }
        }
    )*};
}
traced_cmp! {
    [T: Element] Tile<T>, Tile<T> => Tile;
    [T: Element] Tile<T>, Scalar<T> => Tile;
    [T: Element] Scalar<T>, Tile<T> => Tile;
    [T: Element] Scalar<T>, Scalar<T> => Scalar;
    [T: Float] Tile<T>, f32 => Tile;
    [T: Float] Scalar<T>, f32 => Scalar;
    [T: Float] f32, Tile<T> => Tile;
    [T: Float] f32, Scalar<T> => Scalar;
    [] Tile<i32>, i32 => Tile;
    [] Scalar<i32>, i32 => Scalar;
    [] i32, Tile<i32> => Tile;
    [] i32, Scalar<i32> => Scalar;
}

#[doc(hidden)]
#[track_caller]
pub fn eq<A: TraceEq<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_eq(b, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn ne<A: TraceEq<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_ne(b, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn lt<A: TraceOrd<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_cmp(b, CmpOp::Lt, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn le<A: TraceOrd<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_cmp(b, CmpOp::Le, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn gt<A: TraceOrd<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_cmp(b, CmpOp::Gt, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn ge<A: TraceOrd<B>, B>(a: &A, b: &B) -> A::Output {
    a.trace_cmp(b, CmpOp::Ge, Loc::caller())
}

/// `&&` and `||` as the macro emits them: short-circuiting on `bool`, traced otherwise.
pub trait TraceLogic<Rhs> {
    type Output;
    fn trace_and(self, rhs: impl FnOnce() -> Rhs, loc: Loc) -> Self::Output;
    fn trace_or(self, rhs: impl FnOnce() -> Rhs, loc: Loc) -> Self::Output;
}

impl TraceLogic<bool> for bool {
    type Output = bool;
    fn trace_and(self, rhs: impl FnOnce() -> bool, _: Loc) -> bool {
        self && rhs()
    }
    fn trace_or(self, rhs: impl FnOnce() -> bool, _: Loc) -> bool {
        self || rhs()
    }
}

macro_rules! traced_logic {
    ($($lhs:ty, $rhs:ty => $out:ident;)*) => {$(
        impl TraceLogic<$rhs> for $lhs {
            type Output = $out<bool>;
            fn trace_and(self, rhs: impl FnOnce() -> $rhs, loc: Loc) -> $out<bool> {
                let (l, r) = (<$lhs as Elementwise<$rhs>>::lhs_id(self, loc), <$lhs as Elementwise<$rhs>>::rhs_id(rhs(), loc));
                $out::from_id(builder::with(|b| b.binary(crate::ir::BinaryOp::And, l, r, loc)))
            }
            fn trace_or(self, rhs: impl FnOnce() -> $rhs, loc: Loc) -> $out<bool> {
                let (l, r) = (<$lhs as Elementwise<$rhs>>::lhs_id(self, loc), <$lhs as Elementwise<$rhs>>::rhs_id(rhs(), loc));
                $out::from_id(builder::with(|b| b.binary(crate::ir::BinaryOp::Or, l, r, loc)))
            }
        }
    )*};
}
traced_logic! {
    Scalar<bool>, Scalar<bool> => Scalar;
    Scalar<bool>, bool => Scalar;
    Tile<bool>, Tile<bool> => Tile;
    Tile<bool>, Scalar<bool> => Tile;
    Tile<bool>, bool => Tile;
    Scalar<bool>, Tile<bool> => Tile;
}

// A Rust `bool` on the left is known at trace time, so it short-circuits the traced side.
macro_rules! static_lhs_logic {
    ($($out:ident),*) => {$(
        impl TraceLogic<$out<bool>> for bool {
            type Output = $out<bool>;
            fn trace_and(self, rhs: impl FnOnce() -> $out<bool>, loc: Loc) -> $out<bool> {
                if self { rhs() } else { constant_like(rhs, false, loc) }
            }
            fn trace_or(self, rhs: impl FnOnce() -> $out<bool>, loc: Loc) -> $out<bool> {
                if self { constant_like(rhs, true, loc) } else { rhs() }
            }
        }
    )*};
}
static_lhs_logic!(Scalar, Tile);

/// `value` shaped like what `rhs` would produce; `rhs` is still traced (and then unused)
/// because its shape is only known by tracing it.
fn constant_like<V: Carry + Copy>(rhs: impl FnOnce() -> V, value: bool, loc: Loc) -> V {
    let r = rhs();
    let ids = ids_of(&r);
    let c = builder::with(|b| {
        let shape = b.vty(ids[0]).shape;
        b.splat(crate::ir::Literal::Bool(value), DType::Bool, &shape, loc)
    });
    r.rebuild(&mut [c].iter())
}

#[doc(hidden)]
#[track_caller]
pub fn and<A: TraceLogic<B>, B>(a: A, b: impl FnOnce() -> B) -> A::Output {
    a.trace_and(b, Loc::caller())
}
#[doc(hidden)]
#[track_caller]
pub fn or<A: TraceLogic<B>, B>(a: A, b: impl FnOnce() -> B) -> A::Output {
    a.trace_or(b, Loc::caller())
}
