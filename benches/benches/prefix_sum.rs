//! A running sum along lanes (4096 × 128 f32) three ways: a scan of lane rolls, a triangular
//! matmul, and rolls emulated through a double-width scratch. Times each on the interpreter at
//! 8- and 256-row blocks, prints the roll scan's time over the matmul's measured alternately
//! call by call (the ratio a noisy machine cannot skew), and each one's TPU code size from
//! libtpu for every chip.

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;
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

/// Median interpreter times of the roll scan and the matmul, calls alternating.
fn roll_over_matmul(block_rows: usize) {
    let calls = [Scan::Roll, Scan::Matmul].map(|scan| problem(scan, block_rows).call());
    let inputs = problem(Scan::Roll, block_rows).random_inputs(&mut StdRng::seed_from_u64(0));
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..300 {
        for (call, t) in calls.iter().zip(&mut times) {
            let start = Instant::now();
            call.interpret(&inputs).expect("runs");
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let [roll, matmul] = times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    });
    println!("prefix_sum b{block_rows} interpret, alternating: roll {roll:.3} ms, matmul {matmul:.3} ms, roll/matmul {:.3}", roll / matmul);
}

fn prefix_sum(c: &mut Criterion) {
    code_sizes();
    for block_rows in [8, 256] {
        roll_over_matmul(block_rows);
    }
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
