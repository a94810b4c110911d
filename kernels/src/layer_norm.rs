//! Layer normalization over the last dim, as `torch.nn.functional.layer_norm`:
//! `y = (x - mean) / sqrt(var + eps) · w + b` (biased variance, optional weight and bias), f32 or
//! bf16 in (computed in f32), any number of rows; and its backward, with the weight's and the
//! bias' gradients reduced across row blocks in the kernel.

use ndarray::{Array1, Array2, ArrayD, Axis, Ix2};
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
#[allow(clippy::too_many_arguments)]
fn forward_kernel<T: Float>(x: &Ref<T>, w: &Ref<T>, b: &Ref<T>, y: &mut Ref<T>, mean: &mut Ref<f32>, rstd: &mut Ref<f32>, eps: f32, dim: usize, weight: bool, bias: bool) {
    let xb = x.load().cast::<f32>();
    let m = xb.sum_keepdims(1) * (1.0 / dim as f32);
    let centered = xb - m;
    let r = ((centered * centered).sum_keepdims(1) * (1.0 / dim as f32) + eps).rsqrt();
    let mut out = centered * r;
    if weight {
        out = out * w.load().cast::<f32>();
    }
    if bias {
        out = out + b.load().cast::<f32>();
    }
    y.store(out.cast());
    mean.store(m);
    rstd.store(r);
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn backward_kernel<T: Float>(
    x: &Ref<T>,
    w: &Ref<T>,
    dy: &Ref<T>,
    mean: &Ref<f32>,
    rstd: &Ref<f32>,
    dx: &mut Ref<T>,
    dw: &mut Ref<f32>,
    db: &mut Ref<f32>,
    dw_acc: &mut Scratch<f32>,
    db_acc: &mut Scratch<f32>,
    rows: usize,
    dim: usize,
    weight: bool,
) {
    let i = program_id(0);
    if i == 0 {
        dw_acc.store(zeros());
        db_acc.store(zeros());
    }
    let r = rstd.load();
    let x_hat = (x.load().cast::<f32>() - mean.load()) * r;
    let dyb = dy.load().cast::<f32>();
    let g = if weight { dyb * w.load().cast::<f32>() } else { dyb };
    // y = x̂·w + b with x̂ = (x - mean)·r: dx = r·(g - mean(g) - x̂·mean(g·x̂)), with g = dy·w.
    let g_mean = g.sum_keepdims(1) * (1.0 / dim as f32);
    let gx_mean = (g * x_hat).sum_keepdims(1) * (1.0 / dim as f32);
    dx.store(((g - g_mean - x_hat * gx_mean) * r).cast());
    dw_acc.store(dw_acc.load() + rows::sum_valid_rows(dyb * x_hat, i, rows));
    db_acc.store(db_acc.load() + rows::sum_valid_rows(dyb, i, rows));
    if i == num_programs(0) - 1 {
        dw.store(dw_acc.load());
        db.store(db_acc.load());
    }
}

/// The forward, or the backward (dx and the weight's and bias' gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerNormOp {
    Forward,
    Backward,
}

/// `rows` rows of `dim` values in `dtype`, normalized with `eps`, scaled by a weight and
/// shifted by a bias where given.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNormProblem {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
    pub weight: bool,
    pub bias: bool,
    #[serde(with = "op::float")]
    pub eps: f64,
}

impl Op for LayerNormOp {
    type Problem = LayerNormProblem;
    type Config = RowsConfig;

    fn name(&self) -> &'static str {
        match self {
            LayerNormOp::Forward => "layer_norm",
            LayerNormOp::Backward => "layer_norm_backward",
        }
    }
    fn example(&self) -> LayerNormProblem {
        LayerNormProblem { rows: 4096, dim: 4096, dtype: DType::F32, weight: true, bias: true, eps: TUNING_EPS }
    }
    fn check(&self, p: &LayerNormProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)?;
        rows::check_eps(self.name(), p.eps)
    }
    fn tuning_problem(&self, p: &LayerNormProblem) -> LayerNormProblem {
        LayerNormProblem { eps: TUNING_EPS, ..*p }
    }
    fn bucket(&self, p: &LayerNormProblem) -> String {
        rows::bucket(p.dim, p.dtype)
    }
    fn space(&self, p: &LayerNormProblem) -> SearchSpace {
        rows::space(p.rows)
    }
    fn default_config(&self, p: &LayerNormProblem) -> RowsConfig {
        rows::default_config(p.rows, p.dim, p.dtype)
    }
    fn fit(&self, p: &LayerNormProblem, c: RowsConfig) -> RowsConfig {
        rows::fit(p.rows, p.dim, p.dtype, c)
    }
    fn call(&self, p: &LayerNormProblem, c: &RowsConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.block_rows == 0 {
            return Err(Error::Shape(format!("a kernel call needs rows, dim and a block (the host API handles empty problems): {p:?} at {c:?}")));
        }
        let (br, d) = (c.block_rows, p.dim);
        let rows_spec = || BlockSpec::new([br, d], |[i]| (i, 0));
        let column_spec = || BlockSpec::new([br, 1], |[i]| (i, 0));
        let vector_spec = || BlockSpec::new([1, d], |[_]| (0, 0));
        let out_shapes = self.output_types(p).into_iter().map(|t| t.shape);
        let call = match self {
            LayerNormOp::Forward => {
                let kernel = match p.dtype {
                    DType::F32 => forward_kernel::kernel::<f32>(p.eps as f32, d, p.weight, p.bias),
                    _ => forward_kernel::kernel::<bf16>(p.eps as f32, d, p.weight, p.bias),
                };
                PallasCall::new(kernel)
                    .name("layer_norm_forward")
                    .in_specs([rows_spec(), vector_spec(), vector_spec()])
                    .out_specs([rows_spec(), column_spec(), column_spec()])
                    .dimension_semantics([Parallel])
            }
            LayerNormOp::Backward => {
                let kernel = match p.dtype {
                    DType::F32 => backward_kernel::kernel::<f32>(p.rows, d, p.weight),
                    _ => backward_kernel::kernel::<bf16>(p.rows, d, p.weight),
                };
                // The weight's and bias' gradients accumulate over every row block: one sequential axis.
                PallasCall::new(kernel)
                    .name("layer_norm_backward")
                    .in_specs([rows_spec(), vector_spec(), rows_spec(), column_spec(), column_spec()])
                    .out_specs([rows_spec(), vector_spec(), vector_spec()])
                    .scratch([Vmem::new([1, d]), Vmem::new([1, d])])
                    .dimension_semantics([Arbitrary])
            }
        };
        Ok(call.grid([p.rows.div_ceil(br)]).out_shapes(out_shapes))
    }
    /// x `[rows, dim]`, the weight and bias `[1, dim]` (read only when given); the backward
    /// takes x, the weight, dy `[rows, dim]` and the forward's mean and rstd (f32 `[rows, 1]`).
    fn operand_types(&self, p: &LayerNormProblem) -> Vec<ValueType> {
        let (x, v, column) = (ValueType::new(p.dtype, [p.rows, p.dim]), ValueType::new(p.dtype, [1, p.dim]), ValueType::new(DType::F32, [p.rows, 1]));
        match self {
            LayerNormOp::Forward => vec![x, v.clone(), v],
            LayerNormOp::Backward => vec![x.clone(), v, x, column.clone(), column],
        }
    }
    /// Forward: y like x, mean and rstd f32 `[rows, 1]`; backward: dx like x, dw and db f32 `[1, dim]`.
    fn output_types(&self, p: &LayerNormProblem) -> Vec<ValueType> {
        let x = ValueType::new(p.dtype, [p.rows, p.dim]);
        match self {
            LayerNormOp::Forward => vec![x, ValueType::new(DType::F32, [p.rows, 1]), ValueType::new(DType::F32, [p.rows, 1])],
            LayerNormOp::Backward => vec![x, ValueType::new(DType::F32, [1, p.dim]), ValueType::new(DType::F32, [1, p.dim])],
        }
    }
    fn is_empty(&self, p: &LayerNormProblem) -> bool {
        p.rows == 0 || p.dim == 0
    }
    /// Zeros, but a row of no values has a mean and rstd of NaN (0/0, as torch's).
    fn empty_outputs(&self, p: &LayerNormProblem, _inputs: &[HostArray]) -> Vec<HostArray> {
        let mut out: Vec<HostArray> = self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect();
        if *self == LayerNormOp::Forward && p.dim == 0 {
            for o in &mut out[1..] {
                *o = HostArray::from_f64(DType::F32, &ArrayD::from_elem(vec![p.rows, 1], f64::NAN));
            }
        }
        out
    }
    /// Random x, weight, bias (and dy); for the backward, the mean and rstd of the forward.
    fn random_inputs(&self, p: &LayerNormProblem, rng: &mut rand::rngs::StdRng) -> Vec<HostArray> {
        let mut inputs: Vec<HostArray> = self.operand_types(p).iter().map(|t| op::random_operand(rng, t)).collect();
        if *self == LayerNormOp::Backward {
            if let Some(x) = inputs.first().and_then(|x| x.to_f64().into_dimensionality::<Ix2>().ok()) {
                let (mean, rstd) = reference_stats(&x, p.eps);
                inputs[3] = HostArray::from_f64(DType::F32, &mean.insert_axis(Axis(1)).into_dyn());
                inputs[4] = HostArray::from_f64(DType::F32, &rstd.insert_axis(Axis(1)).into_dyn());
            }
        }
        inputs
    }
    fn reference(&self, p: &LayerNormProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let two = |a: &HostArray| a.to_f64().into_dimensionality::<Ix2>().ok();
        let vector = |v: &HostArray, given: bool, default: f64| if given { two(v).map(|v| v.row(0).to_owned()) } else { Some(Array1::from_elem(p.dim, default)) };
        match (self, inputs) {
            (LayerNormOp::Forward, [x, w, b]) => match (two(x), vector(w, p.weight, 1.0), vector(b, p.bias, 0.0)) {
                (Some(x), Some(w), Some(b)) => {
                    let (mean, rstd) = reference_stats(&x, p.eps);
                    let y = Array2::from_shape_fn(x.dim(), |(i, j)| (x[[i, j]] - mean[i]) * rstd[i] * w[j] + b[j]);
                    vec![y.into_dyn(), mean.insert_axis(Axis(1)).into_dyn(), rstd.insert_axis(Axis(1)).into_dyn()]
                }
                _ => Vec::new(),
            },
            (LayerNormOp::Backward, [x, w, dy, _, _]) => match (two(x), vector(w, p.weight, 1.0), two(dy)) {
                (Some(x), Some(w), Some(dy)) => {
                    let (dx, dw, db) = reference_backward(&x, &w, &dy, p.eps);
                    vec![dx.into_dyn(), dw.insert_axis(Axis(0)).into_dyn(), db.insert_axis(Axis(0)).into_dyn()]
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<LayerNormProblem> {
        rows::table_shapes(target).into_iter().map(|(dtype, dim)| LayerNormProblem { rows: rows::TABLE_ROWS, dim, dtype, weight: true, bias: true, eps: TUNING_EPS }).collect()
    }
}

/// Each row's mean and `1 / sqrt(var + eps)` (biased variance), in f64.
pub fn reference_stats(x: &Array2<f64>, eps: f64) -> (Array1<f64>, Array1<f64>) {
    let dim = x.ncols() as f64;
    let mean = x.map_axis(Axis(1), |row| row.sum() / dim);
    let rstd = Array1::from_shape_fn(x.nrows(), |i| 1.0 / (x.row(i).iter().map(|v| (v - mean[i]).powi(2)).sum::<f64>() / dim + eps).sqrt());
    (mean, rstd)
}

/// The gradients (dx, dw, db) of `y = (x - mean)·rstd·w + b` in f64, written from the definition.
pub fn reference_backward(x: &Array2<f64>, w: &Array1<f64>, dy: &Array2<f64>, eps: f64) -> (Array2<f64>, Array1<f64>, Array1<f64>) {
    let (rows, dim) = x.dim();
    let (mean, rstd) = reference_stats(x, eps);
    let n = dim as f64;
    let (mut dx, mut dw, mut db) = (Array2::zeros((rows, dim)), Array1::zeros(dim), Array1::zeros(dim));
    for i in 0..rows {
        let x_hat: Vec<f64> = (0..dim).map(|j| (x[[i, j]] - mean[i]) * rstd[i]).collect();
        let g: Vec<f64> = (0..dim).map(|j| dy[[i, j]] * w[j]).collect();
        // dx̂_j/dx_k = r (δ_jk - 1/n - x̂_j x̂_k / n).
        let (g_sum, gx_sum): (f64, f64) = (g.iter().sum(), g.iter().zip(&x_hat).map(|(a, b)| a * b).sum());
        for k in 0..dim {
            dx[[i, k]] = rstd[i] * (g[k] - g_sum / n - x_hat[k] * gx_sum / n);
            dw[k] += dy[[i, k]] * x_hat[k];
            db[k] += dy[[i, k]];
        }
    }
    (dx, dw, db)
}

fn problem_of(x: &HostArray, weight: Option<&HostArray>, bias: Option<&HostArray>, eps: f64) -> Result<LayerNormProblem, Error> {
    let (rows, dim) = rows::rows_of("layer_norm", x)?;
    let p = LayerNormProblem { rows, dim, dtype: x.dtype(), weight: weight.is_some(), bias: bias.is_some(), eps };
    LayerNormOp::Forward.check(&p)?;
    Ok(p)
}

/// Layer norm of `x` over its last dim on `backend`: y, and each row's mean and rstd (f32, x's
/// leading shape) for the backward.
pub fn layer_norm(x: &HostArray, weight: Option<&HostArray>, bias: Option<&HostArray>, eps: f64, backend: Backend) -> Result<(HostArray, HostArray, HostArray), Error> {
    let p = problem_of(x, weight, bias, eps)?;
    let lead = &x.shape()[..x.shape().len() - 1];
    let inputs = [reshaped(x, &[p.rows, p.dim])?, vector_operand("weight", weight, p.dim, p.dtype)?, vector_operand("bias", bias, p.dim, p.dtype)?];
    let out = op::run(&LayerNormOp::Forward, &p, None, &inputs, backend)?;
    match out.as_slice() {
        [y, mean, rstd] => Ok((reshaped(y, x.shape())?, reshaped(mean, lead)?, reshaped(rstd, lead)?)),
        _ => Err(Error::Shape("the kernel returned too few outputs".into())),
    }
}

/// The gradients (dx, dweight, dbias) of [`layer_norm`] from its mean, rstd and the output's
/// gradient `dy`; dweight and dbias are f32 `[dim]`.
pub fn layer_norm_backward(
    x: &HostArray,
    weight: Option<&HostArray>,
    dy: &HostArray,
    mean: &HostArray,
    rstd: &HostArray,
    backend: Backend,
) -> Result<(HostArray, HostArray, HostArray), Error> {
    let p = problem_of(x, weight, None, TUNING_EPS)?;
    let lead = &x.shape()[..x.shape().len() - 1];
    let stat_ok = |s: &HostArray| s.shape() == lead && s.dtype() == DType::F32;
    if dy.shape() != x.shape() || dy.dtype() != x.dtype() || !stat_ok(mean) || !stat_ok(rstd) {
        return Err(Error::Shape(format!(
            "dy must be {} {:?} and mean and rstd f32 {lead:?}; got {} {:?}, {} {:?} and {} {:?}",
            x.dtype(),
            x.shape(),
            dy.dtype(),
            dy.shape(),
            mean.dtype(),
            mean.shape(),
            rstd.dtype(),
            rstd.shape()
        )));
    }
    let column = |s: &HostArray| reshaped(s, &[p.rows, 1]);
    let inputs = [reshaped(x, &[p.rows, p.dim])?, vector_operand("weight", weight, p.dim, p.dtype)?, reshaped(dy, &[p.rows, p.dim])?, column(mean)?, column(rstd)?];
    let out = op::run(&LayerNormOp::Backward, &p, None, &inputs, backend)?;
    match out.as_slice() {
        [dx, dw, db] => Ok((reshaped(dx, x.shape())?, reshaped(dw, &[p.dim])?, reshaped(db, &[p.dim])?)),
        _ => Err(Error::Shape("the kernel returned too few outputs".into())),
    }
}
