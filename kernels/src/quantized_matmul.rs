//! Quantized matmul for serving: `x · dequant(w)ᵀ` with int8 weights `w [n, k]` (the layout of
//! an `nn.Linear` weight) and f32 scales, per output channel or per block of `block` inputs
//! along k:
//!
//! - weight-only (`x` f32 or bf16): the weights widened to `x`'s dtype in the kernel, never in
//!   HBM; the dots accumulate in f32.
//! - w8a8 (`x` int8 with a scale per row, a token's): int8 × int8 dots accumulating in int32,
//!   exactly; the scales applied to the int32 sums (per channel: once, in the epilogue; per
//!   block: to each block's exact int32 partial, summed in f32).
//!
//! The scales travel as `[k blocks, 1, n]` (k blocks = 1 per channel) so that a kernel's k
//! step reads its blocks' scale rows as whole tiles; the host APIs take PyTorch's `[n]` or
//! `[n, k blocks]` and lay them out.

use ndarray::{Array2, ArrayD, Ix2, Ix3};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::blocks::whole_tiles;
use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

/// What is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// int8 weights, f32 or bf16 activations.
    WeightOnly,
    /// int8 weights and activations, each activation row with its own scale.
    W8a8,
}

/// One quantized matmul: `x [m, k] · w [n, k]ᵀ → [m, n]` in `dtype` (the activations' dtype
/// for weight-only; the output's for w8a8). `block` is the number of inputs along k that
/// share a weight scale: `None` for one scale per output channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedProblem {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub dtype: DType,
    pub quantization: Quantization,
    #[serde(default)]
    pub block: Option<usize>,
}

/// The row, output-column and contraction blocks (`bk` a multiple of the scale block), and
/// for w8a8 whether the dots run on int8 (`int8_dots` 1) or on the int8 values widened to bf16
/// (0: chips without int8 matmuls; exact too, as every partial sum of a k block of at most
/// 1024 stays below 2^24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedConfig {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    #[serde(default = "int8_dots_default")]
    pub int8_dots: usize,
}

fn int8_dots_default() -> usize {
    1
}

/// The longest k block whose bf16 partial sums of int8 products are exact in f32: 2^24 / 2^14.
const EXACT_WIDENED_K: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedMatmulOp;

/// What the kernels know at trace time: k, the scale block (`None`: per channel), and whether
/// w8a8's dots run on int8.
#[derive(Clone, Copy, Debug, PartialEq)]
struct QuantizedKernel {
    k_len: usize,
    block: Option<usize>,
    int8_dots: bool,
}

/// Weight-only: `acc += x · widen(w)ᵀ`, each scale block's product scaled by its scale row.
#[tpu_kernel]
fn weight_only_kernel<T: Float>(x: &Ref<T>, w: &Ref<i8>, w_scale: &Ref<f32>, out: &mut Ref<T>, acc: &mut Scratch<f32>, s: QuantizedKernel) {
    let kk = program_id(2);
    if kk == 0 {
        acc.store(zeros());
    }
    let mut xb = x.load();
    let (bm, bk) = (xb.shape()[0], xb.shape()[1]);
    let k0 = kk * bk as i32;
    if s.k_len % bk != 0 {
        // int8 padding is finite: zeroing x's side keeps it out of the sums.
        xb = zero_outside(xb, 1, k0, s.k_len);
    }
    let wb = w.load().cast::<T>();
    let bn = wb.shape()[0];
    match s.block {
        None => acc.store(acc.load() + dot_nt(xb, wb)),
        Some(block) => {
            for sub in 0..bk / block {
                // A block wholly past k has no scale to read (its row may be anything).
                if k0 + ((sub * block) as i32) < s.k_len as i32 {
                    let part = dot_nt(xb.slice([0, sub * block], [bm, block]), wb.slice([0, sub * block], [bn, block]));
                    acc.store(acc.load() + part * w_scale.load_at((sub, .., ..)));
                }
            }
        }
    }
    if kk == num_programs(2) - 1 {
        let y = acc.load();
        match s.block {
            None => out.store((y * w_scale.load_at((0, .., ..))).cast()),
            Some(_) => out.store(y.cast()),
        }
    }
}

/// w8a8: exact int32 dots; per channel summed in int32 and scaled once, per block each
/// block's int32 partial scaled and summed in f32; the row scales last.
#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn w8a8_kernel<T: Float>(x: &Ref<i8>, x_scale: &Ref<f32>, w: &Ref<i8>, w_scale: &Ref<f32>, out: &mut Ref<T>, acc: &mut Scratch<f32>, sums: &mut Scratch<i32>, s: QuantizedKernel) {
    let kk = program_id(2);
    if kk == 0 {
        acc.store(zeros());
        sums.store(Tile::full(sums.shape(), 0));
    }
    let mut xb = x.load();
    let (bm, bk) = (xb.shape()[0], xb.shape()[1]);
    let k0 = kk * bk as i32;
    if s.k_len % bk != 0 {
        let cols = iota::<i32>([bm, bk], 1) + k0;
        xb = select(cols < s.k_len as i32, xb, Tile::full([bm, bk], 0));
    }
    let wb = w.load();
    let bn = wb.shape()[0];
    // int8 · int8 in int32 on the MXU, or the same integers as bf16 (exact) in f32.
    let int_dot = |a: Tile<i8>, b: Tile<i8>| if s.int8_dots { dot_nt(a, b) } else { dot_nt(a.cast::<bf16>(), b.cast::<bf16>()).cast::<i32>() };
    match s.block {
        None => sums.store(sums.load() + int_dot(xb, wb)),
        Some(block) => {
            for sub in 0..bk / block {
                if k0 + ((sub * block) as i32) < s.k_len as i32 {
                    let part = int_dot(xb.slice([0, sub * block], [bm, block]), wb.slice([0, sub * block], [bn, block]));
                    acc.store(acc.load() + part.cast::<f32>() * w_scale.load_at((sub, .., ..)));
                }
            }
        }
    }
    if kk == num_programs(2) - 1 {
        let y = match s.block {
            None => sums.load().cast::<f32>() * w_scale.load_at((0, .., ..)),
            Some(_) => acc.load(),
        };
        out.store((y * x_scale.load()).cast());
    }
}

impl QuantizedProblem {
    /// The number of scale blocks along k: 1 per channel.
    pub fn k_blocks(&self) -> usize {
        match self.block {
            None => 1,
            Some(b) => self.k.div_ceil(b.max(1)),
        }
    }

    fn activation_dtype(&self) -> DType {
        match self.quantization {
            Quantization::WeightOnly => self.dtype,
            Quantization::W8a8 => DType::I8,
        }
    }
}

impl Op for QuantizedMatmulOp {
    type Problem = QuantizedProblem;
    type Config = QuantizedConfig;

    fn name(&self) -> &'static str {
        "quantized_matmul"
    }
    fn example(&self) -> QuantizedProblem {
        QuantizedProblem { m: 1024, k: 4096, n: 4096, dtype: DType::BF16, quantization: Quantization::WeightOnly, block: None }
    }
    fn check(&self, p: &QuantizedProblem) -> Result<(), Error> {
        op::check_float_dtype("quantized_matmul", p.dtype)?;
        if let Some(b) = p.block {
            if b == 0 || b % LANES != 0 {
                return Err(Error::Shape(format!("a scale block must be a positive multiple of {LANES} inputs along k (or none: a scale per output channel); got {b}")));
            }
        }
        Ok(())
    }
    fn bucket(&self, p: &QuantizedProblem) -> String {
        let b = |n| tables::bucket(n, 128, 8192);
        let scales = p.block.map_or_else(|| "channel".to_string(), |b| format!("block{b}"));
        let q = match p.quantization {
            Quantization::WeightOnly => "w8",
            Quantization::W8a8 => "w8a8",
        };
        format!("m{}n{}k{}/{}/{q}/{scales}", b(p.m), b(p.n), b(p.k), p.dtype)
    }
    fn space(&self, p: &QuantizedProblem) -> SearchSpace {
        let bk: Vec<usize> = block_candidates(p.k, 2048).into_iter().filter(|b| p.block.is_none_or(|s| b % s == 0)).collect();
        let space = SearchSpace::new().param("bm", block_candidates(p.m, 1024)).param("bn", block_candidates(p.n, 1024)).param("bk", bk);
        match p.quantization {
            Quantization::WeightOnly => space,
            Quantization::W8a8 => space.param("int8_dots", vec![1, 0]),
        }
    }
    fn for_target(&self, p: &QuantizedProblem, c: QuantizedConfig, target: Option<TableTarget>) -> QuantizedConfig {
        if target.is_none_or(TableTarget::int8_matmul) {
            return c;
        }
        self.fit(p, QuantizedConfig { int8_dots: 0, ..c })
    }
    fn default_config(&self, p: &QuantizedProblem) -> QuantizedConfig {
        self.fit(p, QuantizedConfig { bm: 512, bn: 512, bk: 512, int8_dots: 1 })
    }
    fn fit(&self, p: &QuantizedProblem, c: QuantizedConfig) -> QuantizedConfig {
        if c.bm == 0 || c.bn == 0 || c.bk == 0 {
            return self.default_config(p);
        }
        // int8 tiles are 32 rows high: x's rows and w's rows (the output columns) alike.
        let bm = whole_tiles(c.bm, p.m, sublanes(p.activation_dtype()));
        let bn = whole_tiles(c.bn, p.n, LANES.max(sublanes(DType::I8)));
        let int8_dots = c.int8_dots.min(1);
        // Widened per-channel sums run over a whole k block; per block, over one scale block.
        let longest = if int8_dots == 0 && p.quantization == Quantization::W8a8 && p.block.is_none() { EXACT_WIDENED_K } else { usize::MAX };
        let bk = match p.block {
            None => whole_tiles(c.bk.min(longest), p.k, LANES),
            // A whole number of scale blocks, at least one.
            Some(b) => whole_tiles(c.bk.min(longest), p.k, b),
        };
        QuantizedConfig { bm, bn, bk, int8_dots }
    }
    fn call(&self, p: &QuantizedProblem, c: &QuantizedConfig) -> Result<PallasCall, Error> {
        let QuantizedConfig { bm, bn, bk, int8_dots } = *c;
        if bm == 0 || bn == 0 || bk == 0 {
            return Err(Error::Shape(format!("quantized_matmul blocks (bm, bn, bk) must be positive; got {:?}", (bm, bn, bk))));
        }
        if let Some(b) = p.block.filter(|&b| b == 0 || bk % b != 0) {
            return Err(Error::Shape(format!("quantized_matmul's k block ({bk}) must be a multiple of the scale block ({b})")));
        }
        if self.is_empty(p) {
            return Err(Error::Shape(format!("a kernel call needs non-empty dims (the host API handles empty ones): {p:?}")));
        }
        if int8_dots == 0 && p.quantization == Quantization::W8a8 && p.block.unwrap_or(bk) > EXACT_WIDENED_K {
            return Err(Error::Shape(format!("w8a8 without int8 dots sums blocks of at most {EXACT_WIDENED_K} exactly; got {}", p.block.unwrap_or(bk))));
        }
        let s = QuantizedKernel { k_len: p.k, block: p.block, int8_dots: int8_dots != 0 };
        let grid = [p.m.div_ceil(bm), p.n.div_ceil(bn), p.k.div_ceil(bk)];
        // Per channel, one scale row for every k step; per block, the k step's own rows.
        let scale_rows = p.block.map_or(1, |b| bk / b);
        let per_block = p.block.is_some();
        let w_scale = BlockSpec::new([Some(scale_rows), Some(1), Some(bn)], move |[_, j, kk]| (if per_block { kk } else { Scalar::constant(0) }, 0, j));
        let x = BlockSpec::new([bm, bk], |[i, _, kk]| (i, kk));
        let w = BlockSpec::new([bn, bk], |[_, j, kk]| (j, kk));
        let call = match (p.quantization, p.dtype) {
            (Quantization::WeightOnly, DType::F32) => PallasCall::new(weight_only_kernel::kernel::<f32>(s)),
            (Quantization::WeightOnly, DType::BF16) => PallasCall::new(weight_only_kernel::kernel::<bf16>(s)),
            (Quantization::W8a8, DType::F32) => PallasCall::new(w8a8_kernel::kernel::<f32>(s)),
            (Quantization::W8a8, DType::BF16) => PallasCall::new(w8a8_kernel::kernel::<bf16>(s)),
            (_, other) => return Err(Error::Dtype(format!("quantized_matmul computes in f32 or bf16, not {other}"))),
        };
        let call = match p.quantization {
            Quantization::WeightOnly => call.in_specs([x, w, w_scale]).scratch([Vmem::new([bm, bn])]),
            Quantization::W8a8 => {
                // The per-channel int32 sums, or (per block, unused) one tile.
                let sums = if per_block { [sublanes(DType::I32), LANES] } else { [bm, bn] };
                call.in_specs([x, BlockSpec::new([bm, 1], |[i, _, _]| (i, 0)), w, w_scale]).scratch([Vmem::new([bm, bn]), Vmem::new(sums)])
            }
        };
        Ok(call
            .grid(grid)
            .out_specs([BlockSpec::new([bm, bn], |[i, j, _]| (i, j))])
            .out_shapes([vec![p.m, p.n]])
            .dimension_semantics([Parallel, Parallel, Arbitrary])
            .name("quantized_matmul"))
    }
    fn operand_types(&self, p: &QuantizedProblem) -> Vec<ValueType> {
        let x = ValueType::new(p.activation_dtype(), [p.m, p.k]);
        let w = ValueType::new(DType::I8, [p.n, p.k]);
        let w_scale = ValueType::new(DType::F32, [p.k_blocks(), 1, p.n]);
        match p.quantization {
            Quantization::WeightOnly => vec![x, w, w_scale],
            Quantization::W8a8 => vec![x, ValueType::new(DType::F32, [p.m, 1]), w, w_scale],
        }
    }
    fn output_types(&self, p: &QuantizedProblem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, [p.m, p.n])]
    }
    /// A dim of 0: the output is empty, or (k = 0) all zeros.
    fn is_empty(&self, p: &QuantizedProblem) -> bool {
        p.m == 0 || p.n == 0 || p.k == 0
    }
    fn random_inputs(&self, p: &QuantizedProblem, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        use rand::Rng;
        let types = self.operand_types(p);
        // Scales about 1/127 of a unit range, as a symmetric quantizer makes them: the weight
        // scales last, w8a8's row scales second.
        let scales = match p.quantization {
            Quantization::WeightOnly => vec![2],
            Quantization::W8a8 => vec![1, 3],
        };
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.dtype {
                DType::I8 => HostArray::from_f64(DType::I8, &ArrayD::from_shape_simple_fn(t.shape.clone(), || f64::from(rng.random_range(-128i32..=127)))),
                _ if scales.contains(&i) => HostArray::from_f64(DType::F32, &ArrayD::from_shape_simple_fn(t.shape.clone(), || rng.random_range(0.5..1.5) / 127.0)),
                _ => op::random_operand(rng, t),
            })
            .collect()
    }
    fn reference(&self, p: &QuantizedProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let (x, x_scale, w, w_scale) = match (p.quantization, inputs) {
            (Quantization::WeightOnly, [x, w, ws]) => (x.to_f64(), None, w.to_f64(), ws.to_f64()),
            (Quantization::W8a8, [x, xs, w, ws]) => (x.to_f64(), Some(xs.to_f64()), w.to_f64(), ws.to_f64()),
            _ => return Vec::new(),
        };
        vec![reference(p, &x, x_scale.as_ref(), &w, &w_scale)]
    }
    fn table_problems(&self, target: TableTarget) -> Vec<QuantizedProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16] };
        let (m, k, n) = if target == TableTarget::Cpu { (512, 2048, 2048) } else { (1024, 4096, 4096) };
        let mut problems = Vec::new();
        for &dtype in dtypes {
            for quantization in [Quantization::WeightOnly, Quantization::W8a8] {
                for block in [None, Some(512)] {
                    problems.push(QuantizedProblem { m, k, n, dtype, quantization, block });
                }
            }
        }
        problems
    }
}

/// `x · dequant(w)ᵀ` in f64 (times `x_scale` per row for w8a8): `w_scale` as the kernels take
/// it, `[k blocks, 1, n]`.
pub fn reference(p: &QuantizedProblem, x: &ArrayD<f64>, x_scale: Option<&ArrayD<f64>>, w: &ArrayD<f64>, w_scale: &ArrayD<f64>) -> ArrayD<f64> {
    let x = x.view().into_dimensionality::<Ix2>().expect("x is [m, k]");
    let w = w.view().into_dimensionality::<Ix2>().expect("w is [n, k]");
    let ws = w_scale.view().into_dimensionality::<Ix3>().expect("w_scale is [k blocks, 1, n]");
    let block = p.block.unwrap_or(p.k.max(1));
    let dequant = Array2::from_shape_fn((p.n, p.k), |(j, c)| w[[j, c]] * ws[[c / block, 0, j]]);
    let mut out = x.dot(&dequant.t());
    if let Some(xs) = x_scale {
        let xs = xs.view().into_dimensionality::<Ix2>().expect("x_scale is [m, 1]");
        out *= &xs;
    }
    out.into_dyn()
}

/// The scales as the kernels take them, `[k blocks, 1, n]`, from PyTorch's layout: `[n]` (per
/// channel) or `[n, k blocks]`.
pub fn kernel_scales(scales: &ArrayD<f64>, p: &QuantizedProblem) -> Result<ArrayD<f64>, Error> {
    let (n, kb) = (p.n, p.k_blocks());
    let rows = match scales.shape() {
        [c] if *c == n && p.block.is_none() => scales.clone().into_shape_with_order((n, 1)).map_err(|e| Error::Shape(e.to_string()))?,
        [c, b] if *c == n && *b == kb => scales.clone().into_dimensionality::<Ix2>().map_err(|e| Error::Shape(e.to_string()))?,
        other => {
            let want = if p.block.is_some() { format!("[{n}, {kb}] (a scale per output channel and block of {} inputs)", p.block.unwrap_or(0)) } else { format!("[{n}]") };
            return Err(Error::Shape(format!("weight scales must be {want}; got {other:?}")));
        }
    };
    Ok(rows.t().to_owned().insert_axis(ndarray::Axis(1)).into_dyn())
}
