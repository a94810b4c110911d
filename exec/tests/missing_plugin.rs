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

    // libtpu named as the CPU plugin is recognised before it initializes (which would block
    // for minutes on cloud metadata retries off a TPU VM): a prompt error, never a hang.
    let libtpu = torchtpu_runtime::locate::libtpu().expect("libtpu (run scripts/setup.sh)");
    std::env::set_var("TORCHTPU_PJRT_CPU", &libtpu);
    let (tx, rx) = std::sync::mpsc::channel();
    let (call, inputs2) = (ex.call(), inputs.clone());
    std::thread::spawn(move || tx.send(run(&call, Backend::Cpu, &inputs2).map(|_| ()).map_err(|e| e.to_string())));
    let err = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("an answer within a minute, not a hang").expect_err("libtpu is no CPU plugin");
    assert!(err.contains("this is libtpu") && err.contains("libpjrt_cpu.so"), "{err}");
}
