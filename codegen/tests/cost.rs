//! The work a call's grid does, step by step: conditions on the grid indices are evaluated at
//! each step (a step a causal mask skips costs nothing), others count their dearer branch.

use torchtpu_codegen::cost::{estimate, work};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{DType, KernelDef, TracedCall};

/// A product of row block `i` and column block `j`, only where `j <= i` (a causal mask's
/// visible blocks), and the block's exponential everywhere once `i` is the last row block.
#[tpu_kernel]
fn lower_blocks(a: &Ref<f32>, b: &Ref<f32>, c: &mut Ref<f32>) {
    let (i, j) = (program_id(0), program_id(1));
    if j <= i {
        c.store(dot(a.load(), b.load()));
    }
    if i == num_programs(0) - 1 {
        c.store(a.load().exp());
    }
}

/// A product only where the block's first element is positive: data, known at no step.
#[tpu_kernel]
fn where_positive(a: &Ref<f32>, b: &Ref<f32>, c: &mut Ref<f32>) {
    let first = a.get((0, 0));
    if first > 0.0 {
        c.store(dot(a.load(), b.load()));
    }
}

fn traced(kernel: KernelDef, blocks: usize, block: usize) -> TracedCall {
    let n = blocks * block;
    PallasCall::new(kernel)
        .grid([blocks, blocks])
        .in_specs([BlockSpec::new([block, block], |[i, _]| (i, 0)), BlockSpec::new([block, block], |[_, j]| (0, j))])
        .out_specs([BlockSpec::new([block, block], |[i, j]| (i, j))])
        .out_shapes([[n, n]])
        .trace(&[ValueType::new(DType::F32, [n, block]), ValueType::new(DType::F32, [block, n])])
        .expect("traces")
}

#[test]
fn steps_a_grid_condition_skips_cost_nothing() {
    let (blocks, block) = (5, 64);
    let call = traced(lower_blocks::kernel(), blocks, block);
    let visible = blocks * (blocks + 1) / 2;
    let w = work(&call, 128, &[]);
    let dot = 2.0 * (block * block * block) as f64;
    assert_eq!(w.dot_flops, visible as f64 * dot);
    // Matrix dims pad to the MXU's 128: a 64-wide product costs a 128-wide one.
    assert_eq!(w.mxu_flops, visible as f64 * 2.0 * 128f64.powi(3));
    assert_eq!(w.f32_mxu_flops, w.mxu_flops);
    // The last row block's steps: all visible; the others: the visible ones.
    assert_eq!(w.active_steps, visible as f64);
    assert_eq!(w.transcendentals, (blocks * block * block) as f64);
    let e = estimate(&call);
    assert_eq!(e.flops, w.dot_flops as u64);
    assert_eq!(e.transcendentals, w.transcendentals as u64);
}

#[test]
fn a_condition_on_data_counts_its_dearer_branch_at_every_step() {
    let (blocks, block) = (3, 128);
    let w = work(&traced(where_positive::kernel(), blocks, block), 128, &[]);
    assert_eq!(w.dot_flops, (blocks * blocks) as f64 * 2.0 * (block * block * block) as f64);
    assert_eq!(w.active_steps, (blocks * blocks) as f64);
}
