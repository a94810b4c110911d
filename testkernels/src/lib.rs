//! The acceptance kernels, each with its problem setup, random inputs and an independent
//! f64 reference: what the interpreter, code generators and runtime are tested against.

pub mod add;
pub mod flash;
pub mod gather;
pub mod matmul;
pub mod paged_gather;
pub mod prefix_sum;
pub mod row_stats;
pub mod softmax;

use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
pub use torchtpu_dsl::accuracy::{relative_error, tolerance};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, PallasCall};

/// One acceptance problem: a kernel at one shape, block shape and dtype.
pub trait Example: Send + Sync {
    /// A name that says what and at which configuration, e.g. `matmul/f32/m256n256k256/b128x128x128`.
    fn name(&self) -> String;
    fn call(&self) -> PallasCall;
    /// The types of the scalar-prefetch arrays, then the inputs: known without making them.
    fn operand_types(&self) -> Vec<ValueType>;
    /// Scalar-prefetch arrays, then inputs.
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray>;
    /// The outputs computed in f64 from the same inputs, independently of the kernel.
    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>>;
    /// The dtype the outputs are compared in; sets the tolerance.
    fn dtype(&self) -> DType;
}

/// Normal(0, 1) samples of each type.
pub fn random_arrays(rng: &mut StdRng, types: &[ValueType]) -> Vec<HostArray> {
    types.iter().map(|t| random_array(rng, t.dtype, &t.shape)).collect()
}

/// Normal(0, 1) samples of `shape`, rounded to `dtype`.
pub fn random_array(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    let a = ArrayD::from_shape_simple_fn(shape.to_vec(), || StandardNormal.sample(rng));
    HostArray::from_f64(dtype, &a)
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

/// Each kernel family's settings for [`configure`], with their defaults.
pub const FAMILIES: &[(&str, &[(&str, usize)])] = &[
    ("add", &[("rows", 64), ("cols", 256), ("br", 16), ("bc", 128)]),
    ("matmul", &[("m", 256), ("n", 256), ("k", 256), ("bm", 128), ("bn", 128), ("bk", 128)]),
    ("softmax", &[("rows", 100), ("cols", 256), ("br", 32)]),
    ("flash_attention", &[("batch", 1), ("heads", 2), ("seq", 256), ("head_dim", 64), ("bq", 64), ("bk", 64)]),
    ("row_stats", &[("rows", 40), ("chunks", 3), ("br", 16)]),
    ("gather", &[("pages", 50), ("dim", 128), ("indices", 17)]),
];

/// The largest value a shape or block setting takes.
pub const MAX_SETTING: usize = i32::MAX as usize;

/// A kernel family in `dtype` with `settings` (`key`, value) over its defaults.
pub fn configure(family: &str, dtype: DType, settings: &[(String, usize)]) -> Result<Box<dyn Example>, String> {
    let Some((_, defaults)) = FAMILIES.iter().find(|(f, _)| *f == family) else {
        let names: Vec<&str> = FAMILIES.iter().map(|(f, _)| *f).collect();
        return Err(format!("no kernel family `{family}`; expected one of {}", names.join(", ")));
    };
    let mut values: Vec<(&str, usize)> = defaults.to_vec();
    for (key, value) in settings {
        match values.iter_mut().find(|(k, _)| k == key) {
            Some(slot) if *value > 0 && *value <= MAX_SETTING => slot.1 = *value,
            Some(_) => return Err(format!("`{key}={value}`: settings must be between 1 and {MAX_SETTING} (grid indices are i32)")),
            None => {
                let keys: Vec<&str> = defaults.iter().map(|(k, _)| *k).collect();
                return Err(format!("`{family}` has no setting `{key}`; it takes {}", keys.join(", ")));
            }
        }
    }
    let v = |k: &str| values.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
    Ok(match family {
        "add" => Box::new(add::Add { rows: v("rows"), cols: v("cols"), block: (v("br"), v("bc")), dtype }),
        "matmul" => Box::new(matmul::Matmul { m: v("m"), n: v("n"), k: v("k"), block: (v("bm"), v("bn"), v("bk")), dtype }),
        "softmax" => Box::new(softmax::Softmax { rows: v("rows"), cols: v("cols"), block_rows: v("br"), dtype }),
        "flash_attention" => Box::new(flash::Flash { batch: v("batch"), heads: v("heads"), seq: v("seq"), head_dim: v("head_dim"), block_q: v("bq"), block_k: v("bk"), dtype }),
        "row_stats" => Box::new(row_stats::RowStats { rows: v("rows"), chunks: v("chunks"), block_rows: v("br"), dtype }),
        _ => Box::new(gather::Gather { pages: v("pages"), dim: v("dim"), indices: v("indices"), dtype }),
    })
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
        v.push(Box::new(paged_gather::PagedGather { pages: 40, page_rows: 16, dim: 128, gathered: 9, dtype }));
    }
    for scan in [prefix_sum::Scan::Roll, prefix_sum::Scan::Matmul, prefix_sum::Scan::Scratch] {
        v.push(Box::new(prefix_sum::PrefixSum { rows: 40, block_rows: 16, scan }));
    }
    v
}
