//! What both code generators share to build an elementwise op's composite (its definition in
//! `torchtpu_dsl::elementwise`): each emits the primitives, this adapter keeps the first error.

use torchtpu_dsl::elementwise::Compose;
use torchtpu_dsl::ir::{BinaryOp, CmpOp, Literal, Loc, UnaryOp, ValueType};

use crate::error::{Error, Result};

/// Elementwise ops on SSA names of values of type `t`, in one target dialect.
pub(crate) trait Primitives {
    fn unary_of(&mut self, op: UnaryOp, x: &str, t: &ValueType, l: Loc) -> Result<String>;
    fn binary_of(&mut self, op: BinaryOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String>;
    fn compare_of(&mut self, op: CmpOp, a: &str, b: &str, t: &ValueType, l: Loc) -> Result<String>;
    fn splat_of(&mut self, value: Literal, t: &ValueType, l: Loc) -> String;
    fn select_of(&mut self, cond: &str, a: &str, b: &str, t: &ValueType, l: Loc) -> String;
    /// Logical not of a bool of `t`'s shape.
    fn logical_not_of(&mut self, mask: &str, t: &ValueType, l: Loc) -> String;
    fn target_op_of(&mut self, name: &str, args: &[&str], t: &ValueType, l: Loc) -> String;
}

/// Runs a composite's builder on values of type `t`; the first error any part hits.
pub(crate) fn composite<P: Primitives>(p: &mut P, t: &ValueType, l: Loc, build: impl FnOnce(&mut dyn Compose) -> String) -> Result<String> {
    let mut c = Composer { p, t: t.clone(), l, error: None };
    let r = build(&mut c);
    c.error.map_or(Ok(r), Err)
}

struct Composer<'p, P> {
    p: &'p mut P,
    t: ValueType,
    l: Loc,
    error: Option<Error>,
}

impl<P> Composer<'_, P> {
    fn keep(&mut self, r: Result<String>) -> String {
        r.unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            String::new()
        })
    }
}

impl<P: Primitives> Compose for Composer<'_, P> {
    fn unary(&mut self, op: UnaryOp, x: &str) -> String {
        let r = self.p.unary_of(op, x, &self.t, self.l);
        self.keep(r)
    }

    fn binary(&mut self, op: BinaryOp, a: &str, b: &str) -> String {
        let r = self.p.binary_of(op, a, b, &self.t, self.l);
        self.keep(r)
    }

    fn constant(&mut self, value: Literal) -> String {
        self.p.splat_of(value, &self.t, self.l)
    }

    fn compare(&mut self, op: CmpOp, a: &str, b: &str) -> String {
        let r = self.p.compare_of(op, a, b, &self.t, self.l);
        self.keep(r)
    }

    fn select(&mut self, cond: &str, a: &str, b: &str) -> String {
        self.p.select_of(cond, a, b, &self.t, self.l)
    }

    fn logical_not(&mut self, mask: &str) -> String {
        self.p.logical_not_of(mask, &self.t, self.l)
    }

    fn target_op(&mut self, name: &str, args: &[&str]) -> String {
        self.p.target_op_of(name, args, &self.t, self.l)
    }
}
