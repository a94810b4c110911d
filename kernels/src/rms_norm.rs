//! RMS normalization over the last dim, as `torch.nn.functional.rms_norm`:
//! `y = x / sqrt(mean(x²) + eps) · w`, f32 or bf16 in (computed in f32), any number of rows;
//! and its backward, with the weight's gradient reduced across row blocks in the kernel.

use ndarray::{Array2, ArrayD, Axis, Ix2};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{HostArray, PallasCall};
use torchtpu_exec::Backend;

use crate::op::{self, Op};
use crate::rows::{self, reshaped, vector_operand, RowsConfig, TUNING_EPS};
use crate::tables::TableTarget;
use crate::Error;

#[tpu_kernel]
fn forward_kernel<T: Float>(x: &Ref<T>, w: &Ref<T>, y: &mut Ref<T>, rstd: &mut Ref<f32>, eps: f32, dim: usize, affine: bool) {
    let xb = x.load().cast::<f32>();
    let r = ((xb * xb).sum_keepdims(1) * (1.0 / dim as f32) + eps).rsqrt();
    let normed = xb * r;
    let out = if affine { normed * w.load().cast::<f32>() } else { normed };
    y.store(out.cast());
    rstd.store(r);
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn backward_kernel<T: Float>(
    x: &Ref<T>,
    w: &Ref<T>,
    dy: &Ref<T>,
    rstd: &Ref<f32>,
    dx: &mut Ref<T>,
    dw: &mut Ref<f32>,
    dw_acc: &mut Scratch<f32>,
    rows: usize,
    dim: usize,
    affine: bool,
) {
    let i = program_id(0);
    if i == 0 {
        dw_acc.store(zeros());
    }
    let xb = x.load().cast::<f32>();
    let dyb = dy.load().cast::<f32>();
    let r = rstd.load();
    let g = if affine { dyb * w.load().cast::<f32>() } else { dyb };
    // y = x·r·w with r = (mean(x²) + eps)^-½: dx = r·g - x·r³·mean(g·x), with g = dy·w.
    let c = (g * xb).sum_keepdims(1) * (1.0 / dim as f32);
    dx.store((g * r - xb * (r * r * r) * c).cast());
    if affine {
        dw_acc.store(dw_acc.load() + rows::sum_valid_rows(dyb * (xb * r), i, rows));
    }
    if i == num_programs(0) - 1 {
        dw.store(dw_acc.load());
    }
}

/// The forward, or the backward (dx and the weight's gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmsNormOp {
    Forward,
    Backward,
}

/// `rows` rows of `dim` values in `dtype`, normalized with `eps`, scaled by a weight if `affine`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsNormProblem {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
    pub affine: bool,
    #[serde(with = "op::float")]
    pub eps: f64,
}

/// The rows per block.
pub type RmsNormConfig = RowsConfig;

impl Op for RmsNormOp {
    type Problem = RmsNormProblem;
    type Config = RmsNormConfig;

    fn name(&self) -> &'static str {
        match self {
            RmsNormOp::Forward => "rms_norm",
            RmsNormOp::Backward => "rms_norm_backward",
        }
    }
    fn example(&self) -> RmsNormProblem {
        RmsNormProblem { rows: 4096, dim: 4096, dtype: DType::F32, affine: true, eps: TUNING_EPS }
    }
    fn check(&self, p: &RmsNormProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)?;
        rows::check_eps(self.name(), p.eps)
    }
    fn tuning_problem(&self, p: &RmsNormProblem) -> RmsNormProblem {
        RmsNormProblem { eps: TUNING_EPS, ..*p }
    }
    fn bucket(&self, p: &RmsNormProblem) -> String {
        rows::bucket(p.dim, p.dtype)
    }
    fn space(&self, p: &RmsNormProblem) -> SearchSpace {
        rows::space(p.rows)
    }
    fn default_config(&self, p: &RmsNormProblem) -> RmsNormConfig {
        rows::default_config(p.rows, p.dim, p.dtype)
    }
    fn fit(&self, p: &RmsNormProblem, c: RmsNormConfig) -> RmsNormConfig {
        rows::fit(p.rows, p.dim, p.dtype, c)
    }
    fn call(&self, p: &RmsNormProblem, c: &RmsNormConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) {
            return Err(Error::Shape(format!("a kernel call needs rows and dim (the host API handles empty ones): {p:?}")));
        }
        let (br, d) = (c.block_rows, p.dim);
        if br == 0 {
            return Err(Error::Shape("rms_norm's block_rows must be positive".into()));
        }
        let rows_spec = || BlockSpec::new([br, d], |[i]| (i, 0));
        let column_spec = || BlockSpec::new([br, 1], |[i]| (i, 0));
        let weight_spec = || BlockSpec::new([1, d], |[_]| (0, 0));
        let grid = [p.rows.div_ceil(br)];
        let call = match self {
            RmsNormOp::Forward => {
                let kernel = match p.dtype {
                    DType::F32 => forward_kernel::kernel::<f32>(p.eps as f32, d, p.affine),
                    _ => forward_kernel::kernel::<bf16>(p.eps as f32, d, p.affine),
                };
                PallasCall::new(kernel)
                    .name("rms_norm_forward")
                    .grid(grid)
                    .in_specs([rows_spec(), weight_spec()])
                    .out_specs([rows_spec(), column_spec()])
                    .out_shapes(self.output_types(p).into_iter().map(|t| t.shape))
                    .dimension_semantics([Parallel])
            }
            RmsNormOp::Backward => {
                let kernel = match p.dtype {
                    DType::F32 => backward_kernel::kernel::<f32>(p.rows, d, p.affine),
                    _ => backward_kernel::kernel::<bf16>(p.rows, d, p.affine),
                };
                // The weight's gradient accumulates over every row block: one sequential axis.
                PallasCall::new(kernel)
                    .name("rms_norm_backward")
                    .grid(grid)
                    .in_specs([rows_spec(), weight_spec(), rows_spec(), column_spec()])
                    .out_specs([rows_spec(), weight_spec()])
                    .out_shapes(self.output_types(p).into_iter().map(|t| t.shape))
                    .scratch([Vmem::new([1, d])])
                    .dimension_semantics([Arbitrary])
            }
        };
        Ok(call)
    }
    /// x `[rows, dim]`, the weight `[1, dim]` (read only if `affine`); the backward adds dy
    /// `[rows, dim]` and the forward's rstd (f32 `[rows, 1]`).
    fn operand_types(&self, p: &RmsNormProblem) -> Vec<ValueType> {
        let (x, w) = (ValueType::new(p.dtype, [p.rows, p.dim]), ValueType::new(p.dtype, [1, p.dim]));
        match self {
            RmsNormOp::Forward => vec![x, w],
            RmsNormOp::Backward => vec![x.clone(), w, x, ValueType::new(DType::F32, [p.rows, 1])],
        }
    }
    /// Forward: y like x and rstd f32 `[rows, 1]`; backward: dx like x and dw f32 `[1, dim]`.
    fn output_types(&self, p: &RmsNormProblem) -> Vec<ValueType> {
        let x = ValueType::new(p.dtype, [p.rows, p.dim]);
        match self {
            RmsNormOp::Forward => vec![x, ValueType::new(DType::F32, [p.rows, 1])],
            RmsNormOp::Backward => vec![x, ValueType::new(DType::F32, [1, p.dim])],
        }
    }
    fn is_empty(&self, p: &RmsNormProblem) -> bool {
        p.rows == 0 || p.dim == 0
    }
    /// Zeros, but a row of no values has an rstd of NaN (its mean is 0/0, as torch's).
    fn empty_outputs(&self, p: &RmsNormProblem, _inputs: &[HostArray]) -> Vec<HostArray> {
        let mut out: Vec<HostArray> = self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect();
        if *self == RmsNormOp::Forward && p.dim == 0 {
            out[1] = HostArray::from_f64(DType::F32, &ArrayD::from_elem(vec![p.rows, 1], f64::NAN));
        }
        out
    }
    /// Random x, weight (and dy); for the backward, the rstd of the forward on them.
    fn random_inputs(&self, p: &RmsNormProblem, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        let mut inputs: Vec<HostArray> = self.operand_types(p).iter().map(|t| op::random_operand(rng, t)).collect();
        if *self == RmsNormOp::Backward {
            if let Some(x) = inputs.first().and_then(|x| x.to_f64().into_dimensionality::<Ix2>().ok()) {
                inputs[3] = HostArray::from_f64(DType::F32, &reference_rstd(&x, p.eps).insert_axis(Axis(1)).into_dyn());
            }
        }
        inputs
    }
    fn reference(&self, p: &RmsNormProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let two = |a: &HostArray| a.to_f64().into_dimensionality::<Ix2>().ok();
        let weight = |w: &HostArray| if p.affine { two(w).map(|w| w.row(0).to_owned()) } else { Some(ndarray::Array1::ones(p.dim)) };
        match (self, inputs) {
            (RmsNormOp::Forward, [x, w]) => match (two(x), weight(w)) {
                (Some(x), Some(w)) => {
                    let r = reference_rstd(&x, p.eps);
                    let (r_column, w_row) = (r.view().insert_axis(Axis(1)), w.view().insert_axis(Axis(0)));
                    let y = &x * &r_column * w_row;
                    vec![y.into_dyn(), r.insert_axis(Axis(1)).into_dyn()]
                }
                _ => Vec::new(),
            },
            (RmsNormOp::Backward, [x, w, dy, _]) => match (two(x), weight(w), two(dy)) {
                (Some(x), Some(w), Some(dy)) => {
                    let (dx, dw) = reference_backward(&x, &w, &dy, p.eps);
                    vec![dx.into_dyn(), dw.insert_axis(Axis(0)).into_dyn()]
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<RmsNormProblem> {
        rows::table_shapes(target).into_iter().map(|(dtype, dim)| RmsNormProblem { rows: rows::TABLE_ROWS, dim, dtype, affine: true, eps: TUNING_EPS }).collect()
    }
}

/// `1 / sqrt(mean(x²) + eps)` of each row of `x`, in f64.
pub fn reference_rstd(x: &Array2<f64>, eps: f64) -> ndarray::Array1<f64> {
    let dim = x.ncols() as f64;
    x.map_axis(Axis(1), |row| 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim + eps).sqrt())
}

/// The gradients (dx, dw) of `y = x · rstd · w` in f64, written from the definition.
pub fn reference_backward(x: &Array2<f64>, w: &ndarray::Array1<f64>, dy: &Array2<f64>, eps: f64) -> (Array2<f64>, ndarray::Array1<f64>) {
    let (rows, dim) = x.dim();
    let r = reference_rstd(x, eps);
    let mut dx = Array2::zeros((rows, dim));
    let mut dw = ndarray::Array1::zeros(dim);
    for i in 0..rows {
        // dy_j · w_j · d(x_j r)/dx_k = dy_j w_j (δ_jk r - x_j x_k r³ / dim).
        let g: Vec<f64> = (0..dim).map(|j| dy[[i, j]] * w[j]).collect();
        let gx: f64 = (0..dim).map(|j| g[j] * x[[i, j]]).sum();
        for k in 0..dim {
            dx[[i, k]] = g[k] * r[i] - x[[i, k]] * r[i].powi(3) * gx / dim as f64;
            dw[k] += dy[[i, k]] * x[[i, k]] * r[i];
        }
    }
    (dx, dw)
}

/// The problem of what a user passes: `x` of any rank, normalized over its last dim, and an
/// optional weight of that length.
fn problem_of(x: &HostArray, weight: Option<&HostArray>, eps: f64) -> Result<RmsNormProblem, Error> {
    let (rows, dim) = rows::rows_of("rms_norm", x)?;
    let p = RmsNormProblem { rows, dim, dtype: x.dtype(), affine: weight.is_some(), eps };
    RmsNormOp::Forward.check(&p)?;
    Ok(p)
}

/// `x / sqrt(mean(x², last dim) + eps) · weight` on `backend`, and each row's `1 / sqrt(..)`
/// (f32, x's leading shape) for the backward.
pub fn rms_norm(x: &HostArray, weight: Option<&HostArray>, eps: f64, backend: Backend) -> Result<(HostArray, HostArray), Error> {
    let p = problem_of(x, weight, eps)?;
    let lead = &x.shape()[..x.shape().len() - 1];
    let mut out = op::run(&RmsNormOp::Forward, &p, None, &[reshaped(x, &[p.rows, p.dim])?, vector_operand("weight", weight, p.dim, p.dtype)?], backend)?;
    let missing = || Error::Shape("the kernel returned too few outputs".into());
    let rstd = out.pop().ok_or_else(missing)?;
    let y = out.pop().ok_or_else(missing)?;
    Ok((reshaped(&y, x.shape())?, reshaped(&rstd, lead)?))
}

/// The gradients (dx, dweight) of [`rms_norm`] from its rstd and the output's gradient `dy`;
/// dweight (f32) only with a weight.
pub fn rms_norm_backward(x: &HostArray, weight: Option<&HostArray>, dy: &HostArray, rstd: &HostArray, backend: Backend) -> Result<(HostArray, Option<HostArray>), Error> {
    let p = problem_of(x, weight, TUNING_EPS)?;
    let lead = &x.shape()[..x.shape().len() - 1];
    if dy.shape() != x.shape() || dy.dtype() != x.dtype() || rstd.shape() != lead || rstd.dtype() != DType::F32 {
        return Err(Error::Shape(format!(
            "dy must be {} {:?} and rstd f32 {lead:?}; got {} {:?} and {} {:?}",
            x.dtype(),
            x.shape(),
            dy.dtype(),
            dy.shape(),
            rstd.dtype(),
            rstd.shape()
        )));
    }
    let inputs = [reshaped(x, &[p.rows, p.dim])?, vector_operand("weight", weight, p.dim, p.dtype)?, reshaped(dy, &[p.rows, p.dim])?, reshaped(rstd, &[p.rows, 1])?];
    let mut out = op::run(&RmsNormOp::Backward, &p, None, &inputs, backend)?;
    let missing = || Error::Shape("the kernel returned too few outputs".into());
    let dw = out.pop().ok_or_else(missing)?;
    let dx = reshaped(&out.pop().ok_or_else(missing)?, x.shape())?;
    Ok((dx, if p.affine { Some(reshaped(&dw, &[p.dim])?) } else { None }))
}
