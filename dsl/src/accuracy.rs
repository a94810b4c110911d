//! How close a kernel's output must come to its f64 reference: one tolerance per dtype and one
//! error measure, shared by the CLI, the tests and the benches.

use ndarray::ArrayD;

use crate::dtype::DType;
use crate::host::HostArray;

/// Relative tolerance on [`relative_error`] for outputs of `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        _ => 0.0,
    }
}

/// `max |out - ref| / max(1, max |ref|)`; NaN anywhere in `out`, or a shape that differs,
/// gives infinity.
pub fn relative_error(out: &HostArray, reference: &ArrayD<f64>) -> f64 {
    let out = out.to_f64();
    if out.shape() != reference.shape() {
        return f64::INFINITY;
    }
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = out.iter().zip(reference).fold(0.0f64, |m, (o, r)| if o.is_nan() { f64::INFINITY } else { m.max((o - r).abs()) });
    err / scale
}
