//! (f) A gather whose index map reads a scalar-prefetch table: output block `g` is page
//! `indices[g]` of the table. Pages are 8 rows, the TPU's sublane tile, as in paged attention.

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use rand::Rng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_array, Example};

/// Rows per page: one (8, 128) tile high, so a page is a legal TPU block.
pub const PAGE_ROWS: usize = 8;

#[tpu_kernel]
pub fn gather_pages<T: Float>(_indices: &Prefetch<i32>, table: &Ref<T>, out: &mut Ref<T>) {
    out.store(table.load());
}

pub struct Gather {
    /// Pages in the table.
    pub pages: usize,
    pub dim: usize,
    /// Pages gathered.
    pub indices: usize,
    pub dtype: DType,
}

impl Example for Gather {
    fn name(&self) -> String {
        format!("gather/{}/p{}x{PAGE_ROWS}d{}/n{}", self.dtype, self.pages, self.dim, self.indices)
    }

    fn call(&self) -> PallasCall {
        let d = self.dim;
        let kernel = match self.dtype {
            DType::BF16 => gather_pages::kernel::<bf16>(),
            _ => gather_pages::kernel::<f32>(),
        };
        PallasCall::new(kernel)
            .grid([self.indices])
            .in_specs([BlockSpec::with_prefetch([None, Some(PAGE_ROWS), Some(d)], |[g], pf| (pf[0].get([g]), 0, 0))])
            .out_specs([BlockSpec::new([None, Some(PAGE_ROWS), Some(d)], |[g]| (g, 0, 0))])
            .out_shapes([[self.indices, PAGE_ROWS, d]])
            .dimension_semantics([Parallel])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(DType::I32, [self.indices]), ValueType::new(self.dtype, [self.pages, PAGE_ROWS, self.dim])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        let idx = ndarray::Array1::from_shape_fn(self.indices, |_| rng.random_range(0..self.pages as i32));
        vec![HostArray::from(idx), random_array(rng, self.dtype, &[self.pages, PAGE_ROWS, self.dim])]
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let idx = inputs[0].to_f64();
        let table = inputs[1].to_f64();
        let pages: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        vec![table.select(Axis(0), &pages)]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
