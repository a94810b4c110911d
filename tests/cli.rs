//! The `torchtpu` command line, run as a user would.

use std::process::Command;

fn torchtpu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_torchtpu")).args(args).output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn list_names_every_acceptance_kernel() {
    let (code, out, _) = torchtpu(&["list"]);
    assert_eq!(code, 0);
    for family in ["add/", "matmul/", "softmax/", "flash_attention/", "row_stats/", "gather/"] {
        assert!(out.lines().any(|l| l.starts_with(family)), "{family} missing from:\n{out}");
    }
}

#[test]
fn interpret_checks_against_the_reference() {
    let (code, out, err) = torchtpu(&["interpret", "flash_attention", "--dtype", "bf16", "--checked", "--seed", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("flash_attention/bf16/") && out.contains(": ok in") && out.contains("seed 3"), "{out}");
}

#[test]
fn ir_prints_the_kernel_and_its_index_maps() {
    let (code, out, _) = torchtpu(&["ir", "gather"]);
    assert_eq!(code, 0);
    assert!(out.contains("func @index_map_table") && out.contains("func @gather_pages"), "{out}");
}

#[test]
fn unknown_kernel_is_a_clear_error() {
    let (code, _, err) = torchtpu(&["interpret", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no kernel `nope`") && err.contains("torchtpu list"), "{err}");
}
