//! (c) Row softmax over whole rows, computed in f32.

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_arrays, Example};

#[tpu_kernel]
pub fn softmax<T: Float>(x: &Ref<T>, y: &mut Ref<T>) {
    let x = x.load().cast::<f32>();
    let e = (x - x.max_keepdims(1)).exp();
    y.store((e / e.sum_keepdims(1)).cast());
}

pub struct Softmax {
    pub rows: usize,
    pub cols: usize,
    pub block_rows: usize,
    pub dtype: DType,
}

impl Example for Softmax {
    fn name(&self) -> String {
        format!("softmax/{}/{}x{}/b{}", self.dtype, self.rows, self.cols, self.block_rows)
    }

    fn call(&self) -> PallasCall {
        let br = self.block_rows;
        let kernel = match self.dtype {
            DType::BF16 => softmax::kernel::<bf16>(),
            _ => softmax::kernel::<f32>(),
        };
        PallasCall::new(kernel)
            .grid([self.rows.div_ceil(br)])
            .in_specs([BlockSpec::new([br, self.cols], |[i]| (i, 0))])
            .out_specs([BlockSpec::new([br, self.cols], |[i]| (i, 0))])
            .out_shapes([[self.rows, self.cols]])
            .dimension_semantics([Parallel])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(self.dtype, [self.rows, self.cols])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let mut x = inputs[0].to_f64();
        for mut row in x.axis_iter_mut(Axis(0)) {
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            row.mapv_inplace(|v| (v - m).exp());
            let s = row.sum();
            row.mapv_inplace(|v| v / s);
        }
        vec![x]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
