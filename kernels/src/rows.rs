//! What row-wise ops (the norms) share: `x [.., dim]` seen as `[rows, dim]`, blocks of whole
//! rows as the one tunable — its search space, heuristic, fitting to a problem, shape bucket and
//! table problems — and the host-side checks and layouts of their operands.

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::sublanes;

use crate::blocks;
use crate::masking::zero_outside;
use crate::tables::{self, TableTarget};
use crate::Error;

/// `part` (a row block's per-element contributions) summed over its rows, leaving out the rows
/// of block `i` past `rows` ([`zero_outside`]). For gradients reduced across row blocks.
#[tpu_fn]
pub fn sum_valid_rows(part: Tile<f32>, i: Scalar<i32>, rows: usize) -> Tile<f32> {
    let br = part.shape()[0];
    let mut kept = part;
    if rows % br != 0 {
        kept = zero_outside(part, 0, i * br as i32, rows);
    }
    kept.sum_keepdims(0)
}

/// Rows per block (each block spans the whole of `dim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowsConfig {
    pub block_rows: usize,
}

/// The eps row problems are tuned at: it cannot change which block is fastest.
pub const TUNING_EPS: f64 = 1e-6;

/// Powers of two from 8 rows up to the first covering `rows` (at most 2048).
pub fn space(rows: usize) -> SearchSpace {
    let top = rows.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(8, 2048);
    SearchSpace::new().param("block_rows", blocks::powers_of_two(8, top))
}

/// About a MiB of f32 per block (rows × dim), at most 512 rows; fitted.
pub fn default_config(rows: usize, dim: usize, dtype: DType) -> RowsConfig {
    fit(rows, dim, dtype, RowsConfig { block_rows: ((1usize << 18) / dim.max(1)).clamp(8, 512) })
}

/// `c` fitted to `rows`: a multiple of the dtype's sublanes, at most all the rows (rounded up
/// to one); a block of 0 rows gives the heuristic.
pub fn fit(rows: usize, dim: usize, dtype: DType, c: RowsConfig) -> RowsConfig {
    let tile = sublanes(dtype);
    if c.block_rows == 0 {
        return default_config(rows, dim, dtype);
    }
    RowsConfig { block_rows: blocks::whole_tiles(c.block_rows, rows, tile) }
}

/// The bucket of a row problem: its dim rounded up to a power of two, and its dtype.
pub fn bucket(dim: usize, dtype: DType) -> String {
    format!("d{}/{dtype}", tables::bucket(dim, 128, 16384))
}

/// The (dtype, dim) pairs `torchtpu tables` tunes row ops at for `target`, at 4096 rows.
pub fn table_shapes(target: TableTarget) -> Vec<(DType, usize)> {
    let (dtypes, dims): (&[DType], &[usize]) = match target {
        TableTarget::Cpu => (&[DType::F32], &[1024, 4096]),
        TableTarget::Chip(_) => (&[DType::BF16, DType::F32], &[1024, 4096, 8192]),
    };
    dtypes.iter().flat_map(|&dtype| dims.iter().map(move |&dim| (dtype, dim))).collect()
}

/// The rows the table problems have.
pub const TABLE_ROWS: usize = 4096;

/// `eps` checked for `op`: finite (as the f32 the kernels use) and non-negative.
pub fn check_eps(op: &str, eps: f64) -> Result<(), Error> {
    if (eps as f32).is_finite() && eps >= 0.0 {
        return Ok(());
    }
    Err(Error::Shape(format!("{op}: eps must be finite (in f32) and non-negative; got {eps}")))
}

/// `x`'s rows and dim: its leading dims multiplied, and its last dim.
pub fn rows_of(op: &str, x: &HostArray) -> Result<(usize, usize), Error> {
    let Some((&dim, lead)) = x.shape().split_last() else {
        return Err(Error::Shape(format!("{op} normalizes over the last dim: x must have at least one")));
    };
    let rows = lead.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or_else(|| Error::Shape(format!("x {:?} has too many rows", x.shape())))?;
    Ok((rows, dim))
}

/// `a` in `shape` (its elements in row-major order).
pub fn reshaped(a: &HostArray, shape: &[usize]) -> Result<HostArray, Error> {
    a.reshape(shape).map_err(Error::Shape)
}

/// A per-column vector (a weight, a bias) as the kernels take it: `[1, dim]` like x's dtype;
/// zeros (never read) when absent.
pub fn vector_operand(name: &str, v: Option<&HostArray>, dim: usize, dtype: DType) -> Result<HostArray, Error> {
    match v {
        Some(v) if v.shape() == [dim] && v.dtype() == dtype => reshaped(v, &[1, dim]),
        Some(v) => Err(Error::Shape(format!("the {name} must be {dtype} [{dim}] like x's last dim; got {} {:?}", v.dtype(), v.shape()))),
        None => Ok(HostArray::from_f64(dtype, &ArrayD::zeros(vec![1, dim]))),
    }
}
