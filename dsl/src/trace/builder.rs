//! The tracing builder: a thread-local stack of functions under construction.
//!
//! Traced values are plain `Copy` handles; every operation on them appends an op here.
//! Operator overloads cannot return `Result`, so the first error is recorded with its
//! source location, later ops produce placeholder values, and `finish` reports the error.

use std::cell::RefCell;

use crate::dtype::DType;
use crate::error::Error;
use crate::ir::{Func, Loc, Op, OpKind, Region, Type, ValueId, ValueInfo, ValueType};

pub(crate) struct Builder {
    kernel: String,
    func_name: String,
    values: Vec<ValueInfo>,
    regions: Vec<Region>,
    error: Option<Error>,
    grid_rank: usize,
    /// Ops that need a kernel context (program_id, loads...) are rejected in index maps.
    in_kernel: bool,
    /// Whether a `prng_seed` has been traced: random bits before one are an error.
    pub(crate) seeded: bool,
}

thread_local! {
    static BUILDERS: RefCell<Vec<Builder>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the innermost active builder.
///
/// # Panics
/// When no kernel or index map is being traced on this thread: traced values only exist
/// inside a trace, so reaching here without one is a misuse of the API, not bad input.
pub(crate) fn with<R>(f: impl FnOnce(&mut Builder) -> R) -> R {
    BUILDERS.with(|b| {
        let mut stack = b.borrow_mut();
        let builder = stack.last_mut().expect("torchtpu: a traced value was used outside of a kernel or index-map trace");
        f(builder)
    })
}

/// Traces `body` into a function. `args` become the function's arguments.
pub(crate) fn trace_func<R>(
    kernel: &str,
    func_name: &str,
    grid_rank: usize,
    in_kernel: bool,
    args: &[(Type, Loc)],
    body: impl FnOnce(&[ValueId]) -> R,
) -> Result<(Func, R), Error> {
    let mut builder = Builder {
        kernel: kernel.to_string(),
        func_name: func_name.to_string(),
        values: Vec::new(),
        regions: vec![Region::default()],
        error: None,
        grid_rank,
        in_kernel,
        seeded: false,
    };
    let arg_ids: Vec<ValueId> = args.iter().map(|(t, l)| builder.new_value(t.clone(), *l)).collect();
    builder.regions[0].args = arg_ids.clone();
    BUILDERS.with(|b| b.borrow_mut().push(builder));
    // Pops the builder if the body panics, so a caught panic leaves no stale trace behind.
    struct PopOnUnwind(bool);
    impl Drop for PopOnUnwind {
        fn drop(&mut self) {
            if self.0 {
                BUILDERS.with(|b| b.borrow_mut().pop());
            }
        }
    }
    let mut guard = PopOnUnwind(true);
    let out = body(&arg_ids);
    guard.0 = false;
    let builder = BUILDERS.with(|b| b.borrow_mut().pop()).expect("builder pushed above");
    if let Some(err) = builder.error {
        return Err(err);
    }
    let mut regions = builder.regions;
    if regions.len() != 1 {
        return Err(Error::Trace {
            kernel: builder.kernel,
            loc: Loc::caller(),
            message: "a traced `if` or `for` region was left open (a `break` or `return` inside a traced loop or branch?)".into(),
        });
    }
    let body_region = regions.pop().expect("checked above");
    let func = Func { name: builder.func_name, values: builder.values, args: arg_ids, body: body_region, results: Vec::new() };
    Ok((func, out))
}

impl Builder {
    pub(crate) fn new_value(&mut self, ty: Type, loc: Loc) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(ValueInfo { ty, loc });
        id
    }

    pub(crate) fn has_error(&self) -> bool {
        self.error.is_some()
    }

    /// Records the first error; returns a placeholder value of type `ty` so tracing can go on.
    pub(crate) fn fail(&mut self, loc: Loc, message: impl Into<String>, ty: ValueType) -> ValueId {
        if self.error.is_none() {
            self.error = Some(Error::Trace { kernel: self.kernel.clone(), loc, message: message.into() });
        }
        self.new_value(Type::Value(ty), loc)
    }

    pub(crate) fn fail_silent(&mut self, loc: Loc, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(Error::Trace { kernel: self.kernel.clone(), loc, message: message.into() });
        }
    }

    pub(crate) fn ty(&self, v: ValueId) -> &Type {
        &self.values[v.index()].ty
    }

    /// The value type of `v`. Refs never reach value positions: the Rust types keep them apart.
    pub(crate) fn vty(&self, v: ValueId) -> ValueType {
        match self.ty(v) {
            Type::Value(t) => t.clone(),
            Type::Ref(r) => ValueType::new(r.dtype, r.shape.clone()),
        }
    }

    pub(crate) fn grid_rank(&self) -> usize {
        self.grid_rank
    }

    pub(crate) fn in_kernel(&self) -> bool {
        self.in_kernel
    }

    /// Appends an op with one result of type `ty`.
    pub(crate) fn push(&mut self, kind: OpKind, ty: ValueType, loc: Loc) -> ValueId {
        let id = self.new_value(Type::Value(ty), loc);
        self.push_op(Op { kind, results: vec![id], loc });
        id
    }

    pub(crate) fn push_op(&mut self, op: Op) {
        self.regions.last_mut().expect("the function region is never popped").ops.push(op);
    }

    pub(crate) fn constant(&mut self, lit: crate::ir::Literal, dtype: DType, loc: Loc) -> ValueId {
        self.push(OpKind::Constant(lit), ValueType::scalar(dtype), loc)
    }

    pub(crate) fn begin_region(&mut self, args: Vec<ValueId>) {
        self.regions.push(Region { args, ops: Vec::new() });
    }

    /// Closes the innermost region; `None` if only the function's own region is open.
    pub(crate) fn end_region(&mut self) -> Option<Region> {
        if self.regions.len() <= 1 {
            return None;
        }
        self.regions.pop()
    }

    pub(crate) fn region_depth(&self) -> usize {
        self.regions.len()
    }
}
