//! Matmul: `C = A·B` or `A·Bᵀ`, f32 or bf16 inputs, f32 accumulation, any M, N, K (ragged
//! edges masked), and a batched form over a leading batch dim.

use ndarray::{ArrayD, Axis, Ix2};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::Chip;

use serde::{Deserialize, Serialize};
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::SearchSpace;

use torchtpu_codegen::TpuModule;

use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

#[tpu_kernel]
fn matmul_kernel<T: Float>(a: &Ref<T>, b: &Ref<T>, c: &mut Ref<T>, acc: &mut Scratch<f32>, k_len: usize, transpose_b: bool, k_axis: usize) {
    let kk = program_id(k_axis);
    if kk == 0 {
        acc.store(zeros());
    }
    let mut ab = a.load();
    let mut bb = b.load();
    let bk = ab.shape()[1];
    if k_len % bk != 0 {
        // The last K block overhangs: its padding must not reach the valid outputs.
        let k0 = kk * bk as i32;
        ab = zero_outside(ab, 1, k0, k_len);
        bb = zero_outside(bb, if transpose_b { 1 } else { 0 }, k0, k_len);
    }
    let product = if transpose_b { dot_nt(ab, bb) } else { dot(ab, bb) };
    acc.store(acc.load() + product);
    if kk == num_programs(k_axis) - 1 {
        c.store(acc.load().cast());
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulOptions {
    /// Compute `A·Bᵀ` with B given as `[N, K]` (or `[batch, N, K]`).
    pub transpose_b: bool,
    /// (bm, bn, bk); default picks a safe size for the shapes.
    pub block: Option<(usize, usize, usize)>,
}

/// The problem: optional batch, M, N, K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatmulShape {
    pub batch: Option<usize>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl MatmulShape {
    /// Whether there is nothing for a kernel to do: the output is empty, or K is 0 (then
    /// the output is all zeros, as `torch.matmul` gives).
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.k == 0 || self.batch == Some(0)
    }

    /// The output's shape: `[(batch,) M, N]`.
    pub fn output_shape(&self) -> Vec<usize> {
        self.batch.into_iter().chain([self.m, self.n]).collect()
    }
}

/// `opts` with the block the tuned tables (or the cache) give for this shape on `backend`,
/// unless the caller chose one; fitted to the shape.
pub fn with_tuned_block(shape: MatmulShape, dtype: DType, opts: MatmulOptions, backend: Backend) -> MatmulOptions {
    // A problem no kernel can run keeps its options: the call reports what is wrong.
    let (problem, explicit) = problem_and_config(shape, dtype, opts);
    if explicit.is_some() || shape.is_empty() || MatmulOp.check(&problem).is_err() {
        return opts;
    }
    let c = op::config_for(&MatmulOp, &problem, tables::target_of(backend));
    MatmulOptions { block: Some((c.bm, c.bn, c.bk)), ..opts }
}

fn block_for(len: usize, preferred: usize, tile: usize) -> usize {
    preferred.min(len.div_ceil(tile).saturating_mul(tile))
}

/// Matmul as an op: a problem is the shape, dtype and layout; a config the three blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulOp;

/// One matmul: `[(batch,) M, K] · [(batch,) K, N]` (or `· [.., N, K]ᵀ`) in `dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatmulProblem {
    #[serde(flatten)]
    pub shape: MatmulShape,
    pub dtype: DType,
    pub transpose_b: bool,
}

/// The blocks of M, N and K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatmulConfig {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
}

impl Op for MatmulOp {
    type Problem = MatmulProblem;
    type Config = MatmulConfig;

    fn name(&self) -> &'static str {
        "matmul"
    }
    fn example(&self) -> MatmulProblem {
        MatmulProblem { shape: MatmulShape { batch: None, m: 1024, n: 1024, k: 1024 }, dtype: DType::F32, transpose_b: false }
    }
    fn check(&self, p: &MatmulProblem) -> Result<(), Error> {
        op::check_float_dtype("matmul", p.dtype)
    }
    fn bucket(&self, p: &MatmulProblem) -> String {
        let (s, b) = (p.shape, |n| tables::bucket(n, 128, 8192));
        format!("m{}n{}k{}/{}{}", b(s.m), b(s.n), b(s.k), p.dtype, if p.transpose_b { "/nt" } else { "" })
    }
    fn space(&self, p: &MatmulProblem) -> SearchSpace {
        let s = p.shape;
        SearchSpace::new().param("bm", block_candidates(s.m, 1024)).param("bn", block_candidates(s.n, 1024)).param("bk", block_candidates(s.k, 8192))
    }
    fn default_config(&self, p: &MatmulProblem) -> MatmulConfig {
        self.fit(p, MatmulConfig { bm: 512, bn: 512, bk: 512 })
    }
    fn fit(&self, p: &MatmulProblem, c: MatmulConfig) -> MatmulConfig {
        let s = p.shape;
        if c.bm == 0 || c.bn == 0 || c.bk == 0 {
            return self.default_config(p);
        }
        MatmulConfig { bm: block_for(s.m, c.bm, sublanes(p.dtype)), bn: block_for(s.n, c.bn, LANES), bk: block_for(s.k, c.bk, LANES) }
    }
    fn call(&self, p: &MatmulProblem, c: &MatmulConfig) -> Result<PallasCall, Error> {
        call(p.shape, p.dtype, MatmulOptions { transpose_b: p.transpose_b, block: Some((c.bm, c.bn, c.bk)) })
    }
    fn operand_types(&self, p: &MatmulProblem) -> Vec<ValueType> {
        operand_types(p.shape, p.dtype, p.transpose_b)
    }
    fn output_types(&self, p: &MatmulProblem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, p.shape.output_shape())]
    }
    /// A dim of 0: the output is empty, or (K = 0) all zeros, as `torch.matmul` gives.
    fn is_empty(&self, p: &MatmulProblem) -> bool {
        p.shape.is_empty()
    }
    fn reference(&self, p: &MatmulProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        match inputs {
            [a, b] => vec![reference(&a.to_f64(), &b.to_f64(), p.transpose_b)],
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<MatmulProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        let sizes: &[usize] = if target == TableTarget::Cpu { &[512, 1024, 2048] } else { &[512, 1024, 2048, 4096] };
        dtypes.iter().flat_map(|&dtype| sizes.iter().map(move |&n| MatmulProblem { shape: MatmulShape { batch: None, m: n, n, k: n }, dtype, transpose_b: false })).collect()
    }
}

/// The call for `shape`: operands A `[(batch,) M, K]` and B `[(batch,) K, N]` (or `[.., N, K]`).
pub fn call(shape: MatmulShape, dtype: DType, opts: MatmulOptions) -> Result<PallasCall, Error> {
    let MatmulShape { batch, m, n, k } = shape;
    if shape.is_empty() {
        return Err(Error::Shape(format!("a kernel call needs non-empty dims (the host API handles empty ones): {shape:?}")));
    }
    let problem = MatmulProblem { shape, dtype, transpose_b: opts.transpose_b };
    let (bm, bn, bk) = opts.block.unwrap_or_else(|| {
        let c = MatmulOp.default_config(&problem);
        (c.bm, c.bn, c.bk)
    });
    if bm == 0 || bn == 0 || bk == 0 {
        return Err(Error::Shape(format!("matmul blocks (bm, bn, bk) must be positive; got {:?}", (bm, bn, bk))));
    }
    let t = opts.transpose_b;
    let grid_mnk = [m.div_ceil(bm), n.div_ceil(bn), k.div_ceil(bk)];
    let kernel = |k_axis| match dtype {
        DType::F32 => Ok(matmul_kernel::kernel::<f32>(k, t, k_axis)),
        DType::BF16 => Ok(matmul_kernel::kernel::<bf16>(k, t, k_axis)),
        other => Err(Error::Dtype(format!("matmul takes f32 or bf16, not {other}"))),
    };
    let b_block = if t { [bn, bk] } else { [bk, bn] };
    let call = match batch {
        None => PallasCall::new(kernel(2)?)
            .grid(grid_mnk)
            .in_specs([
                BlockSpec::new([bm, bk], |[i, _, kk]| (i, kk)),
                if t { BlockSpec::new(b_block, |[_, j, kk]| (j, kk)) } else { BlockSpec::new(b_block, |[_, j, kk]| (kk, j)) },
            ])
            .out_specs([BlockSpec::new([bm, bn], |[i, j, _]| (i, j))])
            .out_shapes([vec![m, n]])
            .dimension_semantics([Parallel, Parallel, Arbitrary]),
        Some(bt) => {
            let bb = [None, Some(b_block[0]), Some(b_block[1])];
            PallasCall::new(kernel(3)?)
                .grid([bt, grid_mnk[0], grid_mnk[1], grid_mnk[2]])
                .in_specs([
                    BlockSpec::new([None, Some(bm), Some(bk)], |[x, i, _, kk]| (x, i, kk)),
                    if t { BlockSpec::new(bb, |[x, _, j, kk]| (x, j, kk)) } else { BlockSpec::new(bb, |[x, _, j, kk]| (x, kk, j)) },
                ])
                .out_specs([BlockSpec::new([None, Some(bm), Some(bn)], |[x, i, j, _]| (x, i, j))])
                .out_shapes([vec![bt, m, n]])
                .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary])
        }
    };
    Ok(call.name("matmul").scratch([Vmem::new([bm, bn])]))
}

/// The operands' types: A `[(batch,) M, K]` and B `[(batch,) K, N]` (or `[.., N, K]`).
pub fn operand_types(shape: MatmulShape, dtype: DType, transpose_b: bool) -> Vec<ValueType> {
    let b = if transpose_b { vec![shape.n, shape.k] } else { vec![shape.k, shape.n] };
    match shape.batch {
        None => vec![ValueType::new(dtype, [shape.m, shape.k]), ValueType::new(dtype, b)],
        Some(x) => vec![ValueType::new(dtype, [x, shape.m, shape.k]), ValueType::new(dtype, [vec![x], b].concat())],
    }
}

/// The problem of `shape` in `dtype` with `opts`' layout, and the config `opts` names, if any.
fn problem_and_config(shape: MatmulShape, dtype: DType, opts: MatmulOptions) -> (MatmulProblem, Option<MatmulConfig>) {
    (MatmulProblem { shape, dtype, transpose_b: opts.transpose_b }, opts.block.map(|(bm, bn, bk)| MatmulConfig { bm, bn, bk }))
}

/// The matmul for `shape`, lowered for `chip` with its tuned block (a `tpu_custom_call` module,
/// as text and as a portable artifact).
pub fn tpu_module(shape: MatmulShape, dtype: DType, opts: MatmulOptions, chip: Chip) -> Result<TpuModule, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts);
    op::tpu_module(&MatmulOp, &problem, explicit.as_ref(), chip)
}

/// The matmul compiled for `shape` on a device backend with its tuned block: run on device buffers.
pub fn compiled(shape: MatmulShape, dtype: DType, opts: MatmulOptions, backend: Backend) -> Result<Compiled, Error> {
    let (problem, explicit) = problem_and_config(shape, dtype, opts);
    op::compiled(&MatmulOp, &problem, explicit.as_ref(), backend)
}

/// The shape of `a · b` (or `a · bᵀ`), checked.
pub fn shape_of(a: &HostArray, b: &HostArray, transpose_b: bool) -> Result<MatmulShape, Error> {
    let (sa, sb) = (a.shape(), b.shape());
    if a.dtype() != b.dtype() {
        return Err(Error::Dtype(format!("matmul operands differ in dtype: {} and {}", a.dtype(), b.dtype())));
    }
    let (batch, ra, rb) = match (sa.len(), sb.len()) {
        (2, 2) => (None, sa, sb),
        (3, 3) if sa[0] == sb[0] => (Some(sa[0]), &sa[1..], &sb[1..]),
        _ => return Err(Error::Shape(format!("matmul takes two 2-D arrays, or two 3-D arrays with one batch size; got {sa:?} and {sb:?}"))),
    };
    let (kb, n) = if transpose_b { (rb[1], rb[0]) } else { (rb[0], rb[1]) };
    if ra[1] != kb {
        return Err(Error::Shape(format!("contracting dims differ: a {sa:?} has K = {}, b {sb:?}{} has K = {kb}", ra[1], if transpose_b { " (transposed)" } else { "" })));
    }
    Ok(MatmulShape { batch, m: ra[0], n, k: ra[1] })
}

/// `a · b` (or `a · bᵀ`) on `backend`; empty problems give zeros without running a kernel.
pub fn matmul(a: &HostArray, b: &HostArray, opts: MatmulOptions, backend: Backend) -> Result<HostArray, Error> {
    let (problem, explicit) = problem_and_config(shape_of(a, b, opts.transpose_b)?, a.dtype(), opts);
    let mut out = op::run(&MatmulOp, &problem, explicit.as_ref(), &[a.clone(), b.clone()], backend)?;
    out.pop().ok_or_else(|| Error::Shape("the kernel returned no output".into()))
}

/// `a · b` (or `a · bᵀ`) in f64, batched over a leading dim when 3-D: the tests' reference.
pub fn reference(a: &ArrayD<f64>, b: &ArrayD<f64>, transpose_b: bool) -> ArrayD<f64> {
    fn two(x: ndarray::ArrayViewD<'_, f64>) -> ndarray::ArrayView2<'_, f64> {
        x.into_dimensionality::<Ix2>().expect("2-D operands")
    }
    let mul = |x: ndarray::ArrayViewD<f64>, y: ndarray::ArrayViewD<f64>| {
        let y = two(y);
        let y = if transpose_b { y.reversed_axes() } else { y };
        two(x).dot(&y)
    };
    if a.ndim() == 2 {
        return mul(a.view(), b.view()).into_dyn();
    }
    if a.shape()[0] == 0 {
        let n = if transpose_b { b.shape()[1] } else { b.shape()[2] };
        return ArrayD::zeros(vec![0, a.shape()[1], n]);
    }
    let parts: Vec<_> = a.axis_iter(Axis(0)).zip(b.axis_iter(Axis(0))).map(|(x, y)| mul(x, y).insert_axis(Axis(0))).collect();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).expect("same shapes").into_dyn()
}
