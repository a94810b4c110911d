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
pub(crate) fn mlir_string(s: &str) -> String {
    s.replace('\\', "\\5C").replace('"', "\\22")
}

/// What the `stablehlo.custom_call @tpu_custom_call` running a kernel says, whichever way it
/// is spelled: as StableHLO text here, as VHLO in the portable artifact
/// ([`crate::artifact`]).
pub(crate) struct KernelCall {
    /// The `backend_config` JSON.
    pub backend_config: String,
    pub kernel_name: String,
    pub operands: Vec<ValueType>,
    pub results: Vec<ValueType>,
    /// (operand, output) pairs that share a buffer.
    pub aliases: Vec<(usize, usize)>,
}

impl KernelCall {
    pub fn new(call: &TracedCall, form: Form) -> Result<KernelCall> {
        Ok(KernelCall {
            backend_config: backend_config(call, form)?.to_string(),
            kernel_name: mosaic::kernel_symbol(call),
            operands: call.operand_types().cloned().collect(),
            results: call.outputs.iter().map(|o| o.array.clone()).collect(),
            aliases: call.aliases.clone(),
        })
    }

    /// Every operand and result is passed row-major: each one's layout, minor-to-major.
    pub fn layouts(types: &[ValueType]) -> impl Iterator<Item = String> + '_ {
        types.iter().map(|t| row_major_layout(t.shape.len()))
    }

    /// The output tuple index an alias names: `[o]` among several results, `[]` for one.
    pub fn alias_output(&self, output: usize) -> String {
        if self.results.len() > 1 {
            format!("[{output}]")
        } else {
            "[]".into()
        }
    }

    /// The op as one line of StableHLO text binding `result` (`%r`, or `%r:2` for two
    /// outputs) on `operands` (SSA names).
    pub fn text(&self, result: &str, operands: &[String]) -> String {
        let mut attrs = vec![
            format!("backend_config = \"{}\"", mlir_string(&self.backend_config)),
            format!("kernel_name = \"{}\"", self.kernel_name),
            format!("operand_layouts = [{}]", Self::layouts(&self.operands).collect::<Vec<_>>().join(", ")),
            format!("result_layouts = [{}]", Self::layouts(&self.results).collect::<Vec<_>>().join(", ")),
        ];
        if !self.aliases.is_empty() {
            let aliases: Vec<String> = self
                .aliases
                .iter()
                .map(|&(i, o)| format!("#stablehlo.output_operand_alias<output_tuple_indices = {}, operand_index = {i}, operand_tuple_indices = []>", self.alias_output(o)))
                .collect();
            attrs.push(format!("output_operand_aliases = [{}]", aliases.join(", ")));
        }
        let arg_types: Vec<String> = self.operands.iter().map(tensor_type).collect();
        format!("{result} = stablehlo.custom_call @tpu_custom_call({}) {{{}}} : ({}) -> {}", operands.join(", "), attrs.join(", "), arg_types.join(", "), signature(&self.results))
    }
}

/// The `stablehlo.custom_call @tpu_custom_call` that runs the kernel on `operands` (SSA names
/// of its operand types), as one line binding `result` (`%r`, or `%r:2` for two outputs).
pub(crate) fn custom_call_op(call: &TracedCall, form: Form, result: &str, operands: &[String]) -> Result<String> {
    Ok(KernelCall::new(call, form)?.text(result, operands))
}

/// Result types as a function signature writes them: `T` or `(T, U)`.
fn signature(types: &[ValueType]) -> String {
    let types: Vec<String> = types.iter().map(tensor_type).collect();
    if types.len() == 1 {
        types[0].clone()
    } else {
        format!("({})", types.join(", "))
    }
}

/// The kernel's result types as a function signature writes them: `T` or `(T, U)`.
pub(crate) fn results_signature(call: &TracedCall) -> String {
    let types: Vec<ValueType> = call.outputs.iter().map(|o| o.array.clone()).collect();
    signature(&types)
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
    Ok(module_text(&symbol(&call.name), &KernelCall::new(call, form)?))
}

/// The module `name` whose `@main` runs `kernel` on its arguments and returns its results.
pub(crate) fn module_text(name: &str, kernel: &KernelCall) -> String {
    let params: Vec<String> = kernel.operands.iter().enumerate().map(|(i, t)| format!("%arg{i}: {}", tensor_type(t))).collect();
    let args: Vec<String> = (0..kernel.operands.len()).map(|i| format!("%arg{i}")).collect();
    let n = kernel.results.len();
    let result_types: Vec<String> = kernel.results.iter().map(tensor_type).collect();
    let mut s = String::new();
    let _ = writeln!(s, "module @{name} attributes {{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32}} {{");
    let _ = writeln!(s, "  func.func public @main({}) -> {} {{", params.join(", "), signature(&kernel.results));
    let _ = writeln!(s, "    {}", kernel.text(&result_binding("%0", n), &args));
    let _ = writeln!(s, "    return {} : {}", result_names("%0", n).join(", "), result_types.join(", "));
    s.push_str("  }\n}\n");
    s
}
