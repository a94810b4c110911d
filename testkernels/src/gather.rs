//! (f) A row gather: the index map reads a scalar-prefetch table of row indices.

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use rand::Rng;
use torchtpu_dsl::prelude::*;

use crate::{random_array, Example};

#[tpu_kernel]
pub fn gather_rows<T: Float>(_indices: &Prefetch<i32>, table: &Ref<T>, out: &mut Ref<T>) {
    out.store(table.load());
}

pub struct Gather {
    pub vocab: usize,
    pub dim: usize,
    pub indices: usize,
    pub dtype: DType,
}

impl Example for Gather {
    fn name(&self) -> String {
        format!("gather/{}/v{}d{}/n{}", self.dtype, self.vocab, self.dim, self.indices)
    }

    fn call(&self) -> PallasCall {
        let d = self.dim;
        let kernel = match self.dtype {
            DType::BF16 => gather_rows::kernel::<bf16>(),
            _ => gather_rows::kernel::<f32>(),
        };
        PallasCall::new(kernel)
            .grid([self.indices])
            .in_specs([BlockSpec::with_prefetch([None, Some(d)], |[g], pf| (pf[0].get([g]), 0))])
            .out_specs([BlockSpec::new([None, Some(d)], |[g]| (g, 0))])
            .out_shapes([[self.indices, d]])
            .dimension_semantics([Parallel])
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        let idx = ndarray::Array1::from_shape_fn(self.indices, |_| rng.random_range(0..self.vocab as i32));
        vec![HostArray::from(idx), random_array(rng, self.dtype, &[self.vocab, self.dim])]
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let idx = inputs[0].to_f64();
        let table = inputs[1].to_f64();
        let rows: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        vec![table.select(Axis(0), &rows)]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
