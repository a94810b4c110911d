//! Keeping a partial block's padding out of sums: the last block along a dim that its block
//! does not divide holds whatever memory follows the array (NaN, say), and a select, not a
//! product with 0, keeps it from reaching a dot or a reduction.

use torchtpu_dsl::prelude::*;

/// `x` with the positions along `dim` from `start` on that lie past `len` set to 0.
#[tpu_fn]
pub fn zero_outside<T: Float>(x: Tile<T>, dim: usize, start: Scalar<i32>, len: usize) -> Tile<T> {
    let shape = x.shape();
    select(iota::<i32>(&shape, dim) + start < len as i32, x, 0.0)
}
