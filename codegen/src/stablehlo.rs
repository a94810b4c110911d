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

/// A complete StableHLO module whose `@main` runs the kernel through `tpu_custom_call`.
pub fn tpu_custom_call(call: &TracedCall, form: Form) -> Result<String> {
    let config = backend_config(call, form)?;
    let operands: Vec<&ValueType> = call.operand_types().collect();
    let results: Vec<&ValueType> = call.outputs.iter().map(|o| &o.array).collect();
    let arg_types: Vec<String> = operands.iter().map(|t| tensor_type(t)).collect();
    let result_types: Vec<String> = results.iter().map(|t| tensor_type(t)).collect();
    let args: Vec<String> = (0..operands.len()).map(|i| format!("%arg{i}")).collect();
    let params: Vec<String> = args.iter().zip(&arg_types).map(|(a, t)| format!("{a}: {t}")).collect();
    let results_sig = if result_types.len() == 1 { result_types[0].clone() } else { format!("({})", result_types.join(", ")) };
    let operand_layouts: Vec<String> = operands.iter().map(|t| row_major_layout(t.shape.len())).collect();
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
    let (lhs, rets) = match results.len() {
        1 => ("%0".to_string(), "%0".to_string()),
        n => (format!("%0:{n}"), (0..n).map(|i| format!("%0#{i}")).collect::<Vec<_>>().join(", ")),
    };
    let mut s = String::new();
    let _ = writeln!(s, "module @{} attributes {{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32}} {{", symbol(&call.name));
    let _ = writeln!(s, "  func.func public @main({}) -> {results_sig} {{", params.join(", "));
    let _ = writeln!(s, "    {lhs} = stablehlo.custom_call @tpu_custom_call({}) {{{}}} : ({}) -> {results_sig}", args.join(", "), attrs.join(", "), arg_types.join(", "));
    let _ = writeln!(s, "    return {rets} : {}", result_types.join(", "));
    s.push_str("  }\n}\n");
    Ok(s)
}
