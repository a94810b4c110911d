//! The TPU module as a StableHLO portable artifact (what TorchTPU's bridge is given): libtpu
//! compiles every registered op's artifact into the same program as its text (each op's own
//! tests compile its artifacts for every chip), and the artifact carries the VHLO version it
//! was written at. That it deserializes to the very module of the text form is
//! checked against jaxlib's deserializer in `python/tests/test_artifact.py`.

use torchtpu_codegen::artifact::VHLO_VERSION;
use torchtpu_codegen::lower_tpu;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_kernels::registry;
use torchtpu_runtime::{Chip, TpuCompiler};

/// `x + y` in place of `x`, and `x - y`: no shipped op aliases an operand, this one does.
#[tpu_kernel]
fn add_in_place<T: Float>(x: &Ref<T>, y: &Ref<T>, sum: &mut Ref<T>, difference: &mut Ref<T>) {
    sum.store(x.load() + y.load());
    difference.store(x.load() - y.load());
}

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"))
}

#[test]
fn every_registered_op_artifact_compiles_as_its_text_does() {
    let compiler = compiler();
    let mut failures = Vec::new();
    for op in registry::ops() {
        // One chip: each op's own tests compile its artifacts for every chip.
        let chip = Chip::V6e;
        let module = op.tpu_module(&op.example(), chip).unwrap_or_else(|e| panic!("{} on {chip}: {e}", op.name()));
        let producer = format!("StableHLO_v{VHLO_VERSION}\0");
        assert!(module.artifact.starts_with(b"ML\xefR"), "{}: not MLIR bytecode", op.name());
        assert_eq!(module.artifact.get(5..5 + producer.len()), Some(producer.as_bytes()), "{}: the producer names the VHLO version", op.name());
        // One module in two spellings: libtpu makes code of the same size of both.
        match (compiler.compile(chip, &module.artifact), compiler.compile(chip, &module.text)) {
            (Ok(artifact), Ok(text)) if artifact.code_size_bytes == text.code_size_bytes => {}
            (artifact, text) => failures.push(format!("{} on {chip}: artifact {artifact:?}, text {text:?}", op.name())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_damaged_artifact_is_an_error() {
    let compiler = compiler();
    let op = registry::find("matmul").expect("matmul is registered");
    let artifact = op.tpu_module(&op.example(), Chip::V5e).expect("lowers").artifact;
    // Cut anywhere in the header, the tables or the ops: libtpu reports it, never crashes.
    let cuts = [0, 4, 5, 12, 40, artifact.len() / 3, artifact.len() / 2, artifact.len() - 30, artifact.len() - 1];
    for cut in cuts {
        assert!(compiler.compile(Chip::V5e, &artifact[..cut]).is_err(), "a cut at {cut} of {} bytes compiled", artifact.len());
    }
}

#[test]
fn an_aliased_operand_survives_the_artifact() {
    let compiler = compiler();
    let spec = || BlockSpec::new([256, 128], |[i]| (i, 0));
    let call = PallasCall::new(add_in_place::kernel::<f32>())
        .grid([4])
        .in_specs([spec(), spec()])
        .out_specs([spec(), spec()])
        .out_shapes([[1024, 128], [1024, 128]])
        .input_output_aliases([(0, 0)]);
    let types = [ValueType::new(DType::F32, [1024, 128]), ValueType::new(DType::F32, [1024, 128])];
    let module = lower_tpu(&call.trace(&types).expect("traces")).expect("lowers");
    assert!(module.text.contains("output_operand_aliases"), "{}", module.text);
    for chip in [Chip::V5e, Chip::V6e] {
        let artifact = compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{chip}: {e}"));
        let text = compiler.compile(chip, &module.text).unwrap_or_else(|e| panic!("{chip}: {e}"));
        assert_eq!(artifact.code_size_bytes, text.code_size_bytes, "{chip}");
    }
}
