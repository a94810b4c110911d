//! What `#[tpu_kernel]` makes of Rust control flow: conditions and bounds known at trace
//! time stay Rust; traced ones become `If`/`For` ops with carried values.

use ndarray::Array2;
use torchtpu_dsl::ir::{Func, OpKind};
use torchtpu_dsl::prelude::*;

fn count(f: &Func, pred: impl Fn(&OpKind) -> bool) -> usize {
    let mut n = 0;
    f.walk(&mut |op| n += pred(&op.kind) as usize);
    n
}

fn one_block_call(kernel: torchtpu_dsl::KernelDef, grid: usize) -> PallasCall {
    PallasCall::new(kernel).grid([grid]).in_specs([BlockSpec::new([8, 128], |[_]| (0, 0))]).out_specs([BlockSpec::new([8, 128], |[_]| (0, 0))]).out_shapes([[8, 128]])
}

fn run(call: &PallasCall, x: &Array2<f32>) -> Array2<f32> {
    let out = call.interpret_checked(&[HostArray::from(x)]).expect("runs").remove(0);
    out.into_array::<f32>().expect("f32").into_dimensionality().expect("2-D")
}

fn input() -> Array2<f32> {
    Array2::from_shape_fn((8, 128), |(i, j)| (i as f32) - (j as f32) / 64.0)
}

#[tpu_kernel]
fn static_or_traced(x: &Ref<f32>, y: &mut Ref<f32>, double: bool, repeats: usize) {
    let mut t = x.load();
    if double {
        t = t * 2.0;
    }
    for _ in 0..repeats {
        t = t + 1.0;
    }
    y.store(t);
}

#[test]
fn compile_time_if_and_for_are_resolved_while_tracing() {
    let call = one_block_call(static_or_traced::kernel(true, 3), 1);
    let traced = call.trace(&[HostArray::from(input()).value_type()]).expect("traces");
    let body = &traced.body;
    assert_eq!(count(body, |k| matches!(k, OpKind::If { .. } | OpKind::For { .. })), 0, "{body}");
    assert_eq!(count(body, |k| matches!(k, OpKind::Binary { .. })), 4, "{body}");
    let out = run(&call, &input());
    assert_eq!(out, input().mapv(|v| v * 2.0 + 3.0));
    let out = run(&one_block_call(static_or_traced::kernel(false, 0), 1), &input());
    assert_eq!(out, input());
}

#[tpu_kernel]
fn traced_branches(x: &Ref<f32>, y: &mut Ref<f32>) {
    let i = program_id(0);
    let t = x.load();
    let scale = if i == 0 {
        Scalar::<f32>::constant(2.0)
    } else if i == 1 && i < 5 {
        Scalar::constant(3.0)
    } else {
        Scalar::constant(4.0)
    };
    let mut u = t;
    if i >= 1 {
        u = u + scale;
    } else {
        u = u * scale;
    }
    y.store(u);
}

#[test]
fn traced_if_with_a_value_else_if_and_a_carried_variable() {
    // Each program writes the same block in turn (sequential axis), so the last one wins.
    for (programs, want) in [(1usize, input().mapv(|v| v * 2.0)), (2, input().mapv(|v| v + 3.0)), (3, input().mapv(|v| v + 4.0))] {
        let call = one_block_call(traced_branches::kernel(), programs);
        let traced = call.trace(&[HostArray::from(input()).value_type()]).expect("traces");
        assert_eq!(count(&traced.body, |k| matches!(k, OpKind::If { .. })), 3, "{}", traced.body);
        assert_eq!(run(&call, &input()), want);
    }
}

#[tpu_kernel]
fn traced_loop(x: &Ref<f32>, y: &mut Ref<f32>) {
    let t = x.load();
    let mut power = Tile::<f32>::full([8, 128], 1.0);
    let mut total = Tile::<f32>::full([8, 128], 0.0);
    for k in 0..program_id(0) + 1 {
        total = total + power * k.cast::<f32>();
        power = power * t;
    }
    y.store(total + power);
}

#[test]
fn traced_for_carries_two_values() {
    let call = one_block_call(traced_loop::kernel(), 1);
    let traced = call.trace(&[HostArray::from(input()).value_type()]).expect("traces");
    let mut carried = Vec::new();
    traced.body.walk(&mut |op| {
        if let OpKind::For { inits, .. } = &op.kind {
            carried.push(inits.len());
        }
    });
    assert_eq!(carried, vec![2], "{}", traced.body);
    let printed = traced.body.to_string();
    assert!(printed.contains("for (") && printed.contains("carrying"), "{printed}");
    // One program: k = 0 only, so total = 0 and power = t.
    assert_eq!(run(&call, &input()), input());
    // Three programs on one block: the last (k = 0, 1, 2) wins: total = t + 2t², power = t³.
    let want = input().mapv(|t| t + 2.0 * t * t + t * t * t);
    let got = run(&one_block_call(traced_loop::kernel(), 3), &input());
    for (g, w) in got.iter().zip(&want) {
        assert!(approx::relative_eq!(g, w, epsilon = 1e-4, max_relative = 1e-4), "{g} vs {w}");
    }
}

#[tpu_kernel]
fn logic(x: &Ref<f32>, y: &mut Ref<f32>, flag: bool) {
    let i = program_id(0);
    let t = x.load();
    let keep = (t > 0.0) & !(t > 3.0);
    let mut u = select(keep, t, 0.0);
    if flag && i == 0 {
        u = u + 100.0;
    }
    if !flag || i != 0 {
        u = u - 1.0;
    }
    y.store(u);
}

#[test]
fn logical_operators_mix_rust_and_traced_values() {
    let masked = input().mapv(|v| if v > 0.0 && v <= 3.0 { v } else { 0.0 });
    assert_eq!(run(&one_block_call(logic::kernel(true), 1), &input()), masked.mapv(|v| v + 100.0));
    assert_eq!(run(&one_block_call(logic::kernel(false), 1), &input()), masked.mapv(|v| v - 1.0));
}

#[tpu_kernel]
fn located(x: &Ref<f32>, y: &mut Ref<f32>) {
    let mut t = x.load();
    for _ in 0..program_id(0) {
        // ^ for line
        t = t + 1.0;
    }
    if program_id(0) > 2 {
        // ^ if line
        t = t * 2.0;
    }
    y.store(t);
}

#[test]
fn emitted_ops_carry_the_line_of_the_rust_expression() {
    let src = include_str!("tracing.rs");
    let line_of = |m: &str| src.lines().position(|l| l.ends_with(m)).expect("marker") as u32 + 1;
    let call = one_block_call(located::kernel(), 1);
    let traced = call.trace(&[HostArray::from(input()).value_type()]).expect("traces");
    let mut lines = std::collections::HashMap::new();
    traced.body.walk(&mut |op| {
        let name = match op.kind {
            OpKind::For { .. } => "for",
            OpKind::If { .. } => "if",
            OpKind::Compare { .. } => "compare",
            _ => return,
        };
        lines.insert(name, op.loc.line);
    });
    // Each marker is on the line below the expression it marks.
    assert_eq!(lines["for"], line_of("// ^ for line") - 1);
    assert_eq!(lines["if"], line_of("// ^ if line") - 1);
    assert_eq!(lines["compare"], line_of("// ^ if line") - 1);
}

#[test]
fn ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}

/// A helper kernels share: a comparison on traced values and a compile-time `if`, by the
/// same rules as a kernel body.
#[tpu_fn]
fn clamp_negative(t: Tile<f32>, floor: f32, strict: bool) -> Tile<f32> {
    let low = t < floor;
    let mut out = select(low, floor, t);
    if strict {
        out = out + 0.0;
    }
    out
}

#[tpu_kernel]
fn uses_a_helper(x: &Ref<f32>, y: &mut Ref<f32>) {
    let t = clamp_negative(x.load(), -1.0, true);
    let i = program_id(0);
    if i == 0 {
        y.store(clamp_negative(t * 3.0, -2.0, false));
    }
}

#[test]
fn tpu_fn_helpers_trace_like_kernel_bodies_and_keep_their_lines() {
    let call = one_block_call(uses_a_helper::kernel(), 1);
    let traced = call.trace(&[HostArray::from(input()).value_type()]).expect("traces");
    let out = run(&call, &input());
    assert_eq!(out, input().mapv(|v| (v.max(-1.0) * 3.0).max(-2.0)));
    // The helper's ops carry the helper's own source lines.
    let helper_line = line!() - 23;
    let mut lines = Vec::new();
    traced.body.walk(&mut |op| lines.push(op.loc.line));
    assert!(lines.contains(&helper_line), "no op at line {helper_line}: {lines:?}\n{}", traced.body);
}
