//! Dynamic slice offsets along the tiled dims: lower() for a TPU refuses the ones libtpu
//! cannot prove aligned (its E2003), at the kernel's Rust line, and lets through the ones it
//! compiles.

use torchtpu_codegen::{stablehlo, Form};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{HostArray, KernelDef};
use torchtpu_runtime::{Chip, TpuCompiler};

/// The window `[rows, lanes]` of `x` at (`program_id * row_step + row_offset`, `program_id * lane_step + lane_offset`).
#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn window<T: Float>(x: &Ref<T>, y: &mut Ref<T>, rows: usize, lanes: usize, row_step: i32, row_offset: i32, lane_step: i32, lane_offset: i32) {
    let r = program_id(0) * row_step + row_offset;
    let c = program_id(0) * lane_step + lane_offset;
    y.store(x.load_at((ds(r, rows), ds(c, lanes))));
}

struct Case {
    dtype: DType,
    array: [usize; 2],
    rows: usize,
    lanes: usize,
    row: (i32, i32),
    lane: (i32, i32),
}

fn kernel(c: &Case) -> KernelDef {
    match c.dtype {
        DType::BF16 => window::kernel::<bf16>(c.rows, c.lanes, c.row.0, c.row.1, c.lane.0, c.lane.1),
        _ => window::kernel::<f32>(c.rows, c.lanes, c.row.0, c.row.1, c.lane.0, c.lane.1),
    }
}

fn traced(c: &Case) -> torchtpu_dsl::TracedCall {
    let call = PallasCall::new(kernel(c))
        .grid([if c.rows == 1 { 1 } else { 2 }])
        .in_specs([BlockSpec::new(c.array, |[_i]| (0, 0))])
        .out_specs([BlockSpec::new([c.rows, c.lanes], |[i]| (i, 0))])
        .out_shapes([[if c.rows == 1 { 1 } else { 2 * c.rows }, c.lanes]]);
    call.trace(&[ValueType::new(c.dtype, c.array)]).expect("traces")
}

fn lowered(c: &Case) -> Result<String, String> {
    torchtpu_codegen::lower(&traced(c), torchtpu_codegen::Target::TpuStableHlo).map_err(|e| e.to_string())
}

#[test]
fn lower_refuses_exactly_the_dynamic_offsets_libtpu_cannot_prove_aligned() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let f32c = |array: [usize; 2], rows, lanes, row, lane| Case { dtype: DType::F32, array, rows, lanes, row, lane };
    let bfc = |array: [usize; 2], rows, lanes, row, lane| Case { dtype: DType::BF16, array, rows, lanes, row, lane };
    // (what, case, whether libtpu compiles it): the offsets are program_id * step + offset.
    let cases = [
        ("lanes at i*128", f32c([64, 512], 8, 128, (0, 0), (128, 0)), true),
        ("lanes at i*128+64", f32c([64, 512], 8, 128, (0, 0), (128, 64)), false),
        ("lanes at i*64", f32c([64, 512], 8, 128, (0, 0), (64, 0)), false),
        ("256 lanes at i*256", f32c([64, 512], 8, 256, (0, 0), (256, 0)), true),
        ("bf16 lanes at i*128", bfc([64, 512], 16, 128, (0, 0), (128, 0)), true),
        ("rows at i*8", f32c([64, 512], 8, 128, (8, 0), (0, 0)), true),
        ("rows at i*8+3", f32c([64, 512], 8, 128, (8, 3), (0, 0)), false),
        ("512-lane rows at i*8+3", f32c([64, 512], 8, 512, (8, 3), (0, 0)), false),
        ("rows of a 4-row array at i*2", f32c([4, 512], 2, 128, (2, 0), (0, 0)), false),
        ("rows of a 128-lane ref at i*4+3", f32c([64, 128], 8, 128, (4, 3), (0, 0)), true),
        ("one 512-lane row at i*3+1", f32c([64, 512], 1, 512, (3, 1), (0, 0)), true),
        ("one 256-lane row at i*3+1", f32c([64, 512], 1, 256, (3, 1), (0, 0)), true),
        ("one 128-lane row of a 512-lane ref at i*3+1", f32c([64, 512], 1, 128, (3, 1), (0, 0)), false),
        ("one row of a 128-lane ref at i*3+1", f32c([64, 128], 1, 128, (3, 1), (0, 0)), true),
        ("two rows at i*3+1", f32c([64, 512], 2, 512, (3, 1), (0, 0)), false),
        ("bf16 rows at i*16", bfc([64, 512], 16, 128, (16, 0), (0, 0)), true),
        ("bf16 rows at i*8", bfc([64, 512], 16, 128, (8, 0), (0, 0)), true),
        ("bf16 rows at i*4", bfc([64, 512], 16, 128, (4, 0), (0, 0)), false),
        ("bf16 rows of a 128-lane ref at i*8", bfc([64, 128], 16, 128, (8, 0), (0, 0)), true),
        ("bf16 rows of a 128-lane ref at i*3", bfc([64, 128], 16, 128, (3, 0), (0, 0)), false),
        ("one bf16 row at i*3", bfc([64, 512], 1, 512, (3, 0), (0, 0)), false),
        ("rows at a folded constant 3", f32c([64, 512], 8, 128, (0, 3), (0, 0)), true),
        ("lanes at a folded constant 64", f32c([64, 512], 8, 128, (0, 0), (0, 64)), true),
    ];
    for (what, c, compiles) in &cases {
        let module = stablehlo::tpu_custom_call(&traced(c), Form::Stable).expect("lowers without the check");
        for chip in Chip::ALL {
            let theirs = compiler.compile(chip, &module);
            assert_eq!(theirs.is_ok(), *compiles, "{what} on {chip}: {:?}", theirs.err().map(|e| e.message));
        }
        let ours = lowered(c);
        assert_eq!(ours.is_ok(), *compiles, "{what}: lower() gave {ours:?}");
        if let Err(msg) = ours {
            let line = include_str!("dynamic_offsets.rs").lines().position(|l| l.contains("y.store(x.load_at(")).expect("marker") + 1;
            assert!(msg.contains(&format!("codegen/tests/dynamic_offsets.rs:{line}")) && msg.contains("not provably a multiple of"), "{what}: {msg}");
        }
    }
}

/// Offsets from `program_id(0)` through the arithmetic Mosaic's prover follows.
#[tpu_kernel]
fn computed_lanes(x: &Ref<f32>, y: &mut Ref<f32>, how: u8) {
    let i = program_id(0);
    let c = match how {
        0 => (i * 2) * 64,
        1 => (i * 256) / 2,
        2 => (i * 256) % 384,
        3 => select(i < 1, i * 128, i * 256),
        4 => minimum(i * 128, i * 256),
        _ => (i * 256) / 4,
    };
    y.store(x.load_at((.., ds(c, 128))));
}

#[test]
fn the_proof_follows_products_quotients_remainders_selects_and_minima() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    for (how, compiles) in [(0u8, true), (1, true), (2, true), (3, true), (4, true), (5, false)] {
        let call = PallasCall::new(computed_lanes::kernel(how))
            .grid([2])
            .in_specs([BlockSpec::new([8, 1024], |[_i]| (0, 0))])
            .out_specs([BlockSpec::new([8, 128], |[i]| (0, i))])
            .out_shapes([[8, 256]]);
        let traced = call.trace(&[ValueType::new(DType::F32, [8, 1024])]).expect("traces");
        let module = stablehlo::tpu_custom_call(&traced, Form::Stable).expect("lowers without the check");
        let theirs = compiler.compile(Chip::V5e, &module);
        assert_eq!(theirs.is_ok(), compiles, "case {how}: {:?}", theirs.err().map(|e| e.message));
        let ours = torchtpu_codegen::lower(&traced, torchtpu_codegen::Target::TpuStableHlo);
        assert_eq!(ours.is_ok(), compiles, "case {how}: {:?}", ours.err().map(|e| e.to_string()));
        // The CPU runs every one; checked mode refuses what a TPU would.
        let x = HostArray::from_f64(DType::F32, &ndarray::ArrayD::from_shape_fn(vec![8, 1024], |i| i[1] as f64));
        assert!(call.interpret(std::slice::from_ref(&x)).is_ok(), "case {how}");
        assert_eq!(call.interpret_checked(std::slice::from_ref(&x)).is_ok(), compiles, "case {how}");
    }
}
