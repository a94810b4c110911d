//! Gated linear units, `act(gate) · up`: SwiGLU (`act` = SiLU) and GeGLU (GELU, exact or its
//! tanh approximation), forward and backward, f32 or bf16 in (computed in f32), any shape
//! (`[.., dim]` seen as `[rows, dim]`, blocked in both dims).

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::blocks;
use crate::op::{self, Op};
use crate::rows;
use crate::tables::TableTarget;
use crate::Error;

/// The gate's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(x)`: SwiGLU.
    Silu,
    /// `x · Φ(x)`, exact (through erf): GeGLU, as `F.gelu(x)`.
    Gelu,
    /// GELU's tanh approximation: GeGLU, as `F.gelu(x, approximate="tanh")`.
    GeluTanh,
}

impl Activation {
    /// Its name in problems and buckets (`silu`, `gelu`, `gelu_tanh`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
        }
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
const GELU_TANH_CUBE: f32 = 0.044_715;

/// erf(x) to 1.5e-7 (Abramowitz and Stegun 7.1.26): the kernel language has no erf.
#[tpu_fn]
fn erf(x: Tile<f32>) -> Tile<f32> {
    let t = 1.0f32 / (x.abs() * 0.327_591_1 + 1.0);
    let poly = ((((t * 1.061_405_4 - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let magnitude = 1.0f32 - poly * (x * x * -1.0).exp();
    select(x < 0.0, magnitude * -1.0, magnitude)
}

/// `act(x)` and `act'(x)`.
#[tpu_fn]
pub(crate) fn activation(act: Activation, x: Tile<f32>) -> (Tile<f32>, Tile<f32>) {
    match act {
        Activation::Silu => {
            let s = x.sigmoid();
            (x * s, s * (x * (1.0f32 - s) + 1.0))
        }
        Activation::Gelu => {
            let cdf = (erf(x * FRAC_1_SQRT_2) + 1.0) * 0.5;
            let pdf = (x * x * -0.5).exp() * FRAC_1_SQRT_2PI;
            (x * cdf, cdf + x * pdf)
        }
        Activation::GeluTanh => {
            let t = ((x + x * x * x * GELU_TANH_CUBE) * SQRT_2_OVER_PI).tanh();
            let inner = (x * x * (3.0 * GELU_TANH_CUBE) + 1.0) * SQRT_2_OVER_PI;
            (x * (t + 1.0) * 0.5, (t + 1.0) * 0.5 + x * (1.0f32 - t * t) * inner * 0.5)
        }
    }
}

#[tpu_kernel]
fn forward_kernel<T: Float>(gate: &Ref<T>, up: &Ref<T>, out: &mut Ref<T>, act: Activation) {
    let (a, _) = activation(act, gate.load().cast::<f32>());
    out.store((a * up.load().cast::<f32>()).cast());
}

#[tpu_kernel]
fn backward_kernel<T: Float>(gate: &Ref<T>, up: &Ref<T>, dy: &Ref<T>, d_gate: &mut Ref<T>, d_up: &mut Ref<T>, act: Activation) {
    let (a, da) = activation(act, gate.load().cast::<f32>());
    let dy = dy.load().cast::<f32>();
    d_up.store((dy * a).cast());
    d_gate.store((dy * up.load().cast::<f32>() * da).cast());
}

/// The forward, or the backward (the gradients of gate and up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluOp {
    Forward,
    Backward,
}

/// `rows × dim` gate and up in `dtype`, and the gate's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluProblem {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
    pub activation: Activation,
}

/// The block: rows and columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluConfig {
    pub block_rows: usize,
    pub block_cols: usize,
}

/// The f64 activation and its derivative, written from the definitions: the reference.
pub fn reference_activation(act: Activation, x: f64) -> (f64, f64) {
    match act {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm_erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (x * cdf, cdf + x * pdf)
        }
        Activation::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = (k * (x + 0.044715 * x.powi(3))).tanh();
            (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x))
        }
    }
}

/// erf in f64, independent of the kernel's approximation: its Maclaurin series below 3, and
/// 1 - erfc by erfc's continued fraction above; good to 1e-13.
pub fn libm_erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 3.0 {
        // erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(x) = e^(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), from the inside out.
        let fraction = (1..=80).rev().fold(a, |inner, k| a + (k as f64 / 2.0) / inner);
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * fraction)
    };
    value.copysign(x)
}

impl Op for GluOp {
    type Problem = GluProblem;
    type Config = GluConfig;

    fn name(&self) -> &'static str {
        match self {
            GluOp::Forward => "glu",
            GluOp::Backward => "glu_backward",
        }
    }
    fn example(&self) -> GluProblem {
        GluProblem { rows: 4096, dim: 11008, dtype: DType::F32, activation: Activation::Silu }
    }
    fn check(&self, p: &GluProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)
    }
    /// The activation is part of it: GELU's extra work per element changes which blocks fit
    /// (a block SiLU compiles at can spill past v4's VMEM with tanh GELU).
    fn bucket(&self, p: &GluProblem) -> String {
        format!("{}/{}", rows::bucket(p.dim, p.dtype), p.activation.name())
    }
    fn space(&self, p: &GluProblem) -> SearchSpace {
        let rows = p.rows.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(8, 1024);
        let cols = p.dim.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(LANES, 4096);
        SearchSpace::new().param("block_rows", blocks::powers_of_two(8, rows)).param("block_cols", blocks::powers_of_two(LANES, cols))
    }
    /// Whole rows up to 16384 columns (a ragged column block costs the CPU path 4× at 11008
    /// columns), at most a MiB of f32 per block (the backward's five fit v4's scoped VMEM).
    fn default_config(&self, p: &GluProblem) -> GluConfig {
        let block_cols = if p.dim <= 16384 { p.dim.max(1) } else { 4096 };
        let block_rows = blocks::largest_power_of_two_at_most((1usize << 18) / block_cols).clamp(8, 512);
        self.fit(p, GluConfig { block_rows, block_cols })
    }
    /// Rows a multiple of the dtype's sublanes (or all of them), columns of whole lanes (or the
    /// whole dim); blocks of 0 give the heuristic.
    fn fit(&self, p: &GluProblem, c: GluConfig) -> GluConfig {
        if c.block_rows == 0 || c.block_cols == 0 {
            return self.default_config(p);
        }
        GluConfig { block_rows: blocks::whole_tiles(c.block_rows, p.rows, sublanes(p.dtype)), block_cols: blocks::whole_tiles_or_span(c.block_cols, p.dim, LANES) }
    }
    fn call(&self, p: &GluProblem, c: &GluConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.block_rows == 0 || c.block_cols == 0 {
            return Err(Error::Shape(format!("{}: a kernel call needs rows, dim and blocks (the host API handles empty problems): {p:?} at {c:?}", self.name())));
        }
        let block = || BlockSpec::new([c.block_rows, c.block_cols], |[i, j]| (i, j));
        let kernel = match (self, p.dtype) {
            (GluOp::Forward, DType::F32) => forward_kernel::kernel::<f32>(p.activation),
            (GluOp::Forward, _) => forward_kernel::kernel::<bf16>(p.activation),
            (GluOp::Backward, DType::F32) => backward_kernel::kernel::<f32>(p.activation),
            (GluOp::Backward, _) => backward_kernel::kernel::<bf16>(p.activation),
        };
        let call = PallasCall::new(kernel).name(self.name()).grid([p.rows.div_ceil(c.block_rows), p.dim.div_ceil(c.block_cols)]).dimension_semantics([Parallel, Parallel]);
        let call = match self {
            GluOp::Forward => call.in_specs([block(), block()]).out_specs([block()]),
            GluOp::Backward => call.in_specs([block(), block(), block()]).out_specs([block(), block()]),
        };
        Ok(call.out_shapes(self.output_types(p).into_iter().map(|t| t.shape)))
    }
    /// gate and up `[rows, dim]`; the backward adds the output's gradient.
    fn operand_types(&self, p: &GluProblem) -> Vec<ValueType> {
        let t = ValueType::new(p.dtype, [p.rows, p.dim]);
        match self {
            GluOp::Forward => vec![t.clone(), t],
            GluOp::Backward => vec![t.clone(), t.clone(), t],
        }
    }
    /// Forward: the output; backward: the gradients of gate and up (each like gate).
    fn output_types(&self, p: &GluProblem) -> Vec<ValueType> {
        let t = ValueType::new(p.dtype, [p.rows, p.dim]);
        match self {
            GluOp::Forward => vec![t],
            GluOp::Backward => vec![t.clone(), t],
        }
    }
    fn is_empty(&self, p: &GluProblem) -> bool {
        p.rows == 0 || p.dim == 0
    }
    fn reference(&self, p: &GluProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
        let act = |g: f64| reference_activation(p.activation, g);
        match (self, f.as_slice()) {
            (GluOp::Forward, [g, u]) => vec![Zip::from(g).and(u).map_collect(|&g, &u| act(g).0 * u)],
            (GluOp::Backward, [g, u, dy]) => vec![Zip::from(g).and(u).and(dy).map_collect(|&g, &u, &d| d * u * act(g).1), Zip::from(g).and(dy).map_collect(|&g, &d| d * act(g).0)],
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<GluProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        let activations = [Activation::Silu, Activation::Gelu, Activation::GeluTanh];
        dtypes.iter().flat_map(|&dtype| activations.map(|activation| GluProblem { rows: 2048, dim: 4096, dtype, activation })).collect()
    }
}
