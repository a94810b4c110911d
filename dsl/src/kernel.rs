//! A kernel as `#[tpu_kernel]` produces it: a signature and a function that traces the body.

use std::fmt;
use std::sync::Arc;

use crate::dtype::DType;
use crate::ir::{Loc, ValueId};

/// What role a kernel parameter plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// `&Prefetch<T>`: a scalar table in SMEM, passed first, readable from index maps.
    Prefetch,
    /// `&Ref<T>`: a block of an input array.
    Input,
    /// `&mut Ref<T>`: a block of an output array.
    Output,
    /// `&mut Scratch<T>`: scratch memory declared by the call.
    Scratch,
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamKind::Prefetch => "scalar prefetch",
            ParamKind::Input => "input",
            ParamKind::Output => "output",
            ParamKind::Scratch => "scratch",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamSig {
    pub name: &'static str,
    pub kind: ParamKind,
    pub dtype: DType,
}

type Body = dyn Fn(&[ValueId]) + Send + Sync;

/// A traceable kernel: `my_kernel::kernel(comptime args...)` returns one.
#[derive(Clone)]
pub struct KernelDef {
    name: &'static str,
    params: Vec<ParamSig>,
    loc: Loc,
    body: Arc<Body>,
}

impl fmt::Debug for KernelDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelDef").field("name", &self.name).field("params", &self.params).field("loc", &self.loc).finish()
    }
}

impl KernelDef {
    #[doc(hidden)]
    pub fn new(name: &'static str, params: Vec<ParamSig>, loc: Loc, body: impl Fn(&[ValueId]) + Send + Sync + 'static) -> Self {
        KernelDef { name, params, loc, body: Arc::new(body) }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Parameters in declaration order (compile-time parameters are not among them).
    pub fn params(&self) -> &[ParamSig] {
        &self.params
    }

    /// Where the kernel function is defined.
    pub fn loc(&self) -> Loc {
        self.loc
    }

    pub fn params_of(&self, kind: ParamKind) -> impl Iterator<Item = &ParamSig> {
        self.params.iter().filter(move |p| p.kind == kind)
    }

    pub(crate) fn run_body(&self, refs: &[ValueId]) {
        (self.body)(refs)
    }
}
