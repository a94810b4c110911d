//! (b) Tiled matmul with an f32 VMEM accumulator; the K axis is `arbitrary`. A ragged K is
//! masked in the kernel, since padding would otherwise leak into valid outputs.

use ndarray::{ArrayD, Ix2};
use rand::rngs::StdRng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_arrays, Example};

#[tpu_kernel]
pub fn matmul<T: Float>(x: &Ref<T>, y: &Ref<T>, z: &mut Ref<T>, acc: &mut Scratch<f32>, k_total: usize) {
    let k = program_id(2);
    if k == 0 {
        acc.store(zeros());
    }
    let mut xb = x.load();
    let mut yb = y.load();
    let (bm, bk) = (xb.shape()[0], xb.shape()[1]);
    let bn = yb.shape()[1];
    if k_total % bk != 0 {
        let col = iota::<i32>([bm, bk], 1) + k * bk as i32;
        xb = select(col < k_total as i32, xb, 0.0);
        let row = iota::<i32>([bk, bn], 0) + k * bk as i32;
        yb = select(row < k_total as i32, yb, 0.0);
    }
    acc.store(acc.load() + dot(xb, yb));
    if k == num_programs(2) - 1 {
        z.store(acc.load().cast());
    }
}

pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// (bm, bn, bk).
    pub block: (usize, usize, usize),
    pub dtype: DType,
}

impl Example for Matmul {
    fn name(&self) -> String {
        let (bm, bn, bk) = self.block;
        format!("matmul/{}/m{}n{}k{}/b{bm}x{bn}x{bk}", self.dtype, self.m, self.n, self.k)
    }

    fn call(&self) -> PallasCall {
        let (bm, bn, bk) = self.block;
        let kernel = match self.dtype {
            DType::BF16 => matmul::kernel::<bf16>(self.k),
            _ => matmul::kernel::<f32>(self.k),
        };
        PallasCall::new(kernel)
            .grid([self.m.div_ceil(bm), self.n.div_ceil(bn), self.k.div_ceil(bk)])
            .in_specs([BlockSpec::new([bm, bk], |[i, _, k]| (i, k)), BlockSpec::new([bk, bn], |[_, j, k]| (k, j))])
            .out_specs([BlockSpec::new([bm, bn], |[i, j, _]| (i, j))])
            .out_shapes([[self.m, self.n]])
            .scratch([Vmem::new([bm, bn])])
            .dimension_semantics([Parallel, Parallel, Arbitrary])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(self.dtype, [self.m, self.k]), ValueType::new(self.dtype, [self.k, self.n])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let x = inputs[0].to_f64().into_dimensionality::<Ix2>().expect("x is 2-D");
        let y = inputs[1].to_f64().into_dimensionality::<Ix2>().expect("y is 2-D");
        vec![x.dot(&y).into_dyn()]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
