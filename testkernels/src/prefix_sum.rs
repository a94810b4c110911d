//! (g) A running sum along the lanes of each row, written three ways a Pallas author would:
//! a Hillis–Steele scan of lane rolls, a product with an upper-triangular matrix of ones, and
//! the roll emulated by storing into a double-width scratch and loading shifted windows (what a
//! port did before the language had a roll).

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;

use crate::{random_arrays, Example};

/// Adds, for each `k` in 1, 2, 4, ..., the row shifted right by `k` lanes (zeros shifted in).
#[tpu_kernel]
pub fn prefix_sum_roll(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut acc = x.load();
    let shape = acc.shape();
    let lane = iota::<i32>(&shape, 1);
    let mut k = 1;
    while k < shape[1] {
        acc = acc + select(lane >= k as i32, acc.roll(k as i32, 1), 0.0);
        k *= 2;
    }
    y.store(acc);
}

/// `x · U` with `U[i, j] = 1` for `i <= j`, on the MXU.
#[tpu_kernel]
pub fn prefix_sum_matmul(x: &Ref<f32>, y: &mut Ref<f32>) {
    let n = x.shape()[1];
    let upper = select(iota::<i32>([n, n], 0) <= iota::<i32>([n, n], 1), Tile::<f32>::full([n, n], 1.0), 0.0);
    y.store(dot(x.load(), upper));
}

/// The scan with each shift done through memory: the row is stored at lane `n` of a scratch
/// of `2n` lanes whose first half is zero, and read back from lane `n - k`.
#[tpu_kernel]
pub fn prefix_sum_scratch(x: &Ref<f32>, y: &mut Ref<f32>, wide: &mut Scratch<f32>) {
    let mut acc = x.load();
    let shape = acc.shape();
    let n = shape[1];
    wide.store_at((.., 0..n), Tile::<f32>::full(&shape, 0.0));
    let mut k = 1;
    while k < n {
        wide.store_at((.., n..2 * n), acc);
        acc = acc + wide.load_at((.., ds(n - k, n)));
        k *= 2;
    }
    y.store(acc);
}

/// Which formulation a [`PrefixSum`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    Roll,
    Matmul,
    Scratch,
}

pub struct PrefixSum {
    pub rows: usize,
    pub block_rows: usize,
    pub scan: Scan,
}

/// Lanes per row: one vreg wide, as the port.
pub const LANES: usize = 128;

impl Example for PrefixSum {
    fn name(&self) -> String {
        format!("prefix_sum/{:?}/{}x{LANES}/b{}", self.scan, self.rows, self.block_rows)
    }

    fn call(&self) -> PallasCall {
        let kernel = match self.scan {
            Scan::Roll => prefix_sum_roll::kernel(),
            Scan::Matmul => prefix_sum_matmul::kernel(),
            Scan::Scratch => prefix_sum_scratch::kernel(),
        };
        let call = PallasCall::new(kernel)
            .grid([self.rows.div_ceil(self.block_rows)])
            .in_specs([BlockSpec::new([self.block_rows, LANES], |[i]| (i, 0))])
            .out_specs([BlockSpec::new([self.block_rows, LANES], |[i]| (i, 0))])
            .out_shapes([[self.rows, LANES]])
            .dimension_semantics([Parallel]);
        if self.scan == Scan::Scratch {
            call.scratch([Vmem::new([self.block_rows, 2 * LANES])])
        } else {
            call
        }
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(DType::F32, [self.rows, LANES])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let mut x = inputs[0].to_f64();
        x.accumulate_axis_inplace(Axis(1), |&prev, cur| *cur += prev);
        vec![x]
    }

    fn dtype(&self) -> DType {
        DType::F32
    }
}
