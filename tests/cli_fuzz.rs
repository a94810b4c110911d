//! Every subcommand with hostile arguments: each run ends with an exit code (never a signal:
//! no panic, abort or OOM kill), non-zero with a message on stderr where the input was bad.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

fn run(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, Option<i32>, String) {
    let cache = std::env::temp_dir().join(format!("torchtpu-cli-fuzz-{}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torchtpu"));
    cmd.args(args).env("TORCHTPU_CACHE_DIR", &cache);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (out.status.code(), out.status.signal(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn hostile_arguments_get_a_message_and_an_exit_code() {
    let huge_m = "m=18446744073709551615";
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["no-such-command"],
        vec!["ir", "no_such_kernel"],
        vec!["ir", "matmul", "--dtype", "f64"],
        vec!["lower", "matmul", "--target", "nonsense"],
        vec!["lower", ""],
        vec!["check", "--chips", "v99"],
        vec!["check"],
        vec!["check", "matmul", "--chips", ""],
        vec!["lower", "matmul", "--target", "tpu-stablehlo", "--mesh", "x=0", "--shard", "x,_"],
        vec!["lower", "matmul", "--target", "tpu-stablehlo", "--mesh", "x=99999999999999999999", "--shard", "x,_"],
        vec!["lower", "matmul", "--target", "tpu-stablehlo", "--mesh", "x=2", "--shard", "x,_"],
        vec!["lower", "matmul", "--mesh", "x=2", "--shard", "x,_", "--shard", "_,_", "--shard", "x,_"],
        vec!["lower", "matmul", "--target", "tpu-stablehlo", "--shard", "x,_"],
        vec!["lower", "matmul", "--target", "tpu-stablehlo", "--mesh", "x=2", "--shard", "y,_", "--shard", "_,_", "--shard", "x,_"],
        vec!["check", "matmul", "--mesh", "x=2", "--shard", "x-,_"],
        vec!["check", "matmul", "--slices", "v5e:2x2"],
        vec!["check", "matmul", "--mesh", "x=4", "--shard", "x,_", "--shard", "_,_", "--shard", "x,_", "--slices", "v5e:2"],
        vec!["run", "matmul", "--set", "m=1e9"],
        vec!["run", "matmul", "--set", "m=1000000000,k=1000000000"],
        vec!["run", "matmul", "--set", huge_m],
        vec!["run", "matmul", "--set", "m=0"],
        vec!["run", "matmul", "--set", "bm=0"],
        vec!["run", "matmul", "--set", "m=-1"],
        vec!["run", "matmul", "--set", "nokey"],
        vec!["run", "matmul", "--set", "zz=3"],
        vec!["run", "flash_attention", "--set", "head_dim=100000000"],
        vec!["run", "flash_attention", "--set", "q_len=2147483647,bq=1"],
        vec!["run", "flash_attention", "--set", "heads=3"],
        vec!["run", "rms_norm", "--set", "eps=nan"],
        vec!["run", "rms_norm", "--set", "block_rows=0"],
        vec!["tune", "matmul", "--set", "bm=64"],
        vec!["run", "matmul", "--backend", "warp-drive"],
        vec!["run", "rms_norm", "--set", "rows=2147483647,dim=2147483647"],
        vec!["interpret", "nope"],
        vec!["interpret", "matmul", "--seed", "-5"],
        vec!["tune", "nope"],
        vec!["tune", "matmul", "--device", "v99"],
        vec!["tune", "matmul", "--strategy", "psychic"],
        vec!["tune", "matmul", "--set", huge_m, "--no-cache"],
        vec!["tune", "matmul", "--set", "m=2147483647,n=2147483647,k=2147483647", "--device", "v5e", "--no-cache"],
        vec!["tune", "flash_attention", "--set", "causal=2"],
        vec!["tune", "matmul", "--set", "m=64,n=64,k=64", "--device", "v5e", "--no-cache", "--plot", "/nonexistent/dir/plot.svg"],
        vec!["tables", "--targets", "v99"],
        vec!["tables", "--targets", "cpu", "--kernels", "nope"],
        vec!["tables", "--targets", "v5e", "--kernels", "matmul", "--dir", "/nonexistent/dir"],
    ];
    for args in &cases {
        let (code, signal, stderr) = run(args, &[]);
        assert_eq!(signal, None, "`torchtpu {}` died of signal {signal:?}:\n{stderr}", args.join(" "));
        assert!(code.is_some_and(|c| c != 0), "`torchtpu {}` exited {code:?}", args.join(" "));
        assert!(!stderr.trim().is_empty(), "`torchtpu {}` failed without a message", args.join(" "));
        assert!(!stderr.contains("panicked"), "`torchtpu {}` panicked:\n{stderr}", args.join(" "));
    }
}

#[test]
fn hostile_environment_gets_a_message_and_an_exit_code() {
    let libtpu = torchtpu_runtime::locate::libtpu().expect("libtpu (run scripts/setup.sh)");
    let libtpu = libtpu.to_string_lossy().into_owned();
    for (var, value) in
        [("TORCHTPU_PJRT_CPU", "/nonexistent.so"), ("TORCHTPU_PJRT_CPU", "/etc/passwd"), ("TORCHTPU_PJRT_CPU", libtpu.as_str()), ("TORCHTPU_LIBTPU", "/nonexistent.so")]
    {
        let args: &[&str] = if var == "TORCHTPU_LIBTPU" { &["check", "matmul", "--chips", "v5e"] } else { &["run", "matmul", "--set", "m=64,n=64,k=64"] };
        let (code, signal, stderr) = run(args, &[(var, value)]);
        assert_eq!(signal, None, "{var}={value}: signal {signal:?}\n{stderr}");
        assert!(code.is_some_and(|c| c != 0) && !stderr.trim().is_empty(), "{var}={value}: exit {code:?}, stderr {stderr}");
    }
}
