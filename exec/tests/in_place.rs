//! Running on raw host memory: the same results as host arrays, and bad sizes are errors.

use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_testkernels::{matmul::Matmul, Example};

fn f32_bytes(a: &HostArray) -> Vec<u8> {
    a.to_f64().iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
}

#[test]
fn run_in_place_matches_run_and_checks_sizes() {
    let ex = Matmul { m: 200, n: 72, k: 136, block: (64, 64, 64), dtype: DType::F32 };
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(3));
    let traced = ex.call().trace(&inputs.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    let compiled = Compiled::new(&traced, Backend::Cpu).expect("compiles");
    let want = f32_bytes(&compiled.run(&inputs).expect("runs")[0]);

    let (a, b) = (f32_bytes(&inputs[0]), f32_bytes(&inputs[1]));
    let mut out = vec![0u8; 200 * 72 * 4];
    // Repeated runs: the borrowed operands are released each time, and nothing goes stale.
    for _ in 0..3 {
        out.fill(0);
        compiled.run_in_place(&[&a, &b], &mut [&mut out]).expect("runs in place");
        assert_eq!(out, want);
    }

    let short = &a[..a.len() - 4];
    let err = compiled.run_in_place(&[short, &b], &mut [&mut out]).expect_err("a short operand");
    assert!(err.to_string().contains("operand 0"), "{err}");
    let mut small = vec![0u8; 16];
    let err = compiled.run_in_place(&[&a, &b], &mut [&mut small]).expect_err("a short output");
    assert!(err.to_string().contains("output 0"), "{err}");
    let err = compiled.run_in_place(&[&a], &mut [&mut out]).expect_err("a missing operand");
    assert!(err.to_string().contains("expected 2 operands"), "{err}");
}

#[test]
fn run_to_host_gives_outputs_on_every_backend() {
    use torchtpu_exec::Prepared;
    let ex = Matmul { m: 96, n: 40, k: 72, block: (32, 40, 24), dtype: DType::F32 };
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(4));
    let traced = ex.call().trace(&inputs.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    let want = f32_bytes(&ex.call().interpret(&inputs).expect("interprets")[0]);
    let (a, b) = (f32_bytes(&inputs[0]), f32_bytes(&inputs[1]));
    for backend in [Backend::Cpu, Backend::Interpret] {
        let prepared = Prepared::new(&traced, backend).expect("prepares");
        let first = prepared.run_to_host(&[&a, &b]).expect("runs");
        let second = prepared.run_to_host(&[&a, &b]).expect("runs again");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].value_type, traced.outputs[0].array);
        // Two runs, two live outputs: each keeps its own memory.
        assert_ne!(first[0].bytes().as_ptr(), second[0].bytes().as_ptr());
        for out in [&first[0], &second[0]] {
            let got: Vec<f32> = out.bytes().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let exp: Vec<f32> = want.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            assert!(got.iter().zip(&exp).all(|(x, y)| approx::relative_eq!(x, y, epsilon = 1e-4, max_relative = 1e-4)), "{backend}");
        }
        let err = prepared.run_to_host(&[&a]).err().expect("a missing operand");
        assert!(err.to_string().contains("expected 2 operands"), "{err}");
    }
}
