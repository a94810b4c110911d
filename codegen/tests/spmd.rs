//! Sharded programs compile with libtpu for multi-chip slices of every generation, and the
//! compiler sees each device doing its share of the work: the cost analysis of the SPMD program
//! gives the unsharded program's flops divided by the devices that split them.

use torchtpu_codegen::spmd::sharded_module;
use torchtpu_codegen::{lower, Mesh, PartitionSpec, SpmdProgram, Target};
use torchtpu_dsl::DType;
use torchtpu_runtime::{CompiledModule, Slice, TpuCompiler};
use torchtpu_testkernels::{matmul::Matmul, Example};

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"))
}

fn matmul(m: usize, n: usize, k: usize) -> Matmul {
    Matmul { m, n, k, block: (128, 128, 128), dtype: DType::F32 }
}

fn traced(mm: &Matmul) -> torchtpu_dsl::TracedCall {
    mm.call().trace(&mm.operand_types()).expect("traces")
}

fn flops(c: &CompiledModule) -> f64 {
    c.cost("flops").unwrap_or_else(|| panic!("no flops in {:?}", c.cost_analysis))
}

fn specs(s: &[&str]) -> Vec<PartitionSpec> {
    s.iter().map(|s| s.parse().expect("spec")).collect()
}

/// A `[m, k] · [k, n]` matmul over a mesh, laid out by `layout` (a, b, then the output), per
/// shard `[m / rows, k / inner] · [k / inner, n / cols]`.
struct Layout {
    name: &'static str,
    specs: [&'static str; 3],
    /// How many ways m, n and k are split.
    splits: fn(&Mesh) -> (usize, usize, usize),
}

fn axis(mesh: &Mesh, name: &str) -> usize {
    mesh.size(name).expect("axis") as usize
}

fn layouts() -> Vec<Layout> {
    vec![
        Layout { name: "rows over x, columns over y", specs: ["x,_", "_,y", "x,y"], splits: |m| (axis(m, "x"), axis(m, "y"), 1) },
        Layout { name: "rows over every device", specs: ["x+y,_", "_,_", "x+y,_"], splits: |m| (m.devices() as usize, 1, 1) },
        Layout { name: "contraction over y (partial sums)", specs: ["x,y", "y,_", "x,_,sum=y"], splits: |m| (axis(m, "x"), 1, axis(m, "y")) },
    ]
}

#[test]
fn sharded_matmuls_compile_for_every_slice_with_each_devices_share_of_the_flops() {
    let compiler = compiler();
    let (m, n, k) = (1024, 1024, 2048);
    for slice in Slice::multi_chip_examples() {
        let devices = compiler.devices(&slice).expect("devices");
        let mesh = Mesh::new([("x", 2), ("y", devices / 2)]).expect("mesh");
        let whole = compiler.compile(slice.chip, lower(&traced(&matmul(m, n, k)), Target::TpuStableHlo).expect("lowers")).expect("compiles");
        for layout in layouts() {
            let (rows, cols, inner) = (layout.splits)(&mesh);
            let shard = traced(&matmul(m / rows, n / cols, k / inner));
            let specs = specs(&layout.specs);
            let module = sharded_module(SpmdProgram::new(&mesh), &shard, &specs[..2], &specs[2..]).expect("lowers");
            let compiled = compiler.compile_spmd(&slice, module.partitions(), &module.text).unwrap_or_else(|e| panic!("{slice} {}: {e}", layout.name));
            let share = flops(&whole) / (rows * cols * inner) as f64;
            // Partial sums cost one add per output element and device in the all-reduce.
            let reduction = if inner > 1 { (m / rows * n) as f64 } else { 0.0 };
            let got = flops(&compiled);
            assert!((got - share).abs() <= reduction + 1e-6 * share, "{slice} {}: {got} flops per device, expected {share} (+ up to {reduction} for the reduction)", layout.name);
        }
    }
}

#[test]
fn programs_that_do_not_fit_their_slice_or_kernel_are_errors() {
    let compiler = compiler();
    let shard = traced(&matmul(256, 256, 256));
    let mesh: Mesh = "x=8".parse().expect("mesh");
    let module = sharded_module(SpmdProgram::new(&mesh), &shard, &specs(&["x,_", "_,_"]), &specs(&["x,_"])).expect("lowers");
    let err = compiler.compile_spmd(&"v5e:2x2".parse().expect("slice"), module.partitions(), &module.text).expect_err("8 devices on 4").to_string();
    assert!(err.contains("over 8 devices does not fit v5e:2x2, which has 4"), "{err}");
    let err = sharded_module(SpmdProgram::new(&mesh), &shard, &specs(&["x,_"]), &specs(&["x,_"])).expect_err("one spec short").to_string();
    assert!(err.contains("needs 3 partition specs (operands, then outputs); 2 given"), "{err}");
    let err = sharded_module(SpmdProgram::new(&mesh), &shard, &specs(&["x,_", "_"]), &specs(&["x,_"])).expect_err("rank").to_string();
    assert!(err.contains("operand 1 (tensor<256x256xf32>) has 2 dims but its partition spec `_` gives 1"), "{err}");
}

#[test]
fn a_one_device_mesh_compiles_and_an_output_missing_a_split_axis_is_refused() {
    let compiler = compiler();
    let shard = traced(&matmul(256, 256, 256));
    let mesh: Mesh = "x=1".parse().expect("mesh");
    let module = sharded_module(SpmdProgram::new(&mesh), &shard, &specs(&["x,_", "_,_"]), &specs(&["x,_"])).expect("lowers");
    compiler.compile_spmd(&"v5e:2x2".parse().expect("slice"), module.partitions(), &module.text).expect("one device compiles");
    // Columns split over y but an output that says it is whole on every y device: refused.
    let mesh: Mesh = "x=2,y=2".parse().expect("mesh");
    let err = sharded_module(SpmdProgram::new(&mesh), &shard, &specs(&["x,_", "_,y"]), &specs(&["x,_"])).expect_err("y left out").to_string();
    assert!(err.contains("output 0 (`x,_`) leaves out axis `y`, which splits operand 1 (`_,y`)") && err.contains("sum=y"), "{err}");
}
