//! Every acceptance kernel, lowered and compiled by the real TPU compiler (libtpu, deviceless)
//! for every chip we claim, in both Mosaic forms. Needs `scripts/setup.sh`; never skips.

use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::cost;
use torchtpu_codegen::{stablehlo, Form};
use torchtpu_dsl::DType;
use torchtpu_dsl::{HostArray, TracedCall};
use torchtpu_runtime::{Chip, TpuCompiler};
use torchtpu_testkernels::{acceptance_set, block_shape_variants, matmul::Matmul, Example};

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"))
}

fn traced(example: &dyn Example) -> TracedCall {
    let mut rng = StdRng::seed_from_u64(0);
    let types: Vec<_> = example.random_inputs(&mut rng).iter().map(HostArray::value_type).collect();
    example.call().trace(&types).unwrap_or_else(|e| panic!("{}: {e}", example.name()))
}

#[test]
fn acceptance_kernels_compile_for_every_chip_in_both_forms() {
    let c = compiler();
    let mut failures = Vec::new();
    for example in acceptance_set() {
        let call = traced(example.as_ref());
        for form in [Form::Pretty, Form::Stable] {
            let module = stablehlo::tpu_custom_call(&call, form).unwrap_or_else(|e| panic!("{}: {e}", example.name()));
            for chip in Chip::ALL {
                match c.compile(chip, &module) {
                    Ok(out) => assert!(out.code_size_bytes > 0),
                    Err(e) => failures.push(format!("{} [{form:?}]: {e}", example.name())),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn tiled_kernels_compile_at_several_block_shapes() {
    let c = compiler();
    let mut failures = Vec::new();
    for example in block_shape_variants() {
        for form in [Form::Pretty, Form::Stable] {
            let module = stablehlo::tpu_custom_call(&traced(example.as_ref()), form).unwrap_or_else(|e| panic!("{}: {e}", example.name()));
            for chip in Chip::ALL {
                if let Err(e) = c.compile(chip, &module) {
                    failures.push(format!("{} [{form:?}]: {e}", example.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn the_compiler_takes_our_cost_estimate() {
    let (m, n, k) = (256u64, 512u64, 384u64);
    let example = Matmul { m: m as usize, n: n as usize, k: k as usize, block: (128, 128, 128), dtype: DType::BF16 };
    let call = traced(&example);
    let estimate = cost::estimate(&call);
    // The MXU work dominates: 2·M·N·K, plus one accumulate per output element per K step.
    let mxu = 2 * m * n * k;
    assert!(estimate.flops >= mxu && estimate.flops <= mxu + mxu / 50, "{estimate:?}");
    assert_eq!(estimate.bytes_accessed, (m * k + k * n + m * n) * 2);
    let module = stablehlo::tpu_custom_call(&call, Form::Stable).expect("lowers");
    let compiled = compiler().compile(Chip::V5e, &module).expect("compiles");
    assert_eq!(compiled.cost("flops"), Some(estimate.flops as f64), "{:?}", compiled.cost_analysis);
}
