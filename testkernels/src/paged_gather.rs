//! (h) A paged gather by manual DMA: `pages` (`[num_pages, page_rows, dim]`) stays in HBM, and
//! output block `i` is page `table[i]`, picked through a scalar-prefetch page table and moved
//! by a double-buffered pipeline the kernel runs itself: while step `i` copies its page out of
//! one VMEM slot, the copy of the next page into the other slot is in flight (the shape of
//! ragged paged attention's KV fetch).

use ndarray::{ArrayD, Axis};
use rand::rngs::StdRng;
use rand::Rng;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;

use crate::{random_array, Example};

#[tpu_kernel]
pub fn paged_gather<T: Float>(table: &Prefetch<i32>, pages: &Ref<T>, out: &mut Ref<T>, buf: &mut Scratch<T>, sems: &mut Scratch<DmaSemaphore>) {
    let i = program_id(0);
    let slot = i % 2;
    let fetch = |step: Scalar<i32>, into: Scalar<i32>| async_copy(pages.at((table.get([step]), .., ..)), buf.at((into, .., ..)), sems.at([into]));
    if i == 0 {
        fetch(i, slot).start();
    }
    if i + 1 < num_programs(0) {
        fetch(i + 1, 1 - slot).start();
    }
    fetch(i, slot).wait();
    out.store(buf.load_at((slot, .., ..)));
}

pub struct PagedGather {
    pub pages: usize,
    pub page_rows: usize,
    pub dim: usize,
    /// Pages gathered: the grid.
    pub gathered: usize,
    pub dtype: DType,
}

impl Example for PagedGather {
    fn name(&self) -> String {
        format!("paged_gather/{}/p{}x{}x{}/n{}", self.dtype, self.pages, self.page_rows, self.dim, self.gathered)
    }

    fn call(&self) -> PallasCall {
        let (p, d) = (self.page_rows, self.dim);
        let kernel = match self.dtype {
            DType::BF16 => paged_gather::kernel::<bf16>(),
            _ => paged_gather::kernel::<f32>(),
        };
        PallasCall::new(kernel)
            .grid([self.gathered])
            .in_specs([BlockSpec::any()])
            .out_specs([BlockSpec::new([None, Some(p), Some(d)], |[i]| (i, 0, 0))])
            .out_shapes([[self.gathered, p, d]])
            .scratch([Vmem::new([2, p, d]), DmaSemaphores::new(2)])
            .dimension_semantics([Arbitrary])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(DType::I32, [self.gathered]), ValueType::new(self.dtype, [self.pages, self.page_rows, self.dim])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        let table = ndarray::Array1::from_shape_fn(self.gathered, |_| rng.random_range(0..self.pages as i32));
        vec![HostArray::from(table), random_array(rng, self.dtype, &[self.pages, self.page_rows, self.dim])]
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let (table, pages) = (inputs[0].to_f64(), inputs[1].to_f64());
        let picked: Vec<usize> = table.iter().map(|&t| t as usize).collect();
        vec![pages.select(Axis(0), &picked)]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
