//! The acceptance kernels, each with its problem setup, random inputs and an independent
//! f64 reference: what the interpreter, code generators and runtime are tested against.

pub mod add;
pub mod flash;
pub mod gather;
pub mod matmul;
pub mod row_stats;
pub mod softmax;

use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use torchtpu_dsl::{DType, HostArray, PallasCall};

/// One acceptance problem: a kernel at one shape, block shape and dtype.
pub trait Example: Send + Sync {
    /// A name that says what and at which configuration, e.g. `matmul/f32/m256n256k256/b128x128x128`.
    fn name(&self) -> String;
    fn call(&self) -> PallasCall;
    /// Scalar-prefetch arrays, then inputs.
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray>;
    /// The outputs computed in f64 from the same inputs, independently of the kernel.
    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>>;
    /// The dtype the outputs are compared in; sets the tolerance.
    fn dtype(&self) -> DType;
}

/// Normal(0, 1) samples of `shape`, rounded to `dtype`.
pub fn random_array(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    let a = ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng));
    HostArray::from_f64(dtype, &a)
}

/// Relative tolerance on `max |out - ref| / max(1, max |ref|)` for outputs of `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        _ => 0.0,
    }
}

/// `max |out - ref| / max(1, max |ref|)`; NaN anywhere in `out` gives infinity.
pub fn relative_error(out: &HostArray, reference: &ArrayD<f64>) -> f64 {
    let out = out.to_f64();
    if out.shape() != reference.shape() {
        return f64::INFINITY;
    }
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = out.iter().zip(reference).fold(0.0f64, |m, (o, r)| if o.is_nan() { f64::INFINITY } else { m.max((o - r).abs()) });
    err / scale
}

/// The tiled kernels at more block shapes, for compile checks across chips.
pub fn block_shape_variants() -> Vec<Box<dyn Example>> {
    let mut v: Vec<Box<dyn Example>> = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for block in [(128, 128, 128), (256, 512, 256), (512, 256, 512)] {
            v.push(Box::new(matmul::Matmul { m: 1024, n: 1024, k: 1024, block, dtype }));
        }
        for (block_q, block_k) in [(128, 128), (256, 128), (128, 512)] {
            v.push(Box::new(flash::Flash { batch: 1, heads: 2, seq: 1024, head_dim: 128, block_q, block_k, dtype }));
        }
        for block_rows in [8, 64, 256] {
            v.push(Box::new(softmax::Softmax { rows: 512, cols: 512, block_rows, dtype }));
        }
    }
    v
}

/// The acceptance example called `name`: a full name from [`acceptance_set`], or a kernel
/// family (`matmul`, `flash_attention`...) for its first configuration in `dtype`.
pub fn find(name: &str, dtype: DType) -> Option<Box<dyn Example>> {
    let family = format!("{name}/{dtype}/");
    acceptance_set().into_iter().find(|e| e.name() == name || e.name().starts_with(&family))
}

/// A small, fast set covering every kernel, both float dtypes and ragged shapes.
pub fn acceptance_set() -> Vec<Box<dyn Example>> {
    let mut v: Vec<Box<dyn Example>> = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        v.push(Box::new(add::Add { rows: 64, cols: 256, block: (16, 128), dtype }));
        v.push(Box::new(add::Add { rows: 50, cols: 300, block: (16, 128), dtype }));
        v.push(Box::new(matmul::Matmul { m: 256, n: 256, k: 256, block: (128, 128, 128), dtype }));
        v.push(Box::new(matmul::Matmul { m: 200, n: 136, k: 300, block: (64, 128, 128), dtype }));
        v.push(Box::new(softmax::Softmax { rows: 100, cols: 256, block_rows: 32, dtype }));
        v.push(Box::new(flash::Flash { batch: 1, heads: 2, seq: 256, head_dim: 64, block_q: 64, block_k: 64, dtype }));
        v.push(Box::new(flash::Flash { batch: 2, heads: 1, seq: 200, head_dim: 32, block_q: 64, block_k: 32, dtype }));
        v.push(Box::new(row_stats::RowStats { rows: 40, chunks: 3, block_rows: 16, dtype }));
        v.push(Box::new(gather::Gather { pages: 50, dim: 128, indices: 17, dtype }));
    }
    v
}
