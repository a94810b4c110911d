//! Grouped matmul (`gmm`, its transposed-rhs form, `tgmm`) against f64 on fresh random inputs:
//! random group sizes with empty groups, one group holding every row and rows left over; row
//! counts that no block divides, f32 and bf16, on the interpreter (checked) and PJRT CPU;
//! group ends that would point outside the arrays refused; compiled by libtpu for every chip.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::gmm::{group_ends, random_group_sizes, GroupedConfig, GroupedOp, GroupedProblem};
use torchtpu_kernels::op::{self, Op};
use torchtpu_kernels::Error;
use torchtpu_runtime::{Chip, TpuCompiler};

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

/// Inputs for `o` on `p` with group sizes `sizes`.
fn inputs_with(o: GroupedOp, p: &GroupedProblem, sizes: &[i64], rng: &mut StdRng) -> Vec<HostArray> {
    let mut inputs = o.random_inputs(p, rng);
    inputs[0] = HostArray::from(ndarray::Array1::from(group_ends(sizes, p.m).expect("valid sizes")));
    inputs
}

#[test]
fn gmm_and_tgmm_match_f64_on_every_backend() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for (m, k, n, groups) in [(1, 128, 128, 1), (37, 300, 200, 3), (300, 256, 384, 5), (129, 64, 130, 8)] {
        for dtype in [DType::F32, DType::BF16] {
            for (o, transpose_rhs) in [(GroupedOp::Gmm, false), (GroupedOp::Gmm, true), (GroupedOp::Tgmm, false)] {
                let p = GroupedProblem { m, k, n, groups, dtype, transpose_rhs };
                let mut splits = vec![random_group_sizes(&mut rng, groups, m), random_group_sizes(&mut rng, groups, m)];
                // One group holding every row, and every row left over.
                splits.push((0..groups).map(|j| if j == groups - 1 { m as i64 } else { 0 }).collect());
                splits.push(vec![0; groups]);
                for sizes in splits {
                    let inputs = inputs_with(o, &p, &sizes, &mut rng);
                    let small = GroupedConfig { bm: 16, bk: 128, bn: 128 };
                    let factor = if dtype == DType::BF16 { 2.0 } else { 4.0 };
                    common::assert_matches_f64(&o, &p, small, &inputs, dtype, factor, seed);
                }
            }
        }
    }
}

#[test]
fn every_block_size_gives_one_answer() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let p = GroupedProblem { m: 200, k: 256, n: 256, groups: 6, dtype: DType::F32, transpose_rhs: false };
    for o in [GroupedOp::Gmm, GroupedOp::Tgmm] {
        let sizes = random_group_sizes(&mut rng, p.groups, p.m);
        let inputs = inputs_with(o, &p, &sizes, &mut rng);
        let want = &o.reference(&p, &inputs)[0];
        for (bm, bk, bn) in [(8, 128, 128), (128, 256, 128), (256, 128, 256)] {
            let c = o.fit(&p, GroupedConfig { bm, bk, bn });
            let got = o.call(&p, &c).expect("call").interpret_checked(&inputs).expect("interprets");
            let err = torchtpu_dsl::accuracy::relative_error(&got[0], want);
            assert!(err <= 4.0 * torchtpu_dsl::accuracy::tolerance(p.dtype), "{o:?} at {c:?} (seed {seed}, sizes {sizes:?}): {err:e}");
        }
    }
}

#[test]
fn bad_group_sizes_are_errors() {
    assert!(matches!(group_ends(&[3, -1, 2], 10), Err(Error::Shape(m)) if m.contains("group 1 has -1")));
    assert!(matches!(group_ends(&[6, 6], 10), Err(Error::Shape(m)) if m.contains("more than lhs's 10 rows")));
    assert!(matches!(group_ends(&[i64::MAX, i64::MAX], 10), Err(Error::Shape(_))));
    assert_eq!(group_ends(&[0, 4, 0, 6], 10), Ok(vec![0, 4, 4, 10]));

    let p = GroupedProblem { m: 16, k: 128, n: 128, groups: 3, dtype: DType::F32, transpose_rhs: false };
    let mut rng = StdRng::seed_from_u64(1);
    for ends in [vec![4, 2, 8], vec![-1, 2, 8], vec![4, 8, 17]] {
        let mut inputs = GroupedOp::Gmm.random_inputs(&p, &mut rng);
        inputs[0] = HostArray::from(ndarray::Array1::from(ends.clone()));
        for backend in [Backend::Interpret, Backend::Cpu] {
            let err = op::run(&GroupedOp::Gmm, &p, None, &inputs, backend).expect_err("bad ends");
            assert!(err.to_string().contains("group sizes must be at least 0 and sum to at most 16"), "{ends:?}: {err}");
        }
    }
    assert!(GroupedOp::Gmm.check(&GroupedProblem { groups: 0, ..p }).is_err());
    assert!(GroupedOp::Tgmm.check(&GroupedProblem { transpose_rhs: true, ..p }).is_err());
    assert!(GroupedOp::Gmm.call(&p, &GroupedConfig { bm: 0, bk: 128, bn: 128 }).is_err());
}

#[test]
fn empty_problems_give_zeros() {
    let mut rng = StdRng::seed_from_u64(2);
    for (m, k, n) in [(0, 128, 128), (16, 0, 128), (16, 128, 0)] {
        for o in [GroupedOp::Gmm, GroupedOp::Tgmm] {
            let p = GroupedProblem { m, k, n, groups: 2, dtype: DType::F32, transpose_rhs: false };
            let inputs = o.random_inputs(&p, &mut rng);
            let out = op::run(&o, &p, None, &inputs, Backend::Cpu).expect("runs");
            assert_eq!(out[0].value_type(), o.output_types(&p)[0]);
            assert!(out[0].to_f64().iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (m, k, n, groups, dtype) in [(8192, 4096, 4096, 8, DType::BF16), (300, 300, 384, 5, DType::F32), (1000, 2048, 1408, 64, DType::BF16), (64, 128, 256, 256, DType::BF16)] {
        for (o, transpose_rhs) in [(GroupedOp::Gmm, false), (GroupedOp::Gmm, true), (GroupedOp::Tgmm, false)] {
            let p = GroupedProblem { m, k, n, groups, dtype, transpose_rhs };
            for chip in Chip::ALL {
                let module = op::tpu_module(&o, &p, None, chip).unwrap_or_else(|e| panic!("{o:?} {p:?}: {e}"));
                compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{o:?} {p:?} on {chip}: {e}"));
            }
        }
    }
}

/// The TPU model follows the index maps as integer scalars (`TracedCall::block_indices`): at
/// every step it finds the blocks the interpreter's run of the same maps finds.
#[test]
fn the_models_block_indices_are_the_interpreters() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for (m, k, n, groups) in [(37, 300, 200, 3), (300, 256, 384, 5), (129, 64, 130, 8)] {
        for (o, transpose_rhs) in [(GroupedOp::Gmm, false), (GroupedOp::Gmm, true), (GroupedOp::Tgmm, false)] {
            let p = GroupedProblem { m, k, n, groups, dtype: DType::F32, transpose_rhs };
            let mut splits = vec![random_group_sizes(&mut rng, groups, m), vec![0; groups]];
            splits.push((0..groups).map(|j| if j == 0 { m as i64 } else { 0 }).collect());
            for sizes in splits {
                let tables = vec![HostArray::from(ndarray::Array1::from(group_ends(&sizes, m).expect("valid sizes")))];
                for (bm, bk, bn) in [(8, 128, 128), (128, 256, 128)] {
                    let c = o.fit(&p, GroupedConfig { bm, bk, bn });
                    let traced = o.call(&p, &c).expect("call").trace(&o.operand_types(&p)).expect("traces");
                    let fast = traced.block_indices(&tables).expect("scalar maps");
                    assert!(fast.iter().all(Option::is_some), "{o:?} {p:?} at {c:?}: a map left unevaluated");
                    assert_eq!(fast, traced.interpreted_block_indices(&tables).expect("interpreted maps"), "{o:?} {p:?} at {c:?}, sizes {sizes:?} (seed {seed})");
                }
            }
        }
    }
}
