//! The user's ops against their f64 reference on the interpreter (checked) and PJRT CPU, at
//! ragged shapes; every tuned table entry compiles for its target; the command line serves them.

use torchtpu::dsl::accuracy::{relative_error, tolerance};
use torchtpu::kernels::op;
use torchtpu::prelude::*;
use torchtpu::rand::{self, SeedableRng};
use user_ops::{Problem, Softcap};

#[test]
fn match_the_reference_on_every_backend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (rows, dim) in [(1, 128), (37, 200), (300, 1024)] {
        for dtype in [DType::F32, DType::BF16] {
            let p = Problem { rows, dim, dtype, cap: 2.5 };
            for op in [Softcap::Forward, Softcap::Backward] {
                let inputs = op.random_inputs(&p, &mut rng);
                let want = op.reference(&p, &inputs);
                let interpreted = op.call(&p, &op.default_config(&p)).expect("call").interpret_checked(&inputs).expect("interprets");
                let on_cpu = op::run(&op, &p, None, &inputs, Backend::Cpu).expect("runs on PJRT CPU");
                for outputs in [interpreted, on_cpu] {
                    for (o, w) in outputs.iter().zip(&want) {
                        assert!(relative_error(o, w) <= tolerance(dtype), "{op:?} {p:?}: {}", relative_error(o, w));
                    }
                }
            }
        }
    }
}

#[test]
fn the_ops_read_the_crates_own_tables() {
    for target in TableTarget::ALL {
        let entry = Softcap::Forward.tables().entry(target, "softcap", "d4096/f32");
        assert!(entry.is_some_and(|e| e.get("block_cols").is_some()), "{target:?}: {entry:?}");
    }
}

#[test]
fn every_table_entry_compiles_and_the_cli_serves_the_ops() {
    let cli = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_user-ops")).args(args).output().expect("runs");
    let out = cli(&["list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("softcap ") && listed.contains("softcap_backward "), "{listed}");
    for op in ["softcap", "softcap_backward"] {
        for dtype in ["f32", "bf16"] {
            // `check` compiles with each chip's table entry: every entry the tables hold.
            let out = cli(&["check", op, "--dtype", dtype]);
            assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let out = cli(&["run", op, "--set", "rows=100,dim=300"]);
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}
