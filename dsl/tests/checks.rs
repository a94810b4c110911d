//! The interpreter's and the tracer's error reports: each names the kernel, the operand,
//! the grid index and the Rust line where the user can fix it.

use ndarray::{Array1, Array2};
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::Error;

/// The line of this file that contains `marker` (kept next to the offending expression).
fn line_of(marker: &str) -> u32 {
    let src = include_str!("checks.rs");
    let idx = src.lines().position(|l| l.contains(marker) && !l.contains("line_of(")).expect("marker present");
    idx as u32 + 1
}

fn ones(r: usize, c: usize) -> HostArray {
    HostArray::from(Array2::<f32>::ones((r, c)))
}

#[tpu_kernel]
fn copy(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load());
}

#[test]
fn parallel_programs_writing_one_block_is_a_race() {
    let racy = |sem| {
        PallasCall::new(copy::kernel())
            .grid([4])
            .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
            .out_specs([BlockSpec::new([8, 128], |[_]| (0, 0))])
            .out_shapes([[8, 128]])
            .dimension_semantics([sem])
    };
    let err = racy(Parallel).interpret(&[ones(32, 128)]).expect_err("a race");
    match err {
        Error::Race { kernel, operand, block, first, second } => {
            assert_eq!(kernel, "copy");
            assert_eq!(operand, "y");
            assert_eq!(block, vec![0, 0]);
            assert_ne!(first, second);
        }
        other => panic!("expected a race, got {other}"),
    }
    // The same writes along a sequential axis are a legal revisit of one block.
    assert!(racy(Arbitrary).interpret(&[ones(32, 128)]).is_ok());
}

#[tpu_kernel]
fn shifted_window(x: &Ref<f32>, y: &mut Ref<f32>) {
    let start = program_id(0) * 4 + 4;
    y.store(x.load_at((ds(start, 8), ..))); // <- out of bounds
}

#[test]
fn dynamic_slice_out_of_bounds_is_reported_with_its_line() {
    let call = PallasCall::new(shifted_window::kernel())
        .grid([2])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[16, 128]])
        .dimension_semantics([Parallel]);
    for result in [call.interpret(&[ones(16, 128)]), call.interpret_checked(&[ones(16, 128)])] {
        match result.expect_err("out of bounds") {
            Error::OutOfBounds { kernel, operand, loc, detail, .. } => {
                assert_eq!(kernel, "shifted_window");
                assert_eq!(operand, "x");
                assert_eq!(loc.line, line_of("// <- out of bounds"));
                assert!(detail.contains("4..12"), "{detail}");
            }
            other => panic!("expected out of bounds, got {other}"),
        }
    }
}

#[tpu_kernel]
fn accumulate_without_init(x: &Ref<f32>, y: &mut Ref<f32>, acc: &mut Scratch<f32>, init_rows: usize) {
    if init_rows > 0 {
        acc.store_at((0..init_rows, ..), zeros());
    }
    acc.store(acc.load() + x.load()); // <- reads scratch
    y.store(acc.load());
}

fn accumulate_call(init_rows: usize) -> PallasCall {
    PallasCall::new(accumulate_without_init::kernel(init_rows))
        .grid([2])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[16, 128]])
        .scratch([Vmem::new([8, 128])])
        .dimension_semantics([Parallel])
}

#[test]
fn reading_uninitialized_scratch_is_reported_in_checked_mode() {
    for init_rows in [0, 4] {
        match accumulate_call(init_rows).interpret_checked(&[ones(16, 128)]).expect_err("uninitialized") {
            Error::UninitializedRead { kernel, operand, loc, region, .. } => {
                assert_eq!(kernel, "accumulate_without_init");
                assert_eq!(operand, "acc");
                assert_eq!(loc.line, line_of("// <- reads scratch"));
                assert_eq!(region, "[0..8, 0..128]");
            }
            other => panic!("expected an uninitialized read, got {other}"),
        }
    }
    // Fully initialized, the same kernel is fine.
    let out = accumulate_call(8).interpret_checked(&[ones(16, 128)]).expect("initialized");
    assert!(out[0].to_f64().iter().all(|&v| v == 1.0));
}

#[test]
fn index_map_past_the_array_is_rejected() {
    let call = PallasCall::new(copy::kernel())
        .grid([2])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i + 1, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[16, 128]]);
    match call.interpret(&[ones(16, 128)]).expect_err("past the array") {
        Error::BlockOutOfRange { operand, grid_index, block, .. } => {
            assert_eq!(operand, "x");
            assert_eq!(grid_index, vec![1]);
            assert_eq!(block, vec![2, 0]);
        }
        other => panic!("expected a block out of range, got {other}"),
    }
}

#[tpu_kernel]
fn mismatched_add(x: &Ref<f32>, y: &mut Ref<f32>) {
    let a = x.load();
    let b = x.load_at((0..4, ..));
    y.store(a + b); // <- shape mismatch
}

#[test]
fn shape_errors_point_at_the_kernel_line() {
    let call = PallasCall::new(mismatched_add::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[8, 128]]);
    match call.interpret(&[ones(8, 128)]).expect_err("shape mismatch") {
        Error::Trace { kernel, loc, message } => {
            assert_eq!(kernel, "mismatched_add");
            assert!(loc.file.ends_with("checks.rs"), "{}", loc.file);
            assert_eq!(loc.line, line_of("// <- shape mismatch"));
            assert!(message.contains("[8, 128] and [4, 128]"), "{message}");
        }
        other => panic!("expected a trace error, got {other}"),
    }
}

#[tpu_kernel]
fn leaks_a_branch_value(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut saved = Vec::new();
    if program_id(0) == 0 {
        saved.push(x.load());
    }
    y.store(saved[0]);
}

#[test]
fn values_escaping_a_traced_branch_are_rejected_by_the_verifier() {
    let call = PallasCall::new(leaks_a_branch_value::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[8, 128]]);
    match call.trace(&[ones(8, 128).value_type()]).expect_err("escaping value") {
        Error::Verify { message, .. } => assert!(message.contains("not defined"), "{message}"),
        other => panic!("expected a verifier error, got {other}"),
    }
}

// A `break` in a traced loop is what this test is about.
#[allow(clippy::never_loop)]
#[tpu_kernel]
fn breaks_out(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut t = x.load();
    for _ in 0..program_id(0) {
        t = t * 2.0;
        break;
    }
    y.store(t);
}

#[test]
fn break_in_a_traced_loop_is_an_error() {
    let call = PallasCall::new(breaks_out::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[8, 128]]);
    let err = call.trace(&[ones(8, 128).value_type()]).expect_err("break");
    assert!(err.to_string().contains("`break` and `continue` are not supported"), "{err}");
}

#[test]
fn calls_that_do_not_fit_the_kernel_are_rejected() {
    let base =
        || PallasCall::new(copy::kernel()).grid([2]).in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))]).out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))]).out_shapes([[16, 128]]);
    let x = ones(16, 128);
    let cases: Vec<(PallasCall, Vec<HostArray>, &str)> = vec![
        (base(), vec![HostArray::from(Array2::<i32>::zeros((16, 128)))], "must be f32, got i32"),
        (base(), vec![x.clone(), x.clone()], "expected 1 arrays"),
        (base().in_specs([BlockSpec::new([8], |[i]| (i,))]), vec![x.clone()], "has rank 1"),
        (base().in_specs([BlockSpec::new([8, 128], |[i, j]| (i, j))]), vec![x.clone()], "takes 2 grid indices, but the grid has rank 1"),
        (base().in_specs([BlockSpec::new([8, 128], |[i]| (i,))]), vec![x.clone()], "returns 1 block indices for a block of rank 2"),
        (base().grid([2, 0]), vec![x.clone()], "extent 0"),
        (base().dimension_semantics([Parallel, Parallel]), vec![x.clone()], "2 dimension semantics for a grid of rank 1"),
        (base().scratch([Vmem::new([8, 128])]), vec![x.clone()], "1 scratch given, but the kernel signature has 0"),
        (base().input_output_aliases([(0, 3)]), vec![x.clone()], "does not exist"),
    ];
    for (call, inputs, expected) in cases {
        let err = call.interpret(&inputs).expect_err(expected);
        assert!(err.to_string().contains(expected), "expected `{expected}` in: {err}");
    }
}

#[test]
fn aliased_output_starts_as_its_input() {
    #[tpu_kernel]
    fn bump_first_row(x: &Ref<f32>, y: &mut Ref<f32>) {
        y.store(x.load() + 1.0);
    }
    // Only the first block is written; the rest keeps the aliased input's values.
    let call = PallasCall::new(bump_first_row::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[16, 128]])
        .input_output_aliases([(0, 0)]);
    let x = Array2::from_shape_fn((16, 128), |(i, j)| (i * 128 + j) as f32);
    let out = call.interpret(&[HostArray::from(&x)]).expect("runs").remove(0).into_array::<f32>().expect("f32");
    for ((i, j), &v) in x.indexed_iter() {
        let want = if i < 8 { v + 1.0 } else { v };
        assert_eq!(out[[i, j]], want);
    }
}

#[test]
fn integer_division_by_zero_is_an_error_not_a_panic() {
    // Dividing by a traced zero is the point.
    #[allow(clippy::erasing_op)]
    #[tpu_kernel]
    fn divide(x: &Ref<i32>, y: &mut Ref<i32>) {
        y.store(x.load() / (program_id(0) * 0));
    }
    let call = PallasCall::new(divide::kernel()).grid([1]).in_specs([BlockSpec::new([8], |[i]| (i,))]).out_specs([BlockSpec::new([8], |[i]| (i,))]).out_shapes([[8]]);
    let err = call.interpret(&[HostArray::from(Array1::<i32>::ones(8))]).expect_err("division by zero");
    assert!(err.to_string().contains("by zero"), "{err}");
}

#[tpu_kernel]
fn row_sum(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load().sum_keepdims(1));
}

#[test]
fn long_sums_keep_their_digits() {
    // One large value, then 32767 small ones: a sequential f32 sum rounds each small one
    // against the large partial sum (about 7e-4 relative error); f64 accumulation does not.
    let cols = 32768;
    let x = Array2::from_shape_fn((8, cols), |(_, j)| if j == 0 { 1.0e4f32 } else { 0.4 });
    let call =
        PallasCall::new(row_sum::kernel()).grid([1]).in_specs([BlockSpec::new([8, cols], |[i]| (i, 0))]).out_specs([BlockSpec::new([8, 1], |[i]| (i, 0))]).out_shapes([[8, 1]]);
    let out = call.interpret(&[HostArray::from(&x)]).expect("runs").remove(0).into_array::<f32>().expect("f32");
    let want: f64 = x.row(0).iter().map(|&v| v as f64).sum();
    for &got in out.iter() {
        assert!(((got as f64) - want).abs() / want < 1e-6, "{got} vs {want}");
    }
}

#[tpu_kernel]
fn unmasked_sum_of_blocks(x: &Ref<f32>, y: &mut Ref<f32>, acc: &mut Scratch<f32>) {
    if program_id(0) == 0 {
        acc.store(zeros());
    }
    acc.store(acc.load() + x.load().sum_keepdims(1));
    if program_id(0) == num_programs(0) - 1 {
        y.store(acc.load()); // <- poisoned store
    }
}

#[test]
fn checked_mode_reports_padding_that_reaches_an_output() {
    // 200 columns in blocks of 128: the second block's last 56 lanes are padding, summed unmasked.
    let call = PallasCall::new(unmasked_sum_of_blocks::kernel())
        .grid([2])
        .in_specs([BlockSpec::new([8, 128], |[j]| (0, j))])
        .out_specs([BlockSpec::new([8, 1], |[_]| (0, 0))])
        .out_shapes([[8, 1]])
        .scratch([Vmem::new([8, 1])]);
    let x = HostArray::from(Array2::<f32>::ones((8, 200)));
    // The plain interpreter pads with zeros and returns a plausible answer; a TPU sums garbage.
    assert!(call.interpret(std::slice::from_ref(&x)).is_ok());
    match call.interpret_checked(&[x]).expect_err("padding reached the output") {
        Error::PoisonReachedOutput { kernel, operand, grid_index, loc, .. } => {
            assert_eq!((kernel.as_str(), operand.as_str(), grid_index), ("unmasked_sum_of_blocks", "y", vec![0]));
            assert_eq!(loc.line, line_of("// <- poisoned store"));
        }
        other => panic!("expected a poison report, got {other}"),
    }
    // NaN that the user passed in is data, not a report (the same call on 256 columns: no padding).
    let mut with_nan = Array2::<f32>::ones((8, 256));
    with_nan[[0, 0]] = f32::NAN;
    let out = call.interpret_checked(&[HostArray::from(with_nan)]).expect("runs").remove(0).into_array::<f32>().expect("f32");
    assert!(out[[0, 0]].is_nan() && out[[1, 0]] == 256.0);
}

#[test]
fn checked_mode_refuses_blocks_a_tpu_cannot_tile() {
    let call =
        PallasCall::new(copy::kernel()).grid([4]).in_specs([BlockSpec::new([4, 128], |[i]| (i, 0))]).out_specs([BlockSpec::new([4, 128], |[i]| (i, 0))]).out_shapes([[16, 128]]); // <- 4-row block
    assert!(call.interpret(&[ones(16, 128)]).is_ok(), "the CPU runs it");
    let err = call.interpret_checked(&[ones(16, 128)]).expect_err("not a TPU tiling").to_string();
    assert!(err.contains(&format!("checks.rs:{}", line_of("// <- 4-row block"))) && err.contains("multiple of 8"), "{err}");
}

#[test]
fn grids_past_i32_are_an_error() {
    let call = PallasCall::new(copy::kernel())
        .grid([1usize << 31])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[8, 128]]);
    let err = call.trace(&[torchtpu_dsl::ir::ValueType::new(DType::F32, [8, 128])]).expect_err("too many programs");
    assert!(err.to_string().contains("grid indices are i32"), "{err}");
}

/// A chain of 5000 elementwise ops (each feeding only the next), traced from a Rust loop.
#[tpu_kernel]
fn long_chain(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut v = x.load();
    for k in 0..2500usize {
        v = v * 0.5 + (k % 3) as f32;
    }
    y.store(v);
}

#[test]
fn a_long_chain_of_elementwise_ops_runs_in_bounded_groups() {
    let call = PallasCall::new(long_chain::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[_]| (0, 0))])
        .out_specs([BlockSpec::new([8, 128], |[_]| (0, 0))])
        .out_shapes([[8, 128]]);
    let x = Array2::from_shape_fn((8, 128), |(i, j)| (i * 128 + j) as f32 / 100.0);
    let out = call.interpret(&[HostArray::from(x.clone())]).expect("runs");
    let want = x.mapv(|mut v| {
        for k in 0..2500usize {
            v = v * 0.5 + (k % 3) as f32;
        }
        v
    });
    assert_eq!(out[0].to_f64(), want.mapv(f64::from).into_dyn());
}

/// The interpreter drops a tile after its last use and gives its memory to the next tile of its
/// size. `t` is read only by `e`, which is fused into `f` and runs there, after `u` and `s`
/// (tiles of `t`'s size) are made: were `t` dropped at `e`'s place in program order, `f`
/// could not read it. `u` is read inside and after a traced loop.
#[tpu_kernel]
fn dead_tiles(x: &Ref<f32>, y: &mut Ref<f32>) {
    let t = x.load();
    let e = t * 2.0;
    let u = x.load() * 3.0;
    let s = u + 1.0;
    let f = e - s;
    let mut acc = f;
    for k in 0..program_id(0) + 3 {
        acc = acc + u * k.cast::<f32>();
    }
    y.store(acc + s * 0.0 + u);
}

#[test]
fn tiles_dropped_after_their_last_use_keep_every_value_they_feed() {
    let call = PallasCall::new(dead_tiles::kernel())
        .grid([1])
        .in_specs([BlockSpec::new([8, 128], |[_]| (0, 0))])
        .out_specs([BlockSpec::new([8, 128], |[_]| (0, 0))])
        .out_shapes([[8, 128]]);
    let x = Array2::from_shape_fn((8, 128), |(i, j)| (i * 128 + j) as f32 / 64.0 - 7.0);
    let want = x
        .mapv(|t| {
            let u = t * 3.0;
            let s = u + 1.0;
            let mut acc = t * 2.0 - s;
            for k in 0..3 {
                acc += u * k as f32;
            }
            f64::from(acc + s * 0.0 + u)
        })
        .into_dyn();
    for _ in 0..3 {
        for out in [call.interpret(&[HostArray::from(x.clone())]), call.interpret_checked(&[HostArray::from(x.clone())])] {
            assert_eq!(out.expect("runs")[0].to_f64(), want);
        }
    }
}
