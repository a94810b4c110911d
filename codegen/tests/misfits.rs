//! Configurations the TPU cannot run are caught, each with the compiler's own reason, the
//! chip, and (where the compiler points into the kernel) the kernel's Rust line.

use rand::rngs::StdRng;
use rand::SeedableRng;
use torchtpu_codegen::{stablehlo, Form};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{HostArray, KernelDef};
use torchtpu_runtime::{Chip, CompileError, TpuCompiler};
use torchtpu_testkernels::{matmul::Matmul, Example};

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"))
}

#[tpu_kernel]
fn copy(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load());
}

#[tpu_kernel]
fn exp_of<T: Float>(x: &Ref<T>, y: &mut Ref<T>) {
    y.store(x.load().exp()); // <- f16 load
}

fn elementwise(kernel: KernelDef, shape: [usize; 2], block: [usize; 2]) -> PallasCall {
    PallasCall::new(kernel)
        .grid([shape[0].div_ceil(block[0]), shape[1].div_ceil(block[1])])
        .in_specs([BlockSpec::new(block, |[i, j]| (i, j))])
        .out_specs([BlockSpec::new(block, |[i, j]| (i, j))])
        .out_shapes([shape])
}

fn compile(call: &PallasCall, operands: &[ValueType], chip: Chip) -> Result<(), CompileError> {
    let traced = call.trace(operands).expect("traces");
    let module = stablehlo::tpu_custom_call(&traced, Form::Stable).expect("lowers");
    compiler().compile(chip, &module).map(|_| ())
}

#[test]
fn a_block_off_the_8_by_128_tiling_is_rejected_with_the_compilers_reason() {
    let call = elementwise(copy::kernel(), [64, 256], [4, 100]);
    let err = compile(&call, &[ValueType::new(DType::F32, [64, 256])], Chip::V5e).expect_err("misaligned");
    assert_eq!(err.slice.chip, Chip::V5e);
    assert!(err.message.contains("E2002") && err.message.contains("MisalignedBlockAndTiling"), "{err}");
    // lower() refuses it before libtpu, at the BlockSpec's Rust line, by the same rule.
    let traced = call.trace(&[ValueType::new(DType::F32, [64, 256])]).expect("traces");
    let ours = torchtpu_codegen::lower(&traced, torchtpu_codegen::Target::TpuStableHlo).expect_err("misaligned").to_string();
    let spec_line = include_str!("misfits.rs").lines().position(|l| l.contains("in_specs([BlockSpec::new(block")).expect("marker") + 1;
    assert!(ours.contains(&format!("codegen/tests/misfits.rs:{spec_line}")) && ours.contains("multiple of 128") && ours.contains("multiple of 8"), "{ours}");
    // The same kernel with aligned blocks compiles.
    compile(&elementwise(copy::kernel(), [64, 256], [8, 128]), &[ValueType::new(DType::F32, [64, 256])], Chip::V5e).expect("aligned");
}

#[test]
fn blocks_over_the_scoped_vmem_budget_are_rejected_unless_the_limit_is_raised() {
    let big = Matmul { m: 2048, n: 2048, k: 2048, block: (1024, 1024, 1024), dtype: DType::F32 };
    let types: Vec<_> = big.random_inputs(&mut StdRng::seed_from_u64(0)).iter().map(HostArray::value_type).collect();
    let err = compile(&big.call(), &types, Chip::V5e).expect_err("over 16 MiB");
    assert!(err.message.contains("E1001") && err.message.contains("Vmem"), "{err}");
    assert!(err.to_string().contains("v5e"), "{err}");
    compile(&big.call().vmem_limit_bytes(96 << 20), &types, Chip::V5e).expect("fits under a 96 MiB limit");
}

#[test]
fn an_unsupported_dtype_is_reported_at_the_kernel_line() {
    let call = elementwise(exp_of::kernel::<f16>(), [64, 256], [8, 128]);
    let err = compile(&call, &[ValueType::new(DType::F16, [64, 256])], Chip::V6e).expect_err("f16 vectors");
    let loc = err.location.clone().expect("the compiler points into the kernel");
    let src = include_str!("misfits.rs");
    let line = src.lines().position(|l| l.ends_with("// <- f16 load")).expect("marker") as u32 + 1;
    assert!(loc.file.ends_with("codegen/tests/misfits.rs"), "{loc}");
    assert_eq!(loc.line, line, "{err}");
    assert!(err.to_string().starts_with(&format!("{loc}: TPU compile for v6e failed")), "{err}");
    // bf16 is supported on the same chip.
    compile(&elementwise(exp_of::kernel::<bf16>(), [64, 256], [16, 128]), &[ValueType::new(DType::BF16, [64, 256])], Chip::V6e).expect("bf16");
}

#[test]
fn index_maps_stepping_past_the_array_are_rejected_before_compiling() {
    let call = PallasCall::new(copy::kernel())
        .grid([4])
        .in_specs([BlockSpec::new([8, 128], |[i]| (i + 1, 0))])
        .out_specs([BlockSpec::new([8, 128], |[i]| (i, 0))])
        .out_shapes([[32, 128]]);
    let traced = call.trace(&[ValueType::new(DType::F32, [32, 128])]).expect("traces");
    for form in [Form::Pretty, Form::Stable] {
        let err = stablehlo::tpu_custom_call(&traced, form).expect_err("past the array");
        let msg = err.to_string();
        assert!(msg.contains("grid index [3]") && msg.contains("block [4, 0]") && msg.contains("[32, 128]"), "{msg}");
    }
}
