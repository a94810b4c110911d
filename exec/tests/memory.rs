//! A thousand compile-free executions in a row do not grow resident memory.

use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_testkernels::{matmul::Matmul, Example};

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

#[test]
fn repeated_executions_do_not_leak() {
    let ex = Matmul { m: 256, n: 256, k: 256, block: (128, 128, 128), dtype: DType::F32 };
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(1));
    let traced = ex.call().trace(&inputs.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    let compiled = Compiled::new(&traced, Backend::Cpu).expect("compiles");
    let buffers = compiled.upload(&inputs).expect("uploads");
    for _ in 0..100 {
        compiled.execute(&buffers).expect("runs");
    }
    let before = resident_bytes();
    for _ in 0..1000 {
        let out = compiled.execute(&buffers).expect("runs");
        assert_eq!(out.len(), 1);
    }
    let grown = resident_bytes().saturating_sub(before);
    // Each output is 256 KiB: a leak of one per run would grow by 256 MB.
    assert!(grown < 16 << 20, "resident memory grew by {} MiB over 1000 runs", grown >> 20);
}
