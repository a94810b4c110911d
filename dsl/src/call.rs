//! `PallasCall`: a kernel plus its grid, block specs, scratch and options; tracing it
//! against concrete array shapes gives a [`TracedCall`] that the interpreter and the code
//! generators consume.

use std::fmt;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ir::{Func, Index, Literal, Loc, MemorySpace, Offset, RefType, Type, ValueId, ValueType};
use crate::kernel::{KernelDef, ParamKind};
use crate::trace::builder::{self, trace_func};
use crate::trace::refs::Prefetch;
use crate::trace::values::Scalar;
use crate::verify::verify;

/// Whether programs along a grid axis are independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// Independent: may run in any order, or at once on several cores.
    Parallel,
    /// Sequential, in order: scratch carries state from one step to the next (a reduction axis).
    Arbitrary,
}

impl fmt::Display for Semantics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Semantics::Parallel => "parallel",
            Semantics::Arbitrary => "arbitrary",
        })
    }
}

/// One block index an index map returns: traced, or a constant.
#[derive(Clone, Copy, Debug)]
pub enum BlockIndex {
    Traced(Scalar<i32>),
    Const(i64),
}

impl From<Scalar<i32>> for BlockIndex {
    fn from(s: Scalar<i32>) -> Self {
        BlockIndex::Traced(s)
    }
}
impl From<i32> for BlockIndex {
    fn from(c: i32) -> Self {
        BlockIndex::Const(c as i64)
    }
}
impl From<usize> for BlockIndex {
    fn from(c: usize) -> Self {
        BlockIndex::Const(c as i64)
    }
}

/// What an index map returns: an array or tuple of block indices, one per block dim.
pub trait BlockIndices {
    fn into_block_indices(self) -> Vec<BlockIndex>;
}

impl<I: Into<BlockIndex>, const M: usize> BlockIndices for [I; M] {
    fn into_block_indices(self) -> Vec<BlockIndex> {
        self.into_iter().map(Into::into).collect()
    }
}

macro_rules! tuple_indices {
    ($($n:ident),+) => {
        impl<$($n: Into<BlockIndex>),+> BlockIndices for ($($n,)+) {
            #[allow(non_snake_case)]
            fn into_block_indices(self) -> Vec<BlockIndex> {
                let ($($n,)+) = self;
                vec![$($n.into()),+]
            }
        }
    };
}
tuple_indices!(A);
tuple_indices!(A, B);
tuple_indices!(A, B, C);
tuple_indices!(A, B, C, D);
tuple_indices!(A, B, C, D, E);

/// A block shape: plain sizes, or `Option`s where `None` squeezes the dim away.
pub trait IntoBlockShape {
    fn into_block_shape(self) -> Vec<Option<usize>>;
}
impl<const N: usize> IntoBlockShape for [usize; N] {
    fn into_block_shape(self) -> Vec<Option<usize>> {
        self.into_iter().map(Some).collect()
    }
}
impl<const N: usize> IntoBlockShape for [Option<usize>; N] {
    fn into_block_shape(self) -> Vec<Option<usize>> {
        self.to_vec()
    }
}
impl IntoBlockShape for Vec<usize> {
    fn into_block_shape(self) -> Vec<Option<usize>> {
        self.into_iter().map(Some).collect()
    }
}
impl IntoBlockShape for Vec<Option<usize>> {
    fn into_block_shape(self) -> Vec<Option<usize>> {
        self
    }
}

type IndexMapFn = dyn Fn(&[Scalar<i32>], &[Prefetch<i32>]) -> std::result::Result<Vec<BlockIndex>, String> + Send + Sync;

/// Which block of an operand each program sees.
#[derive(Clone)]
pub struct BlockSpec {
    /// `None`: the whole array is one block.
    block_shape: Option<Vec<Option<usize>>>,
    index_map: Arc<IndexMapFn>,
    /// `Vmem` (blocks copied in and out by the pipeline) or `Any` (left in HBM).
    space: MemorySpace,
    loc: Loc,
}

impl fmt::Debug for BlockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockSpec").field("block_shape", &self.block_shape).field("loc", &self.loc).finish()
    }
}

fn grid_array<const N: usize>(g: &[Scalar<i32>]) -> std::result::Result<[Scalar<i32>; N], String> {
    <[Scalar<i32>; N]>::try_from(g).map_err(|_| format!("the index map takes {N} grid indices, but the grid has rank {}", g.len()))
}

impl BlockSpec {
    /// A block of `shape`, placed by `index_map` (grid indices to block indices).
    #[track_caller]
    pub fn new<const N: usize, R: BlockIndices>(shape: impl IntoBlockShape, index_map: impl Fn([Scalar<i32>; N]) -> R + Send + Sync + 'static) -> Self {
        BlockSpec {
            block_shape: Some(shape.into_block_shape()),
            index_map: Arc::new(move |g, _| Ok(index_map(grid_array(g)?).into_block_indices())),
            space: MemorySpace::Vmem,
            loc: Loc::caller(),
        }
    }

    /// Like [`BlockSpec::new`], with the scalar-prefetch tables passed to the index map.
    #[track_caller]
    pub fn with_prefetch<const N: usize, R: BlockIndices>(shape: impl IntoBlockShape, index_map: impl Fn([Scalar<i32>; N], &[Prefetch<i32>]) -> R + Send + Sync + 'static) -> Self {
        BlockSpec {
            block_shape: Some(shape.into_block_shape()),
            index_map: Arc::new(move |g, p| Ok(index_map(grid_array(g)?, p).into_block_indices())),
            space: MemorySpace::Vmem,
            loc: Loc::caller(),
        }
    }

    /// The whole array as one block, the same for every program.
    #[track_caller]
    pub fn whole() -> Self {
        BlockSpec { block_shape: None, index_map: Arc::new(|_, _| Ok(Vec::new())), space: MemorySpace::Vmem, loc: Loc::caller() }
    }

    /// The whole array left in HBM (Pallas' `memory_space=ANY`): the kernel moves the parts it
    /// needs into scratch with `async_copy`, and cannot load from it directly.
    #[track_caller]
    pub fn any() -> Self {
        BlockSpec { block_shape: None, index_map: Arc::new(|_, _| Ok(Vec::new())), space: MemorySpace::Any, loc: Loc::caller() }
    }
}

/// `n` DMA semaphores as scratch, for a `&mut Scratch<DmaSemaphore>` parameter.
pub struct DmaSemaphores;

impl DmaSemaphores {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize) -> ScratchSpec {
        ScratchSpec { shape: vec![n], space: MemorySpace::Semaphore }
    }
}

/// A scratch buffer the call allocates; its dtype comes from the kernel's signature.
#[derive(Clone, Debug, PartialEq)]
pub struct ScratchSpec {
    pub shape: Vec<usize>,
    pub space: MemorySpace,
}

/// Scratch in vector memory.
pub struct Vmem;
impl Vmem {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(shape: impl AsRef<[usize]>) -> ScratchSpec {
        ScratchSpec { shape: shape.as_ref().to_vec(), space: MemorySpace::Vmem }
    }
}

/// Scratch in scalar memory.
pub struct Smem;
impl Smem {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(shape: impl AsRef<[usize]>) -> ScratchSpec {
        ScratchSpec { shape: shape.as_ref().to_vec(), space: MemorySpace::Smem }
    }
}

/// A kernel with everything needed to run it over arrays: Pallas' `pallas_call`.
#[derive(Clone, Debug)]
pub struct PallasCall {
    kernel: KernelDef,
    name: Option<String>,
    grid: Vec<usize>,
    in_specs: Vec<BlockSpec>,
    out_specs: Vec<BlockSpec>,
    out_shapes: Vec<Vec<usize>>,
    scratch: Vec<ScratchSpec>,
    semantics: Option<Vec<Semantics>>,
    vmem_limit_bytes: Option<u64>,
    aliases: Vec<(usize, usize)>,
}

impl PallasCall {
    pub fn new(kernel: KernelDef) -> Self {
        PallasCall {
            kernel,
            name: None,
            grid: Vec::new(),
            in_specs: Vec::new(),
            out_specs: Vec::new(),
            out_shapes: Vec::new(),
            scratch: Vec::new(),
            semantics: None,
            vmem_limit_bytes: None,
            aliases: Vec::new(),
        }
    }

    pub fn kernel(&self) -> &KernelDef {
        &self.kernel
    }

    /// The call's name (defaults to the kernel's).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn grid(mut self, grid: impl AsRef<[usize]>) -> Self {
        self.grid = grid.as_ref().to_vec();
        self
    }

    /// One spec per input, in the order of the kernel's `&Ref` parameters.
    pub fn in_specs(mut self, specs: impl IntoIterator<Item = BlockSpec>) -> Self {
        self.in_specs = specs.into_iter().collect();
        self
    }

    /// One spec per output, in the order of the kernel's `&mut Ref` parameters.
    pub fn out_specs(mut self, specs: impl IntoIterator<Item = BlockSpec>) -> Self {
        self.out_specs = specs.into_iter().collect();
        self
    }

    /// The full shape of each output array (dtypes come from the kernel's signature).
    pub fn out_shapes<S: AsRef<[usize]>>(mut self, shapes: impl IntoIterator<Item = S>) -> Self {
        self.out_shapes = shapes.into_iter().map(|s| s.as_ref().to_vec()).collect();
        self
    }

    pub fn scratch(mut self, scratch: impl IntoIterator<Item = ScratchSpec>) -> Self {
        self.scratch = scratch.into_iter().collect();
        self
    }

    /// One per grid axis; without it every axis is `Arbitrary` (sequential), as in Pallas.
    pub fn dimension_semantics(mut self, s: impl IntoIterator<Item = Semantics>) -> Self {
        self.semantics = Some(s.into_iter().collect());
        self
    }

    pub fn vmem_limit_bytes(mut self, bytes: u64) -> Self {
        self.vmem_limit_bytes = Some(bytes);
        self
    }

    /// `(input, output)` pairs: the output starts as, and may reuse the buffer of, the input.
    /// Input indices count the scalar-prefetch operands first, as in Pallas.
    pub fn input_output_aliases(mut self, aliases: impl IntoIterator<Item = (usize, usize)>) -> Self {
        self.aliases = aliases.into_iter().collect();
        self
    }

    fn spec_error(&self, message: impl Into<String>) -> Error {
        Error::Spec { kernel: self.kernel.name().to_string(), message: message.into() }
    }

    /// Traces the kernel and its index maps for operands of the given types (scalar-prefetch
    /// arrays first, then inputs), checking that the call fits them.
    pub fn trace(&self, operands: &[ValueType]) -> Result<TracedCall> {
        let k = &self.kernel;
        let n_prefetch = k.params_of(ParamKind::Prefetch).count();
        let in_params: Vec<_> = k.params_of(ParamKind::Input).collect();
        let out_params: Vec<_> = k.params_of(ParamKind::Output).collect();
        let scratch_params: Vec<_> = k.params_of(ParamKind::Scratch).collect();
        let name = self.name.clone().unwrap_or_else(|| k.name().to_string());

        if self.grid.is_empty() {
            return Err(self.spec_error("no grid: call `.grid([...])` (use `[1]` for a single program)"));
        }
        if let Some(axis) = self.grid.iter().position(|&g| g == 0) {
            return Err(self.spec_error(format!("grid axis {axis} has extent 0; every axis needs at least one program")));
        }
        if let Some((axis, g)) = self.grid.iter().enumerate().find(|(_, &g)| g > i32::MAX as usize) {
            return Err(self.spec_error(format!("grid axis {axis} has {g} programs; grid indices are i32, so at most {}", i32::MAX)));
        }
        let out_types: Vec<ValueType> = out_params.iter().zip(&self.out_shapes).map(|(p, s)| ValueType::new(p.dtype, s.clone())).collect();
        for a in operands.iter().chain(&out_types) {
            if a.checked_size_bytes().is_none_or(|b| b > isize::MAX as usize) {
                return Err(Error::TooLarge { kernel: k.name().to_string(), message: format!("an array of {a} is larger than this machine can address") });
            }
        }
        let semantics = match &self.semantics {
            Some(s) if s.len() != self.grid.len() => return Err(self.spec_error(format!("{} dimension semantics for a grid of rank {}", s.len(), self.grid.len()))),
            Some(s) => s.clone(),
            None => vec![Semantics::Arbitrary; self.grid.len()],
        };
        if operands.len() != n_prefetch + in_params.len() {
            return Err(Error::Input {
                kernel: k.name().to_string(),
                message: format!("expected {} arrays ({} scalar prefetch, {} inputs), got {}", n_prefetch + in_params.len(), n_prefetch, in_params.len(), operands.len()),
            });
        }
        for (what, n_specs, n_params) in [
            ("in_specs", self.in_specs.len(), in_params.len()),
            ("out_specs", self.out_specs.len(), out_params.len()),
            ("out_shapes", self.out_shapes.len(), out_params.len()),
            ("scratch", self.scratch.len(), scratch_params.len()),
        ] {
            if n_specs != n_params {
                return Err(self.spec_error(format!("{n_specs} {what} given, but the kernel signature has {n_params}")));
            }
        }
        let (prefetch_arrays, input_arrays) = operands.split_at(n_prefetch);
        let sig_prefetch: Vec<_> = k.params_of(ParamKind::Prefetch).collect();
        let mut prefetch = Vec::new();
        for (p, a) in sig_prefetch.iter().zip(prefetch_arrays) {
            if a.dtype != p.dtype || a.dtype != DType::I32 {
                return Err(Error::Input {
                    kernel: k.name().to_string(),
                    message: format!("scalar prefetch `{}` must be an i32 array (signature: {}), got {}", p.name, p.dtype, a.dtype),
                });
            }
            prefetch.push(Operand { name: p.name.to_string(), array: a.clone() });
        }
        let prefetch_refs: Vec<RefType> = prefetch.iter().map(|p| RefType { dtype: DType::I32, shape: p.array.shape.clone(), space: MemorySpace::Smem }).collect();

        let mut inputs = Vec::new();
        for (i, ((p, spec), a)) in in_params.iter().zip(&self.in_specs).zip(input_arrays).enumerate() {
            if a.dtype != p.dtype {
                return Err(Error::Input { kernel: k.name().to_string(), message: format!("input {i} (`{}`) must be {}, got {}", p.name, p.dtype, a.dtype) });
            }
            inputs.push(self.block_operand(p.name, a.clone(), spec, &prefetch_refs)?);
        }
        let mut outputs = Vec::new();
        for ((p, spec), shape) in out_params.iter().zip(&self.out_specs).zip(&self.out_shapes) {
            outputs.push(self.block_operand(p.name, ValueType::new(p.dtype, shape.clone()), spec, &prefetch_refs)?);
        }
        let mut scratch = Vec::new();
        for (p, s) in scratch_params.iter().zip(&self.scratch) {
            if s.shape.contains(&0) {
                return Err(self.spec_error(format!("scratch `{}` has an empty shape {:?}", p.name, s.shape)));
            }
            if s.space == MemorySpace::Semaphore && p.dtype != DType::I32 {
                return Err(self.spec_error(format!("scratch `{}` is DMA semaphores (`DmaSemaphores::new`): declare it `&mut Scratch<DmaSemaphore>`", p.name)));
            }
            scratch.push(ScratchOperand { name: p.name.to_string(), ty: RefType { dtype: p.dtype, shape: s.shape.clone(), space: s.space } });
        }
        for &(i, o) in &self.aliases {
            let src = if i < n_prefetch { prefetch.get(i).map(|p| &p.array) } else { inputs.get(i - n_prefetch).map(|p| &p.array) };
            match (src, outputs.get(o)) {
                (Some(a), Some(out)) if *a == out.array => {}
                (Some(a), Some(out)) => return Err(self.spec_error(format!("alias ({i}, {o}): input is {a} but output is {}", out.array))),
                _ => return Err(self.spec_error(format!("alias ({i}, {o}) names an operand that does not exist"))),
            }
        }

        // The body sees refs in the kernel's declaration order; the IR keeps Pallas' order.
        let mut canonical: Vec<(Type, Loc)> = Vec::new();
        canonical.extend(prefetch_refs.iter().map(|r| (Type::Ref(r.clone()), k.loc())));
        for op in inputs.iter().chain(&outputs) {
            canonical.push((Type::Ref(RefType { dtype: op.array.dtype, shape: op.kernel_block_shape(), space: op.space }), k.loc()));
        }
        canonical.extend(scratch.iter().map(|s| (Type::Ref(s.ty.clone()), k.loc())));
        let order = [ParamKind::Prefetch, ParamKind::Input, ParamKind::Output, ParamKind::Scratch];
        let mut slot_of_param = Vec::new();
        for p in k.params() {
            let before: usize = order.iter().take_while(|&&o| o != p.kind).map(|&o| k.params_of(o).count()).sum();
            let within = slot_of_param.iter().zip(k.params()).filter(|(_, q)| q.kind == p.kind).count();
            slot_of_param.push(before + within);
        }
        let (body, ()) = trace_func(k.name(), &name, self.grid.len(), true, &canonical, |args| {
            let in_decl_order: Vec<ValueId> = slot_of_param.iter().map(|&s| args[s]).collect();
            k.run_body(&in_decl_order)
        })?;
        verify(&body)?;
        Ok(TracedCall {
            name,
            kernel: k.clone(),
            grid: self.grid.clone(),
            semantics,
            prefetch,
            inputs,
            outputs,
            scratch,
            body,
            vmem_limit_bytes: self.vmem_limit_bytes,
            aliases: self.aliases.clone(),
        })
    }

    fn block_operand(&self, name: &str, array: ValueType, spec: &BlockSpec, prefetch: &[RefType]) -> Result<BlockOperand> {
        let block_shape = spec.block_shape.clone().unwrap_or_else(|| array.shape.iter().map(|&d| Some(d)).collect());
        let at = |m: String| self.spec_error(format!("{}: block spec of `{name}`: {m}", spec.loc));
        if block_shape.len() != array.shape.len() {
            return Err(at(format!("block shape {block_shape:?} has rank {}, but the array has shape {:?}", block_shape.len(), array.shape)));
        }
        if block_shape.contains(&Some(0)) {
            return Err(at(format!("block shape {block_shape:?} has an empty dim")));
        }
        if block_shape.iter().all(Option::is_none) {
            return Err(at("every dim is squeezed; keep at least one".into()));
        }
        let mut args: Vec<(Type, Loc)> = vec![(Type::Value(ValueType::scalar(DType::I32)), spec.loc); self.grid.len()];
        args.extend(prefetch.iter().map(|r| (Type::Ref(r.clone()), spec.loc)));
        let grid_rank = self.grid.len();
        let whole = spec.block_shape.is_none();
        let (mut index_map, results) = trace_func(self.kernel.name(), &format!("index_map_{name}"), grid_rank, false, &args, |ids| {
            let grid: Vec<Scalar<i32>> = ids[..grid_rank].iter().map(|&i| Scalar::from_id(i)).collect();
            let pf: Vec<Prefetch<i32>> = ids[grid_rank..].iter().map(|&i| Prefetch::__bind(i)).collect();
            let out = (spec.index_map)(&grid, &pf);
            builder::with(|b| -> std::result::Result<Vec<ValueId>, String> {
                let out = out?;
                let out = if whole { vec![BlockIndex::Const(0); block_shape.len()] } else { out };
                if out.len() != block_shape.len() {
                    return Err(format!("the index map returns {} block indices for a block of rank {}", out.len(), block_shape.len()));
                }
                Ok(out
                    .into_iter()
                    .map(|bi| match bi {
                        BlockIndex::Traced(s) => s.id,
                        BlockIndex::Const(c) => b.constant(Literal::Int(c), DType::I32, spec.loc),
                    })
                    .collect())
            })
        })?;
        index_map.results = results.map_err(at)?;
        verify(&index_map)?;
        Ok(BlockOperand { name: name.to_string(), array, block_shape, index_map, space: spec.space, loc: spec.loc })
    }
}

/// A scalar-prefetch operand.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub name: String,
    pub array: ValueType,
}

/// An input or output: the array, how it is cut into blocks, and which block each program sees.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockOperand {
    pub name: String,
    pub array: ValueType,
    /// `None` dims are squeezed: one element along them, dropped from the kernel's view.
    pub block_shape: Vec<Option<usize>>,
    /// Grid indices (then prefetch refs) to block indices, one per array dim.
    pub index_map: Func,
    /// `Vmem` for a pipelined block, `Any` for an array left in HBM (its block is the whole).
    pub space: MemorySpace,
    /// Where its `BlockSpec` was written.
    pub loc: Loc,
}

impl BlockOperand {
    /// The block's extent along each array dim (1 for squeezed dims).
    pub fn block_dims(&self) -> Vec<usize> {
        self.block_shape.iter().map(|d| d.unwrap_or(1)).collect()
    }

    /// The shape the kernel sees: squeezed dims removed.
    pub fn kernel_block_shape(&self) -> Vec<usize> {
        self.block_shape.iter().flatten().copied().collect()
    }

    /// How many blocks cover the array along each dim (the last one may be partial).
    pub fn blocks_per_dim(&self) -> Vec<usize> {
        self.array.shape.iter().zip(self.block_dims()).map(|(&a, b)| a.div_ceil(b)).collect()
    }

    /// Whether the index map reads scalar-prefetch tables (its only loads): its blocks then
    /// depend on data and are known only when the call runs.
    pub fn index_map_reads_prefetch(&self) -> bool {
        let mut loads = false;
        self.index_map.walk(&mut |o| loads |= matches!(o.kind, crate::ir::OpKind::Load { .. }));
        loads
    }

    /// Why the block breaks the TPU's tiling of its array, if it does: the last two block
    /// dims must be multiples of (8, 128) or span the array (libtpu's E2002 otherwise; it
    /// accepts 8-row blocks of 16-bit types too, though they fill half a packed tile).
    pub fn tiling_violation(&self) -> Option<String> {
        let dims = self.block_dims();
        let n = dims.len();
        let tiles = [(n.checked_sub(2), MIN_SUBLANES, "rows"), (n.checked_sub(1), LANES, "lanes")];
        let broken: Vec<String> = tiles
            .into_iter()
            .filter_map(|(axis, tile, what)| {
                let axis = axis?;
                let fits = self.block_shape[axis].is_none() || dims[axis] % tile == 0 || dims[axis] == self.array.shape[axis];
                (!fits).then(|| format!("{} {what} along dim {axis}, neither a multiple of {tile} nor the array's {}", dims[axis], self.array.shape[axis]))
            })
            .collect();
        (!broken.is_empty()).then(|| format!("{}: block {:?} of `{}` ({}) has {}", self.loc, dims, self.name, self.array, broken.join(", and ")))
    }
}

pub use torchtpu_hw::{LANES, MIN_SUBLANES};

/// Sublanes of a TPU vector register for `dtype` (see [`torchtpu_hw::sublanes`]).
pub fn sublanes(dtype: DType) -> usize {
    torchtpu_hw::sublanes(dtype.size_bytes())
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScratchOperand {
    pub name: String,
    pub ty: RefType,
}

/// What a load or store with `index` addresses in a memref of `shape` (whose `squeezed` dims
/// the kernel does not see, always at 0): per dim, its start and extent.
pub fn memref_access(shape: &[usize], squeezed: &[bool], index: &[Index]) -> Vec<(Offset, usize)> {
    let mut items = index.iter();
    shape
        .iter()
        .zip(squeezed)
        .map(|(&extent, &squeezed)| match if squeezed { Index::Point(Offset::Static(0)) } else { items.next().copied().unwrap_or(Index::Full) } {
            Index::Full => (Offset::Static(0), extent),
            Index::Slice { start, len } => (start, len),
            Index::Point(o) => (o, 1),
        })
        .collect()
}

/// A ref argument of a kernel body as the TPU lays it out (see [`TracedCall::ref_layouts`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RefLayout {
    pub arg: ValueId,
    pub memref: RefType,
    /// Per memref dim: whether the kernel's view drops it (a `None` block dim; always index 0).
    pub squeezed: Vec<bool>,
}

/// A call traced for concrete operand types: all the interpreter and the code generators need.
#[derive(Clone, Debug)]
pub struct TracedCall {
    pub name: String,
    pub kernel: KernelDef,
    pub grid: Vec<usize>,
    pub semantics: Vec<Semantics>,
    pub prefetch: Vec<Operand>,
    pub inputs: Vec<BlockOperand>,
    pub outputs: Vec<BlockOperand>,
    pub scratch: Vec<ScratchOperand>,
    /// Arguments in Pallas order: prefetch refs, input blocks, output blocks, scratch.
    pub body: Func,
    pub vmem_limit_bytes: Option<u64>,
    pub aliases: Vec<(usize, usize)>,
}

impl TracedCall {
    pub fn num_programs(&self) -> usize {
        self.grid.iter().product()
    }

    /// Every way the call breaks the TPU's tiling rules (empty where it fits a TPU): blocks off
    /// the (8, 128) tiling, and dynamic offsets not provably a whole number of tiles.
    pub fn tiling_violations(&self) -> Vec<String> {
        let blocks = self.inputs.iter().chain(&self.outputs).filter_map(BlockOperand::tiling_violation);
        blocks.chain(crate::addressing::unaligned_offsets(self)).chain(self.non_tpu_dtype()).collect()
    }

    /// The first value or ref of a dtype a TPU cannot hold, if any.
    fn non_tpu_dtype(&self) -> Option<String> {
        let info = self.body.values.iter().find(|v| match &v.ty {
            crate::ir::Type::Value(t) => !t.dtype.on_tpu(),
            crate::ir::Type::Ref(r) => !r.dtype.on_tpu(),
        })?;
        Some(format!("{}: a {} has a dtype a TPU cannot load or compute (Mosaic has no f16 vectors on any chip); use bf16 or f32 (the CPU backends run f16)", info.loc, info.ty))
    }

    /// The memory each ref argument of the body addresses: its full block (squeezed dims as 1)
    /// for operands, its own shape otherwise, and which of its dims the kernel does not see.
    pub fn ref_layouts(&self) -> Vec<RefLayout> {
        let n_pf = self.prefetch.len();
        let operands: Vec<_> = self.inputs.iter().chain(&self.outputs).collect();
        let body = &self.body;
        let mut out = Vec::new();
        for (slot, &arg) in body.args.iter().enumerate() {
            let Some(kernel_view) = body.ref_type(arg) else { continue };
            let layout = match slot.checked_sub(n_pf).and_then(|i| operands.get(i)) {
                Some(op) => RefLayout {
                    arg,
                    memref: RefType { dtype: kernel_view.dtype, shape: op.block_dims(), space: op.space },
                    squeezed: op.block_shape.iter().map(Option::is_none).collect(),
                },
                None => RefLayout { arg, memref: kernel_view.clone(), squeezed: vec![false; kernel_view.shape.len()] },
            };
            out.push(layout);
        }
        out
    }

    /// The types of the call's operands, in order: scalar-prefetch arrays, then inputs.
    pub fn operand_types(&self) -> impl Iterator<Item = &ValueType> {
        self.prefetch.iter().map(|p| &p.array).chain(self.inputs.iter().map(|i| &i.array))
    }
}
