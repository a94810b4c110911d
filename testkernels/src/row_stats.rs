//! (e) A counted loop carrying two values: per-row mean and variance, reading the row in
//! 128-wide chunks with dynamic slices inside a loop whose bound is traced.

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_arrays, Example};

pub const CHUNK: usize = 128;

#[tpu_kernel]
pub fn row_stats<T: Float>(x: &Ref<T>, mean: &mut Ref<f32>, var: &mut Ref<f32>, chunks: i32) {
    let br = x.shape()[0];
    let mut sum = Tile::<f32>::full([br, 1], 0.0);
    let mut sum_sq = Tile::<f32>::full([br, 1], 0.0);
    for c in 0..Scalar::constant(chunks) {
        let xc = x.load_at((.., ds(c * CHUNK as i32, CHUNK))).cast::<f32>();
        sum = sum + xc.sum_keepdims(1);
        sum_sq = sum_sq + (xc * xc).sum_keepdims(1);
    }
    let n = (chunks as usize * CHUNK) as f32;
    let mu = sum / n;
    mean.store(mu);
    var.store(sum_sq / n - mu * mu);
}

pub struct RowStats {
    pub rows: usize,
    pub chunks: usize,
    pub block_rows: usize,
    pub dtype: DType,
}

impl Example for RowStats {
    fn name(&self) -> String {
        format!("row_stats/{}/{}x{}/b{}", self.dtype, self.rows, self.chunks * CHUNK, self.block_rows)
    }

    fn call(&self) -> PallasCall {
        let br = self.block_rows;
        let cols = self.chunks * CHUNK;
        let kernel = match self.dtype {
            DType::BF16 => row_stats::kernel::<bf16>(self.chunks as i32),
            _ => row_stats::kernel::<f32>(self.chunks as i32),
        };
        PallasCall::new(kernel)
            .grid([self.rows.div_ceil(br)])
            .in_specs([BlockSpec::new([br, cols], |[i]| (i, 0))])
            .out_specs([BlockSpec::new([br, 1], |[i]| (i, 0)), BlockSpec::new([br, 1], |[i]| (i, 0))])
            .out_shapes([[self.rows, 1], [self.rows, 1]])
            .dimension_semantics([Parallel])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(self.dtype, [self.rows, self.chunks.saturating_mul(CHUNK)])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let x = inputs[0].to_f64();
        let mean = x.mean_axis(Axis(1)).expect("non-empty rows").insert_axis(Axis(1));
        let var = x.var_axis(Axis(1), 0.0).insert_axis(Axis(1));
        vec![mean, var]
    }

    /// Outputs are f32 whatever the input dtype.
    fn dtype(&self) -> DType {
        DType::F32
    }
}
