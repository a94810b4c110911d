//! What the kernel tests share.

use ndarray::{Array, Dimension};

/// Asserts that `gradient` is `loss`'s at `at`, element by element (row-major), by central
/// differences.
pub fn assert_gradient<D: Dimension>(what: &str, loss: impl Fn(&Array<f64, D>) -> f64, at: &Array<f64, D>, gradient: &Array<f64, D>, tolerance: f64) {
    let h = 1e-6;
    for (k, &want) in gradient.iter().enumerate() {
        let nudged = |by: f64| {
            let mut a = at.as_standard_layout().into_owned();
            if let Some(v) = a.iter_mut().nth(k) {
                *v += by;
            }
            loss(&a)
        };
        let fd = (nudged(h) - nudged(-h)) / (2.0 * h);
        assert!((fd - want).abs() < tolerance, "{what}, element {k}: finite differences {fd}, gradient {want}");
    }
}
