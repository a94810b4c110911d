//! A user's own kernel as torchtpu ops: soft-capping, `cap · tanh(x / cap)` (Gemma's logit
//! capping), forward and backward, in one file. Implementing `Op` is all it takes for the command line (`src/main.rs`), the tuner,
//! tuned tables (`tables/`) and, through the Python extension below, PyTorch
//! (`user_ops/__init__.py`).

use torchtpu::kernels::op::check_float_dtype;
use torchtpu::kernels::tables::{self, Tables};
use torchtpu::kernels::Error;
use torchtpu::ndarray::{self, ArrayD};
use torchtpu::prelude::*;
use torchtpu::serde::{Deserialize, Serialize};

#[tpu_kernel]
fn softcap_forward<T: Float>(x: &Ref<T>, y: &mut Ref<T>, cap: f32) {
    y.store(((x.load().cast::<f32>() * (1.0 / cap)).tanh() * cap).cast());
}

#[tpu_kernel]
fn softcap_backward<T: Float>(x: &Ref<T>, dy: &Ref<T>, dx: &mut Ref<T>, cap: f32) {
    let t = (x.load().cast::<f32>() * (1.0 / cap)).tanh();
    dx.store((dy.load().cast::<f32>() * (t * t * -1.0f32 + 1.0f32)).cast());
}

/// Soft-capping, `cap · tanh(x / cap)` (Gemma's logit capping), or its backward (dx from dy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Softcap {
    Forward,
    Backward,
}

/// `rows × dim` values in `dtype`, capped at `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "torchtpu::serde")]
pub struct Problem {
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
    pub cap: f64,
}

/// The block: rows and columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "torchtpu::serde")]
pub struct Config {
    pub block_rows: usize,
    pub block_cols: usize,
}

/// This crate's tuned tables, made by `cargo run --release -- tables`.
fn own_tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| torchtpu::kernels::include_tables!("../tables"))
}

fn powers_of_two(from: usize, to: usize) -> impl Iterator<Item = usize> {
    std::iter::successors(Some(from), |b| Some(b * 2)).take_while(move |&b| b <= to)
}

impl Op for Softcap {
    type Problem = Problem;
    type Config = Config;

    fn name(&self) -> &'static str {
        match self {
            Softcap::Forward => "softcap",
            Softcap::Backward => "softcap_backward",
        }
    }
    fn example(&self) -> Problem {
        Problem { rows: 4096, dim: 4096, dtype: DType::F32, cap: 30.0 }
    }
    fn check(&self, p: &Problem) -> Result<(), Error> {
        check_float_dtype(self.name(), p.dtype)?;
        if !(p.cap > 0.0 && (p.cap as f32).is_finite()) {
            return Err(Error::Shape(format!("{}: the cap must be positive and finite; got {}", self.name(), p.cap)));
        }
        Ok(())
    }
    /// The cap cannot change which block is fastest.
    fn tuning_problem(&self, p: &Problem) -> Problem {
        Problem { cap: 30.0, ..*p }
    }
    fn bucket(&self, p: &Problem) -> String {
        format!("d{}/{}", tables::bucket(p.dim, 128, 32768), p.dtype)
    }
    fn space(&self, p: &Problem) -> SearchSpace {
        let rows = p.rows.next_power_of_two().clamp(8, 1024);
        let cols = p.dim.next_power_of_two().clamp(128, 4096);
        SearchSpace::new().param("block_rows", powers_of_two(8, rows)).param("block_cols", powers_of_two(128, cols))
    }
    fn default_config(&self, p: &Problem) -> Config {
        self.fit(p, Config { block_rows: 256, block_cols: 1024 })
    }
    /// Rows a multiple of the dtype's sublanes, columns of 128 lanes, or the whole dim.
    fn fit(&self, p: &Problem, c: Config) -> Config {
        let tile = torchtpu::dsl::sublanes(p.dtype);
        let rows = c.block_rows.max(1).min(p.rows.div_ceil(tile) * tile).div_ceil(tile) * tile;
        let cols = if c.block_cols == 0 || c.block_cols >= p.dim { p.dim } else { c.block_cols.div_ceil(128) * 128 };
        Config { block_rows: rows.max(tile), block_cols: cols }
    }
    fn call(&self, p: &Problem, c: &Config) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.block_rows == 0 || c.block_cols == 0 {
            return Err(Error::Shape(format!("{}: a kernel needs rows, columns and blocks; got {p:?} at {c:?}", self.name())));
        }
        let block = || BlockSpec::new([c.block_rows, c.block_cols], |[i, j]| (i, j));
        let grid = [p.rows.div_ceil(c.block_rows), p.dim.div_ceil(c.block_cols)];
        let cap = p.cap as f32;
        let call = match (self, p.dtype) {
            (Softcap::Forward, DType::F32) => PallasCall::new(softcap_forward::kernel::<f32>(cap)),
            (Softcap::Forward, _) => PallasCall::new(softcap_forward::kernel::<bf16>(cap)),
            (Softcap::Backward, DType::F32) => PallasCall::new(softcap_backward::kernel::<f32>(cap)),
            (Softcap::Backward, _) => PallasCall::new(softcap_backward::kernel::<bf16>(cap)),
        };
        let call = call.name(self.name()).grid(grid).dimension_semantics([Parallel, Parallel]);
        Ok(match self {
            Softcap::Forward => call.in_specs([block()]).out_specs([block()]),
            Softcap::Backward => call.in_specs([block(), block()]).out_specs([block()]),
        }
        .out_shapes(self.output_types(p).into_iter().map(|t| t.shape)))
    }
    /// x `[rows, dim]`; the backward adds the output's gradient.
    fn operand_types(&self, p: &Problem) -> Vec<ValueType> {
        let t = ValueType::new(p.dtype, [p.rows, p.dim]);
        match self {
            Softcap::Forward => vec![t],
            Softcap::Backward => vec![t.clone(), t],
        }
    }
    /// Forward: y; backward: dx (like x).
    fn output_types(&self, p: &Problem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, [p.rows, p.dim])]
    }
    fn is_empty(&self, p: &Problem) -> bool {
        p.rows == 0 || p.dim == 0
    }
    fn reference(&self, p: &Problem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let f: Vec<ArrayD<f64>> = inputs.iter().map(HostArray::to_f64).collect();
        let cap = f64::from(p.cap as f32);
        match (self, f.as_slice()) {
            (Softcap::Forward, [x]) => vec![x.mapv(|x| cap * (x / cap).tanh())],
            (Softcap::Backward, [x, dy]) => vec![ndarray::Zip::from(x).and(dy).map_collect(|&x, &d| d * (1.0 - (x / cap).tanh().powi(2)))],
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<Problem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        dtypes.iter().map(|&dtype| Problem { rows: 4096, dim: 4096, dtype, cap: 30.0 }).collect()
    }
    fn tables(&self) -> &'static Tables {
        own_tables()
    }
}

/// This crate's ops: what its command line and its Python extension serve.
pub static OPS: &[&dyn AnyOp] = &[&Registered(Softcap::Forward), &Registered(Softcap::Backward)];

/// The Python extension `user_ops._user_ops`: the generic op functions over [`OPS`].
#[cfg(feature = "python")]
#[torchtpu_pyo3::pyo3::pymodule]
#[pyo3(crate = "torchtpu_pyo3::pyo3")]
fn _user_ops(m: &torchtpu_pyo3::pyo3::Bound<'_, torchtpu_pyo3::pyo3::types::PyModule>) -> torchtpu_pyo3::pyo3::PyResult<()> {
    torchtpu_pyo3::install_panic_hook();
    torchtpu_pyo3::ops::add_ops(m, OPS)
}
