//! A missing or broken plugin is a clear error. (Alone in its test binary: it sets the
//! environment variable that points at the plugin.)

use torchtpu_exec::{run, Backend};
use torchtpu_runtime::Plugin;
use torchtpu_testkernels::{add::Add, Example};

#[test]
fn a_missing_or_broken_plugin_is_a_clear_error() {
    std::env::set_var("TORCHTPU_PJRT_CPU", "/nonexistent/libpjrt_cpu.so");
    let ex = Add { rows: 16, cols: 128, block: (16, 128), dtype: torchtpu_dsl::DType::F32 };
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(1));
    let err = run(&ex.call(), Backend::Cpu, &inputs).expect_err("no plugin").to_string();
    assert!(err.contains("cpu PJRT plugin was not found") && err.contains("TORCHTPU_PJRT_CPU=/nonexistent"), "{err}");

    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a libc to stand in for a broken plugin");
    let err = Plugin::load(std::path::Path::new(libc)).expect_err("not a PJRT plugin").to_string();
    assert!(err.contains("GetPjrtApi"), "{err}");
}
