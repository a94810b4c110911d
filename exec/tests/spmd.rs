//! SPMD programs in their portable form, on a PJRT CPU client with a device per partition,
//! equal the unsharded product computed in f64: a matmul over a 2×2 mesh by rows and
//! columns, over all four devices by rows, and with its contraction split (each device's
//! partial sum added up by an all-reduce).

use ndarray::{ArrayD, Ix2};
use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::spmd::sharded_module;
use torchtpu_codegen::{Mesh, PartitionSpec, SpmdProgram};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::spmd::run_sharded;
use torchtpu_testkernels::{matmul::Matmul, random_arrays, Example};

fn specs(s: &[&str]) -> Vec<PartitionSpec> {
    s.iter().map(|s| s.parse().expect("spec")).collect()
}

fn product(a: &HostArray, b: &HostArray) -> ArrayD<f64> {
    let (a, b) = (a.to_f64().into_dimensionality::<Ix2>().expect("2-D"), b.to_f64().into_dimensionality::<Ix2>().expect("2-D"));
    a.dot(&b).into_dyn()
}

#[test]
fn sharded_matmuls_on_four_cpu_devices_equal_the_unsharded_product() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let mesh: Mesh = "x=2,y=2".parse().expect("mesh");
    let (m, n, k) = (256, 256, 512);
    let whole = random_arrays(&mut rng, &[ValueType::new(DType::F32, [m, k]), ValueType::new(DType::F32, [k, n])]);
    let want = product(&whole[0], &whole[1]);
    // (layout, shard m, n, k)
    for (layout, (sm, sn, sk)) in [(["x,_", "_,y", "x,y"], (m / 2, n / 2, k)), (["x+y,_", "_,_", "x+y,_"], (m / 4, n, k)), (["x,y", "y,_", "x,_,sum=y"], (m / 2, n, k / 2))] {
        let mm = Matmul { m: sm, n: sn, k: sk, block: (128, 128, 128), dtype: DType::F32 };
        let shard = mm.call().trace(&mm.operand_types()).expect("traces");
        let specs = specs(&layout);
        let module = sharded_module(SpmdProgram::portable(&mesh), &shard, &specs[..2], &specs[2..]).expect("lowers");
        let out = run_sharded(&module, &[(&whole[0], &specs[0]), (&whole[1], &specs[1])], &[(ValueType::new(DType::F32, [m, n]), specs[2].clone())])
            .unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        let got = out[0].to_f64();
        let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max);
        assert!(err < 1e-4, "{layout:?} (seed {seed}): off by {err:.2e}");
    }
}

#[test]
fn outputs_said_to_be_replicated_must_agree_across_their_devices() {
    let mut rng = StdRng::seed_from_u64(1);
    let mesh: Mesh = "x=2,y=2".parse().expect("mesh");
    let mm = Matmul { m: 128, n: 128, k: 128, block: (128, 128, 128), dtype: DType::F32 };
    let shard = mm.call().trace(&mm.operand_types()).expect("traces");
    let specs = specs(&["x,_", "_,_", "x,_"]);
    let module = sharded_module(SpmdProgram::portable(&mesh), &shard, &specs[..2], &specs[2..]).expect("lowers");
    let whole = random_arrays(&mut rng, &[ValueType::new(DType::F32, [256, 128]), ValueType::new(DType::F32, [128, 128])]);
    // Rows are split over x; reading them back as split over y puts different rows together.
    let wrong: PartitionSpec = "y,_".parse().expect("spec");
    let err = run_sharded(&module, &[(&whole[0], &specs[0]), (&whole[1], &specs[1])], &[(ValueType::new(DType::F32, [256, 128]), wrong)]).expect_err("disagree").to_string();
    assert!(err.contains("output 0 (`y,_`) differs between devices"), "{err}");
}
