//! A running sum along lanes (4096 × 128 f32) three ways: a scan of lane rolls, a triangular
//! matmul, and rolls emulated through a double-width scratch. Times each on the interpreter at
//! 8- and 256-row blocks, and prints each one's TPU code size from libtpu for every chip.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::{lower, Target};
use torchtpu_runtime::{Chip, TpuCompiler};
use torchtpu_testkernels::prefix_sum::{PrefixSum, Scan};
use torchtpu_testkernels::Example;

const SCANS: [Scan; 3] = [Scan::Roll, Scan::Matmul, Scan::Scratch];

fn problem(scan: Scan, block_rows: usize) -> PrefixSum {
    PrefixSum { rows: 4096, block_rows, scan }
}

fn code_sizes() {
    let Ok(compiler) = TpuCompiler::shared() else {
        println!("prefix_sum code size: libtpu not found (run scripts/setup.sh)");
        return;
    };
    for scan in SCANS {
        let p = problem(scan, 256);
        let traced = p.call().trace(&p.operand_types()).expect("traces");
        let module = lower(&traced, Target::TpuStableHlo).expect("lowers");
        let sizes: Vec<String> = Chip::ALL
            .iter()
            .map(|&chip| match compiler.compile(chip, &module) {
                Ok(m) => format!("{chip} {} B", m.code_size_bytes),
                Err(e) => format!("{chip} failed: {}", e.message),
            })
            .collect();
        println!("prefix_sum code size {scan:?}: {}", sizes.join(", "));
    }
}

fn prefix_sum(c: &mut Criterion) {
    code_sizes();
    let mut group = c.benchmark_group("prefix_sum_4096x128_f32/interpret");
    group.sample_size(20);
    for block_rows in [8, 256] {
        for scan in SCANS {
            let p = problem(scan, block_rows);
            let inputs = p.random_inputs(&mut StdRng::seed_from_u64(0));
            let call = p.call();
            group.bench_function(format!("b{block_rows}/{scan:?}"), |b| b.iter(|| call.interpret(&inputs).expect("runs")));
        }
    }
    group.finish();
}

criterion_group!(benches, prefix_sum);
criterion_main!(benches);
