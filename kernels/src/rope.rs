//! Rotary position embedding in the half-split layout (Llama's `rotate_half`): `x · cos +
//! rotate_half(x) · sin` with `rotate_half(x) = [-x₂, x₁]`, over x `[batch, heads, seq, dim]`
//! and cos/sin `[batch or 1, seq, dim]` (HF's `apply_rotary_pos_emb` with its default
//! `unsqueeze_dim=1`), forward and backward, f32 or bf16 in (computed in f32). Taking cos and
//! sin, rather than positions, serves every RoPE scaling (linear, NTK, YaRN, Llama 3) unchanged.

use ndarray::{ArrayD, Axis, Ix3, Ix4};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{HostArray, PallasCall};

use crate::op::{self, Op};
use crate::rows::{self, RowsConfig};
use crate::tables::{self, TableTarget};
use crate::Error;

#[tpu_kernel]
fn rope_kernel<T: Float>(x: &Ref<T>, cos: &Ref<T>, sin: &Ref<T>, out: &mut Ref<T>, backward: bool) {
    let d = x.shape()[1];
    let h = d / 2;
    let half = |r: &Ref<T>, second: bool| if second { r.load_at((.., h..d)).cast::<f32>() } else { r.load_at((.., 0..h)).cast::<f32>() };
    let (x1, x2) = (half(x, false), half(x, true));
    let (c1, c2, s1, s2) = (half(cos, false), half(cos, true), half(sin, false), half(sin, true));
    // The backward is the transposed rotation: dx₁ = dy₁c₁ + dy₂s₂, dx₂ = dy₂c₂ - dy₁s₁.
    let (o1, o2) = if backward { (x1 * c1 + x2 * s2, x2 * c2 - x1 * s1) } else { (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2) };
    out.store_at((.., 0..h), o1.cast());
    out.store_at((.., h..d), o2.cast());
}

/// The rotation, or its transpose (the gradient of x from the output's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeOp {
    Forward,
    Backward,
}

/// x `[batch, heads, seq, dim]` in `dtype`; cos and sin `[batch, seq, dim]`, or `[1, seq, dim]`
/// shared by the batch when `shared_positions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RopeProblem {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub dim: usize,
    pub dtype: DType,
    pub shared_positions: bool,
}

impl Op for RopeOp {
    type Problem = RopeProblem;
    type Config = RowsConfig;

    fn name(&self) -> &'static str {
        match self {
            RopeOp::Forward => "rope",
            RopeOp::Backward => "rope_backward",
        }
    }
    fn example(&self) -> RopeProblem {
        RopeProblem { batch: 2, heads: 32, seq: 4096, dim: 128, dtype: DType::F32, shared_positions: true }
    }
    fn check(&self, p: &RopeProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)?;
        if p.dim % 2 != 0 {
            return Err(Error::Shape(format!("{}: the rotated dim must be even (its two halves rotate together); got {}", self.name(), p.dim)));
        }
        Ok(())
    }
    /// Head dims from 64 (a row op's start at 128 would merge the common 64 and 128).
    fn bucket(&self, p: &RopeProblem) -> String {
        format!("d{}/{}", tables::bucket(p.dim, 64, 1024), p.dtype)
    }
    /// Sequence rows per block.
    fn space(&self, p: &RopeProblem) -> SearchSpace {
        rows::space(p.seq)
    }
    fn default_config(&self, p: &RopeProblem) -> RowsConfig {
        rows::default_config(p.seq, p.dim, p.dtype)
    }
    fn fit(&self, p: &RopeProblem, c: RowsConfig) -> RowsConfig {
        rows::fit(p.seq, p.dim, p.dtype, c)
    }
    fn call(&self, p: &RopeProblem, c: &RowsConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.block_rows == 0 {
            return Err(Error::Shape(format!("{}: a kernel call needs a non-empty problem and block (the host API handles empty ones): {p:?} at {c:?}", self.name())));
        }
        let (bs, d) = (c.block_rows, p.dim);
        let kernel = match p.dtype {
            DType::F32 => rope_kernel::kernel::<f32>(*self == RopeOp::Backward),
            _ => rope_kernel::kernel::<bf16>(*self == RopeOp::Backward),
        };
        let x_spec = || BlockSpec::new([None, None, Some(bs), Some(d)], |[b, h, i]| (b, h, i, 0));
        let table_spec = || {
            if p.shared_positions {
                BlockSpec::new([None, Some(bs), Some(d)], |[_b, _h, i]| (0, i, 0))
            } else {
                BlockSpec::new([None, Some(bs), Some(d)], |[b, _h, i]| (b, i, 0))
            }
        };
        Ok(PallasCall::new(kernel)
            .name(self.name())
            .grid([p.batch, p.heads, p.seq.div_ceil(bs)])
            .dimension_semantics([Parallel, Parallel, Parallel])
            .in_specs([x_spec(), table_spec(), table_spec()])
            .out_specs([x_spec()])
            .out_shapes(self.output_types(p).into_iter().map(|t| t.shape)))
    }
    /// x (or, backward, the output's gradient), cos, sin.
    fn operand_types(&self, p: &RopeProblem) -> Vec<ValueType> {
        let table = ValueType::new(p.dtype, [if p.shared_positions { 1 } else { p.batch }, p.seq, p.dim]);
        vec![ValueType::new(p.dtype, [p.batch, p.heads, p.seq, p.dim]), table.clone(), table]
    }
    /// The rotated x (backward: x's gradient).
    fn output_types(&self, p: &RopeProblem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, [p.batch, p.heads, p.seq, p.dim])]
    }
    fn is_empty(&self, p: &RopeProblem) -> bool {
        [p.batch, p.heads, p.seq, p.dim].contains(&0)
    }
    /// Random x; cos and sin of random angles (as a rotary embedding's are).
    fn random_inputs(&self, p: &RopeProblem, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        let types = self.operand_types(p);
        let x = op::random_operand(rng, &types[0]);
        let angles = op::random_operand(rng, &types[1]).to_f64() * 3.0;
        vec![x, HostArray::from_f64(p.dtype, &angles.mapv(f64::cos)), HostArray::from_f64(p.dtype, &angles.mapv(f64::sin))]
    }
    fn reference(&self, _p: &RopeProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let [x, cos, sin] = inputs else { return Vec::new() };
        let (Ok(x), Ok(cos), Ok(sin)) = (x.to_f64().into_dimensionality::<Ix4>(), cos.to_f64().into_dimensionality::<Ix3>(), sin.to_f64().into_dimensionality::<Ix3>()) else {
            return Vec::new();
        };
        vec![reference(&x, &cos, &sin, *self == RopeOp::Backward).into_dyn()]
    }
    fn table_problems(&self, target: TableTarget) -> Vec<RopeProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        dtypes.iter().flat_map(|&dtype| [64, 128, 256].map(|dim| RopeProblem { batch: 1, heads: 8, seq: 4096, dim, dtype, shared_positions: true })).collect()
    }
}

/// The rotation in f64, written from HF's definition (`x·cos + rotate_half(x)·sin`), or, for the
/// backward, its transpose applied to `x` (then the output's gradient).
pub fn reference(x: &ndarray::Array4<f64>, cos: &ndarray::Array3<f64>, sin: &ndarray::Array3<f64>, backward: bool) -> ndarray::Array4<f64> {
    let (b, h, s, d) = x.dim();
    let half = d / 2;
    let table = |t: &ndarray::Array3<f64>, bi: usize, si: usize, j: usize| t[[if t.len_of(Axis(0)) == 1 { 0 } else { bi }, si, j]];
    ndarray::Array4::from_shape_fn((b, h, s, d), |(bi, hi, si, j)| {
        let (c, sn) = (table(cos, bi, si, j), table(sin, bi, si, j));
        let partner = if j < half { j + half } else { j - half };
        let sign = if j < half { -1.0 } else { 1.0 };
        let partner_sin = table(sin, bi, si, partner);
        if backward {
            // dx_j = dy_j c_j - sign · dy_partner · sin_partner (the transpose of out_j's sin term).
            x[[bi, hi, si, j]] * c - sign * x[[bi, hi, si, partner]] * partner_sin
        } else {
            x[[bi, hi, si, j]] * c + sign * x[[bi, hi, si, partner]] * sn
        }
    })
}
