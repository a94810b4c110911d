//! The real TPU compiler, deviceless. These tests need the libtpu that `scripts/setup.sh`
//! installs; without it they fail (loudly), they never skip.

use torchtpu_runtime::{Chip, TpuCompiler};

const ADD: &str = r#"module @add {
  func.func public @main(%arg0: tensor<8x128xf32>) -> tensor<8x128xf32> {
    %0 = stablehlo.add %arg0, %arg0 : tensor<8x128xf32>
    return %0 : tensor<8x128xf32>
  }
}"#;

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"))
}

#[test]
fn plain_stablehlo_compiles_for_every_chip() {
    let c = compiler();
    for chip in Chip::ALL {
        let out = c.compile(chip, ADD).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.code_size_bytes > 0, "{chip}: {out:?}");
        // 8×128 additions; the compiler's own count.
        assert_eq!(out.cost("flops"), Some(1024.0), "{chip}: {:?}", out.cost_analysis);
        assert!(out.cost("optimal_seconds").is_some_and(|s| s > 0.0), "{chip}: {:?}", out.cost_analysis);
        assert!(!c.platform_version(chip).expect("version").is_empty());
    }
}

#[test]
fn a_rejected_module_is_a_typed_error_naming_the_chip() {
    let broken = ADD.replace("stablehlo.add", "stablehlo.no_such_op");
    let err = compiler().compile(Chip::V6e, &broken).expect_err("rejected");
    assert_eq!(err.slice.chip, Chip::V6e);
    assert!(err.message.contains("no_such_op"), "{}", err.message);
    assert!(err.to_string().contains("TPU compile for v6e failed"), "{err}");
}

#[test]
fn the_plugin_reports_a_v0_api() {
    let (major, minor) = compiler().plugin().api_version();
    assert_eq!(major, 0);
    assert!(minor >= 100, "PJRT C API 0.{minor} is older than the structs we pass");
}

#[test]
fn a_missing_plugin_is_a_clear_error() {
    let err = torchtpu_runtime::Plugin::load(std::path::Path::new("/nonexistent/libtpu.so")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/libtpu.so"), "{err}");
    let not_a_plugin = torchtpu_runtime::Plugin::load(std::path::Path::new("/bin/true")).expect_err("not a library");
    assert!(not_a_plugin.to_string().contains("cannot load"), "{not_a_plugin}");
}
