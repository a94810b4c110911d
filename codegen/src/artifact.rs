//! The TPU module as a StableHLO *portable artifact* ([`crate::lower_tpu`]): the module of
//! [`crate::stablehlo::tpu_custom_call`] in StableHLO's versioned dialect (VHLO), written as
//! MLIR bytecode whose producer names the VHLO version. It is what `jax.export` hands
//! TorchTPU's bridge (`mlir_module_serialized`), and what `stablehlo::deserializePortableArtifact`
//! (in libtpu, jaxlib and TorchTPU) reads back into StableHLO.

use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::DType;

use crate::bytecode::{self, Block, Operation};
use crate::stablehlo::{mlir_string, KernelCall};

/// The VHLO version the artifact is written at: the first with StableHLO's compatibility
/// guarantees. Every op and attribute the module uses exists unchanged there, and a consumer
/// reads any version from its minimum (0.9.0 in jaxlib 0.10.2) up to its own, so the lowest
/// version is read by the most consumers (JAX writes its 12-week-old version, 1.13.7 in
/// jaxlib 0.10.2, for the same reason).
pub const VHLO_VERSION: &str = "1.0.0";

/// The module `name` whose `@main` runs `kernel`, as [`crate::stablehlo::module_text`] writes
/// it in text.
pub(crate) fn module(name: &str, kernel: &KernelCall) -> Vec<u8> {
    let arguments: Vec<String> = kernel.operands.iter().map(tensor_type).collect();
    let results: Vec<String> = kernel.results.iter().map(tensor_type).collect();
    let first_result = arguments.len() as u64;
    let call = Operation {
        name: "vhlo.custom_call_v1".into(),
        attributes: Some(custom_call_attributes(kernel)),
        results: results.clone(),
        operands: (0..first_result).collect(),
        regions: vec![],
    };
    let ret =
        Operation { name: "vhlo.return_v1".into(), attributes: None, results: vec![], operands: (first_result..first_result + results.len() as u64).collect(), regions: vec![] };
    let function_attributes = format!(
        "{{arg_attrs = {}, function_type = #vhlo.type_v1<!vhlo.func_v1<({}) -> {}>>, res_attrs = {}, sym_name = {}, sym_visibility = {}}}",
        array([]),
        arguments.join(", "),
        results.join(", "),
        array([]),
        string("main"),
        string("public"),
    );
    let main = Operation {
        name: "vhlo.func_v1".into(),
        attributes: Some(function_attributes),
        results: vec![],
        operands: vec![],
        regions: vec![vec![Block { arguments, operations: vec![call, ret] }]],
    };
    let module = Operation {
        name: "builtin.module".into(),
        attributes: Some(format!("{{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32, sym_name = \"{name}\"}}")),
        results: vec![],
        operands: vec![],
        regions: vec![vec![Block { arguments: vec![], operations: vec![main] }]],
    };
    bytecode::write(&format!("StableHLO_v{VHLO_VERSION}"), &module)
}

/// The custom call's attributes as VHLO spells them: every one explicit, defaults included.
fn custom_call_attributes(kernel: &KernelCall) -> String {
    let layouts = |types: &[ValueType]| array(KernelCall::layouts(types).map(|l| format!("#vhlo.tensor_v1<{l}>")));
    let aliases = array(kernel.aliases.iter().map(|&(operand, output)| {
        format!("#vhlo.output_operand_alias_v1<outputTupleIndices = {}, operandIndex = {operand}, operandTupleIndices = []>", kernel.alias_output(output))
    }));
    format!(
        "{{api_version = #vhlo<api_version_v1 API_VERSION_ORIGINAL>, backend_config = {}, call_target_name = {}, called_computations = {}, has_side_effect = #vhlo.bool_v1<false>, kernel_name = {}, operand_layouts = {}, output_operand_aliases = {aliases}, result_layouts = {}}}",
        string(&kernel.backend_config),
        string("tpu_custom_call"),
        array([]),
        string(&kernel.kernel_name),
        layouts(&kernel.operands),
        layouts(&kernel.results),
    )
}

/// `!vhlo.tensor_v1<2x3x!vhlo.f32_v1>`.
fn tensor_type(t: &ValueType) -> String {
    let element = match t.dtype {
        DType::F32 => "f32_v1",
        DType::BF16 => "bf16_v1",
        DType::F16 => "f16_v1",
        DType::I32 => "i32_v1",
        DType::I8 => "i8_v1",
        DType::Bool => "bool_v1",
    };
    let dims: String = t.shape.iter().map(|d| format!("{d}x")).collect();
    format!("!vhlo.tensor_v1<{dims}!vhlo.{element}>")
}

fn string(s: &str) -> String {
    format!("#vhlo.string_v1<\"{}\">", mlir_string(s))
}

fn array(items: impl IntoIterator<Item = String>) -> String {
    format!("#vhlo.array_v1<[{}]>", items.into_iter().collect::<Vec<_>>().join(", "))
}
