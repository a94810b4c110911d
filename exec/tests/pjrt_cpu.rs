//! Every acceptance kernel on the PJRT CPU plugin: equal to the interpreter (within the
//! dtype's tolerance) and to its f64 reference, on fresh random inputs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_exec::{run, Backend};
use torchtpu_testkernels::{acceptance_set, relative_error, tolerance};

#[test]
fn acceptance_kernels_on_pjrt_cpu_match_interpreter_and_reference() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut failures = Vec::new();
    for example in acceptance_set() {
        let mut rng = StdRng::seed_from_u64(seed);
        let inputs = example.random_inputs(&mut rng);
        let call = example.call();
        let device = match run(&call, Backend::Cpu, &inputs) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{}: {e}", example.name()));
                continue;
            }
        };
        let interpreted = run(&call, Backend::Interpret, &inputs).expect("interprets");
        let reference = example.reference(&inputs);
        let tol = tolerance(example.dtype());
        for (i, ((d, n), r)) in device.iter().zip(&interpreted).zip(&reference).enumerate() {
            let vs_ref = relative_error(d, r);
            let vs_interp = relative_error(d, &n.to_f64());
            if vs_ref > tol || vs_interp > tol {
                failures.push(format!("{} output {i}: vs reference {vs_ref:e}, vs interpreter {vs_interp:e} (tolerance {tol:e})", example.name()));
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}
