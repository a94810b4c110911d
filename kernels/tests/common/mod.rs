//! What the kernel tests share (each test binary uses what it needs of it).
#![allow(dead_code)]

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
        assert!(approx::abs_diff_eq!(fd, want, epsilon = tolerance), "{what}, element {k}: finite differences {fd}, gradient {want}");
    }
}

/// Asserts that `o` on `p` agrees with its f64 reference on `inputs`, output by output, within
/// `factor` times the dtype's tolerance: on the checked interpreter at the (small, ragged) config
/// `small`, and on PJRT CPU at the config a call would get. `seed` is reported on failure.
pub fn assert_matches_f64<O: torchtpu_kernels::op::Op>(
    o: &O,
    p: &O::Problem,
    small: O::Config,
    inputs: &[torchtpu_dsl::HostArray],
    dtype: torchtpu_dsl::DType,
    factor: f64,
    seed: u64,
) {
    use torchtpu_dsl::accuracy::{relative_error, tolerance};
    let want = o.reference(p, inputs);
    let checked = o.call(p, &o.fit(p, small)).expect("call").interpret_checked(inputs).expect("interprets");
    let on_cpu = torchtpu_kernels::op::run(o, p, None, inputs, torchtpu_exec::Backend::Cpu).expect("runs on PJRT CPU");
    for (how, outputs) in [("interpreter", checked), ("PJRT CPU", on_cpu)] {
        assert_eq!(outputs.len(), want.len(), "{} on {how}: output count", o.name());
        for (i, (got, w)) in outputs.iter().zip(&want).enumerate() {
            let err = relative_error(got, w);
            assert!(err <= factor * tolerance(dtype), "{} {p:?} output {i} on {how} (seed {seed}): {err:e}", o.name());
        }
    }
}
