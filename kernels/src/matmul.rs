//! Matmul: `C = A·B` or `A·Bᵀ`, f32 or bf16 inputs, f32 accumulation, any M, N, K (ragged
//! edges masked), and a batched form over a leading batch dim.

use ndarray::{ArrayD, Axis, Ix2};
use torchtpu_dsl::prelude::*;
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::Chip;

use crate::tuning::TableTarget;
use crate::Error;

#[tpu_kernel]
fn matmul_kernel<T: Float>(a: &Ref<T>, b: &Ref<T>, c: &mut Ref<T>, acc: &mut Scratch<f32>, k_len: usize, transpose_b: bool, k_axis: usize) {
    let kk = program_id(k_axis);
    if kk == 0 {
        acc.store(zeros());
    }
    let mut ab = a.load();
    let mut bb = b.load();
    let (bm, bk) = (ab.shape()[0], ab.shape()[1]);
    let b_shape = bb.shape();
    if k_len % bk != 0 {
        // The last K block overhangs: its padding must not reach the valid outputs.
        let k0 = kk * bk as i32;
        ab = select(iota::<i32>([bm, bk], 1) + k0 < k_len as i32, ab, 0.0);
        let k_dim = if transpose_b { 1 } else { 0 };
        bb = select(iota::<i32>(&b_shape, k_dim) + k0 < k_len as i32, bb, 0.0);
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
/// unless the caller chose one; clamped to the shape.
pub fn with_tuned_block(shape: MatmulShape, dtype: DType, opts: MatmulOptions, backend: Backend) -> MatmulOptions {
    tuned_for(shape, dtype, opts, crate::tuning::target_of(backend))
}

fn tuned_for(shape: MatmulShape, dtype: DType, opts: MatmulOptions, target: Option<TableTarget>) -> MatmulOptions {
    // A problem no kernel can run keeps its options: the call reports what is wrong.
    if opts.block.is_some() || shape.is_empty() || check_dtype(dtype).is_err() {
        return opts;
    }
    let problem = crate::tuning::MatmulTunable { shape, dtype, transpose_b: opts.transpose_b };
    let bucket = crate::tuning::matmul_bucket(shape, dtype, opts.transpose_b);
    let tuned = crate::tuning::choose(target, "matmul", &bucket, &problem);
    let get = |c: &Vec<(String, usize)>, name: &str| c.iter().find(|(n, _)| n == name).map(|&(_, v)| v).filter(|&v| v > 0);
    let block = tuned.and_then(|c| Some((block_for(shape.m, get(&c, "bm")?, sublanes(dtype)), block_for(shape.n, get(&c, "bn")?, LANES), block_for(shape.k, get(&c, "bk")?, LANES))));
    MatmulOptions { block, ..opts }
}

fn block_for(len: usize, preferred: usize, tile: usize) -> usize {
    preferred.min(len.div_ceil(tile).saturating_mul(tile))
}

fn check_dtype(dtype: DType) -> Result<(), Error> {
    crate::check_float_dtype("matmul", dtype)
}

/// The call for `shape`: operands A `[(batch,) M, K]` and B `[(batch,) K, N]` (or `[.., N, K]`).
pub fn call(shape: MatmulShape, dtype: DType, opts: MatmulOptions) -> Result<PallasCall, Error> {
    let MatmulShape { batch, m, n, k } = shape;
    if shape.is_empty() {
        return Err(Error::Shape(format!("a kernel call needs non-empty dims (the host API handles empty ones): {shape:?}")));
    }
    let (bm, bn, bk) = opts.block.unwrap_or((block_for(m, 512, sublanes(dtype)), block_for(n, 512, LANES), block_for(k, 512, LANES)));
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

/// The matmul for `shape`, lowered for `chip` with its tuned block (a `tpu_custom_call` module).
pub fn tpu_module(shape: MatmulShape, dtype: DType, opts: MatmulOptions, chip: Chip) -> Result<String, Error> {
    let opts = tuned_for(shape, dtype, opts, Some(TableTarget::Chip(chip)));
    let traced = call(shape, dtype, opts)?.trace(&operand_types(shape, dtype, opts.transpose_b))?;
    Ok(lower(&traced, Target::TpuStableHlo)?)
}

/// The matmul compiled for `shape` on a device backend with its tuned block: run on device buffers.
pub fn compiled(shape: MatmulShape, dtype: DType, opts: MatmulOptions, backend: Backend) -> Result<Compiled, Error> {
    let opts = with_tuned_block(shape, dtype, opts, backend);
    let traced = call(shape, dtype, opts)?.trace(&operand_types(shape, dtype, opts.transpose_b))?;
    Ok(Compiled::new(&traced, backend)?)
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
    let shape = shape_of(a, b, opts.transpose_b)?;
    check_dtype(a.dtype())?;
    if shape.is_empty() {
        return Ok(HostArray::from_f64(a.dtype(), &ArrayD::zeros(shape.output_shape())));
    }
    let opts = with_tuned_block(shape, a.dtype(), opts, backend);
    let mut out = torchtpu_exec::run(&call(shape, a.dtype(), opts)?, backend, &[a.clone(), b.clone()])?;
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
