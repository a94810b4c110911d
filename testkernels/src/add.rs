//! (a) Broadcasting elementwise add: `z[i, j] = x[i, j] + y[0, j]`.

use ndarray::ArrayD;
use rand::rngs::StdRng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_arrays, Example};

#[tpu_kernel]
pub fn add_rows<T: Float>(x: &Ref<T>, y: &Ref<T>, z: &mut Ref<T>) {
    z.store(x.load() + y.load());
}

pub struct Add {
    pub rows: usize,
    pub cols: usize,
    /// (rows, cols) of a block.
    pub block: (usize, usize),
    pub dtype: DType,
}

impl Example for Add {
    fn name(&self) -> String {
        format!("add/{}/{}x{}/b{}x{}", self.dtype, self.rows, self.cols, self.block.0, self.block.1)
    }

    fn call(&self) -> PallasCall {
        let (br, bc) = self.block;
        let kernel = match self.dtype {
            DType::BF16 => add_rows::kernel::<bf16>(),
            _ => add_rows::kernel::<f32>(),
        };
        PallasCall::new(kernel)
            .grid([self.rows.div_ceil(br), self.cols.div_ceil(bc)])
            .in_specs([BlockSpec::new([br, bc], |[i, j]| (i, j)), BlockSpec::new([1, bc], |[_, j]| (0, j))])
            .out_specs([BlockSpec::new([br, bc], |[i, j]| (i, j))])
            .out_shapes([[self.rows, self.cols]])
            .dimension_semantics([Parallel, Parallel])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(self.dtype, [self.rows, self.cols]), ValueType::new(self.dtype, [1, self.cols])]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let (x, y) = (inputs[0].to_f64(), inputs[1].to_f64());
        let z = ArrayD::from_shape_fn(x.raw_dim(), |ix| x[&ix] + y[[0, ix[1]]]);
        vec![z]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
