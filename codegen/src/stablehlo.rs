//! StableHLO modules around a Mosaic kernel: `func.func public @main` calling
//! `stablehlo.custom_call @tpu_custom_call` with the backend config libtpu expects.

use std::fmt::Write;

use base64::Engine;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::TracedCall;

use crate::cost;
use crate::error::Result;
use crate::mlir::{symbol, tensor_type};
use crate::mosaic::{self, Form};

/// `dense<[r-1, ..., 0]> : tensor<rxindex>`: row-major, as every operand we pass is.
fn row_major_layout(rank: usize) -> String {
    let dims: Vec<String> = (0..rank).rev().map(|d| d.to_string()).collect();
    match rank {
        0 => "dense<> : tensor<0xindex>".into(),
        1 => "dense<0> : tensor<1xindex>".into(),
        _ => format!("dense<[{}]> : tensor<{rank}xindex>", dims.join(", ")),
    }
}

/// The `backend_config` JSON for a kernel body in `form`.
pub fn backend_config(call: &TracedCall, form: Form) -> Result<serde_json::Value> {
    let body = mosaic::module(call, form)?;
    let cost = cost::estimate(call);
    let mut config = serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.as_bytes()),
        "cost_estimate": {
            "flops": cost.flops,
            "transcendentals": cost.transcendentals,
            "bytes_accessed": cost.bytes_accessed,
            "remote_bytes_transferred": 0,
        },
        "needs_layout_passes": true,
    });
    if form == Form::Stable {
        config["serialization_format"] = 1.into();
    }
    let mut top = serde_json::json!({ "custom_call_config": config });
    if let Some(limit) = call.vmem_limit_bytes {
        top["scoped_memory_configs"] = serde_json::json!([{ "memory_space": 1, "offset": 0, "size": limit }]);
    }
    Ok(top)
}

/// Escapes a string for an MLIR string attribute the way JAX writes backend configs.
fn mlir_string(s: &str) -> String {
    s.replace('\\', "\\5C").replace('"', "\\22")
}

/// The `stablehlo.custom_call @tpu_custom_call` that runs the kernel on `operands` (SSA names
/// of its operand types), as one line binding `result` (`%r`, or `%r:2` for two outputs).
pub(crate) fn custom_call_op(call: &TracedCall, form: Form, result: &str, operands: &[String]) -> Result<String> {
    let config = backend_config(call, form)?;
    let operand_types: Vec<&ValueType> = call.operand_types().collect();
    let results: Vec<&ValueType> = call.outputs.iter().map(|o| &o.array).collect();
    let arg_types: Vec<String> = operand_types.iter().map(|t| tensor_type(t)).collect();
    let operand_layouts: Vec<String> = operand_types.iter().map(|t| row_major_layout(t.shape.len())).collect();
    let result_layouts: Vec<String> = results.iter().map(|t| row_major_layout(t.shape.len())).collect();
    let mut attrs = vec![
        format!("backend_config = \"{}\"", mlir_string(&config.to_string())),
        format!("kernel_name = \"{}\"", mosaic::kernel_symbol(call)),
        format!("operand_layouts = [{}]", operand_layouts.join(", ")),
        format!("result_layouts = [{}]", result_layouts.join(", ")),
    ];
    if !call.aliases.is_empty() {
        let multi = results.len() > 1;
        let aliases: Vec<String> = call
            .aliases
            .iter()
            .map(|&(i, o)| {
                let out_idx = if multi { format!("[{o}]") } else { "[]".into() };
                format!("#stablehlo.output_operand_alias<output_tuple_indices = {out_idx}, operand_index = {i}, operand_tuple_indices = []>")
            })
            .collect();
        attrs.push(format!("output_operand_aliases = [{}]", aliases.join(", ")));
    }
    Ok(format!("{result} = stablehlo.custom_call @tpu_custom_call({}) {{{}}} : ({}) -> {}", operands.join(", "), attrs.join(", "), arg_types.join(", "), results_signature(call)))
}

/// The kernel's result types as a function signature writes them: `T` or `(T, U)`.
pub(crate) fn results_signature(call: &TracedCall) -> String {
    let types: Vec<String> = call.outputs.iter().map(|o| tensor_type(&o.array)).collect();
    if types.len() == 1 {
        types[0].clone()
    } else {
        format!("({})", types.join(", "))
    }
}

/// The SSA names of a call's results bound by [`custom_call_op`] as `name`: `name` for one,
/// `name#i` for several.
pub(crate) fn result_names(name: &str, count: usize) -> Vec<String> {
    match count {
        1 => vec![name.to_string()],
        n => (0..n).map(|i| format!("{name}#{i}")).collect(),
    }
}

/// The left-hand side binding `count` results to `name`.
pub(crate) fn result_binding(name: &str, count: usize) -> String {
    if count == 1 {
        name.to_string()
    } else {
        format!("{name}:{count}")
    }
}

/// A complete StableHLO module whose `@main` runs the kernel through `tpu_custom_call`.
pub fn tpu_custom_call(call: &TracedCall, form: Form) -> Result<String> {
    let operand_types: Vec<String> = call.operand_types().map(tensor_type).collect();
    let args: Vec<String> = (0..operand_types.len()).map(|i| format!("%arg{i}")).collect();
    let params: Vec<String> = args.iter().zip(&operand_types).map(|(a, t)| format!("{a}: {t}")).collect();
    let n = call.outputs.len();
    let op = custom_call_op(call, form, &result_binding("%0", n), &args)?;
    let result_types: Vec<String> = call.outputs.iter().map(|o| tensor_type(&o.array)).collect();
    let mut s = String::new();
    let _ = writeln!(s, "module @{} attributes {{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32}} {{", symbol(&call.name));
    let _ = writeln!(s, "  func.func public @main({}) -> {} {{", params.join(", "), results_signature(call));
    let _ = writeln!(s, "    {op}");
    let _ = writeln!(s, "    return {} : {}", result_names("%0", n).join(", "), result_types.join(", "));
    s.push_str("  }\n}\n");
    Ok(s)
}
