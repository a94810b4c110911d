//! The `torchtpu` command line, run as a user would.

use std::process::Command;

fn torchtpu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_torchtpu")).args(args).output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn list_names_every_registered_op_with_its_example() {
    let (code, out, _) = torchtpu(&["list"]);
    assert_eq!(code, 0);
    for op in ["matmul ", "flash_attention ", "flash_attention_dkv ", "flash_attention_dq ", "rms_norm ", "rms_norm_backward "] {
        assert!(out.lines().any(|l| l.starts_with(op)), "{op} missing from:\n{out}");
    }
    assert!(out.contains("m=1024") && out.contains("q_len=2048"), "{out}");
}

#[test]
fn interpret_checks_against_the_reference() {
    let set = "heads=2,kv_heads=1,q_len=200,kv_len=136,head_dim=64";
    for op in ["flash_attention", "flash_attention_dkv", "flash_attention_dq"] {
        let (code, out, err) = torchtpu(&["interpret", op, "--dtype", "bf16", "--checked", "--seed", "3", "--set", set]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.starts_with(&format!("{op} ")) && out.contains("dtype=bf16") && out.contains(": ok in") && out.contains("seed 3"), "{out}");
    }
}

#[test]
fn ir_prints_the_kernel_and_its_index_maps() {
    let (code, out, err) = torchtpu(&["ir", "rms_norm", "--set", "rows=64,dim=256,block_rows=16"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("grid [4]") && out.contains("func @"), "{out}");
}

#[test]
fn unknown_kernel_is_a_clear_error() {
    let (code, _, err) = torchtpu(&["interpret", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no op `nope`") && err.contains("torchtpu list"), "{err}");
}

#[test]
fn lower_prints_each_target() {
    let (code, out, err) = torchtpu(&["lower", "matmul", "--target", "mosaic"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("func.func @matmul(") && out.contains("tpu.matmul") && out.contains("window_params"), "{out}");
    let (code, out, _) = torchtpu(&["lower", "matmul", "--target", "mosaic-stable"]);
    assert_eq!(code, 0);
    assert!(out.contains("stable_mosaic.version = 11") && out.contains("\"stable_mosaic.tpu.matmul\""), "{out}");
    let (code, out, _) = torchtpu(&["lower", "flash_attention", "--target", "tpu-stablehlo", "--dtype", "bf16"]);
    assert_eq!(code, 0);
    assert!(out.contains("stablehlo.custom_call @tpu_custom_call") && out.contains("func.func public @main"), "{out}");
}

#[test]
fn lower_writes_the_portable_artifact_as_bytes() {
    let out = Command::new(env!("CARGO_BIN_EXE_torchtpu")).args(["lower", "matmul", "--target", "tpu-artifact", "--dtype", "bf16"]).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.starts_with(b"ML\xefR"), "not MLIR bytecode");
    let producer = b"StableHLO_v1.0.0\0";
    assert_eq!(out.stdout.get(5..5 + producer.len()), Some(&producer[..]));
    // A sharded program stays text.
    let (code, _, err) = torchtpu(&["lower", "matmul", "--target", "tpu-artifact", "--mesh", "x=2", "--shard", "x,_", "--shard", "_,_", "--shard", "x,_"]);
    assert_ne!(code, 0);
    assert!(err.contains("--target tpu-stablehlo"), "{err}");
}

#[test]
fn check_compiles_with_libtpu_and_reports_per_chip() {
    let (code, out, err) = torchtpu(&["check", "rms_norm", "--chips", "v5e,tpu7x", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON per line")).collect();
    assert_eq!(lines.len(), 2);
    for (line, chip) in lines.iter().zip(["v5e", "tpu7x"]) {
        assert_eq!(line["chip"], chip);
        assert_eq!(line["ok"], true);
        assert!(line["error"].is_null());
        assert!(line["kernel"].as_str().is_some_and(|k| k.starts_with("rms_norm ") && k.contains("dtype=f32")), "{line}");
    }
}

#[test]
fn check_compiles_a_sharded_program_for_multi_chip_slices() {
    let shard = ["--mesh", "x=2,y=2", "--shard", "x,_", "--shard", "_,y", "--shard", "x,y"];
    let (code, out, err) = torchtpu(&[&["lower", "matmul", "--target", "tpu-stablehlo", "--set", "m=256,n=256,k=512"][..], &shard].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("mhlo.num_partitions = 4") && out.contains("tensor<512x512xf32> {mhlo.sharding = \"{devices=[2,2]0,1,2,3}\"}") && out.contains("@SPMDFullToShardShape"),
        "{out}"
    );
    let (code, out, err) = torchtpu(&[&["check", "matmul", "--set", "m=256,n=256,k=512", "--slices", "v5e:2x4,tpu7x:2x2x1", "--json"][..], &shard].concat());
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON per line")).collect();
    assert_eq!(lines.iter().map(|l| l["slice"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["v5e:2x4", "tpu7x:2x2x1"]);
    assert!(lines.iter().all(|l| l["ok"] == true && l["devices"] == 4 && l["flops_per_device"].as_f64().is_some_and(|f| f >= 2.0 * 256.0 * 256.0 * 512.0)), "{out}");
}

#[test]
fn check_rejects_an_unknown_chip() {
    let (code, _, err) = torchtpu(&["check", "rms_norm", "--chips", "v9"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown TPU chip `v9`"), "{err}");
}

#[test]
fn run_on_pjrt_cpu_checks_and_times() {
    let (code, out, err) = torchtpu(&["run", "matmul", "--backend", "cpu", "--set", "m=200,n=136,k=300,bm=64", "--dtype", "bf16", "--json", "--seed", "5"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert!(v["kernel"].as_str().is_some_and(|k| k.starts_with("matmul ") && k.contains("m=200") && k.contains(" @ ") && k.contains("bm=64")), "{v}");
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["ok"], true);
    assert!(v["max_abs_err"].as_f64().is_some_and(|e| e > 0.0 && e < 1.0), "{v}");
    assert!(v["time_ms"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    let (code, out, _) = torchtpu(&["run", "rms_norm_backward", "--backend", "interpret", "--set", "rows=100,dim=200"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("on interpret: ok"), "{out}");
}

#[test]
fn run_reports_bad_settings_and_missing_hardware() {
    let (code, _, err) = torchtpu(&["run", "matmul", "--set", "q=3"]);
    assert_eq!(code, 2);
    assert!(err.contains("`matmul` has no setting `q`; it takes batch, k, m, n, transpose_b (the problem) and bk, bm, bn (the config)"), "{err}");
    let (code, _, err) = torchtpu(&["run", "matmul", "--backend", "gpu"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown backend `gpu`"), "{err}");
    let (code, _, err) = torchtpu(&["run", "rms_norm", "--backend", "tpu"]);
    assert_eq!(code, 2);
    assert!(err.contains("no TPU to run on") && err.contains("torchtpu check"), "{err}");
}

#[test]
fn tune_ranks_for_a_chip_and_answers_the_second_time_from_the_cache() {
    let cache = std::env::temp_dir().join(format!("torchtpu-cli-tune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let tune = |extra: &[&str]| {
        let mut args = vec!["tune", "matmul", "--device", "v6e", "--dtype", "bf16", "--set", "m=512,n=512,k=512", "--json"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_torchtpu")).args(&args).env("TORCHTPU_CACHE_DIR", &cache).output().expect("runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (first, table) = tune(&[]);
    assert_eq!(first["cache_hit"], false);
    assert_eq!(first["device"], "v6e");
    for field in ["best_config", "best_time_ms", "default_time_ms", "evaluated", "pruned"] {
        assert!(!first[field].is_null(), "{field} missing: {first}");
    }
    assert!(table.contains("predicted, compiled"), "{table}");
    let (second, _) = tune(&[]);
    assert_eq!(second["cache_hit"], true);
    assert_eq!(second["best_config"], first["best_config"]);
    // Times measured on the chip, beside the prediction: here the predicted best measured slower.
    let best = first["best_config"].as_str().expect("best").to_string();
    let ranked: Vec<&str> = table.lines().filter(|l| l.contains("predicted, compiled")).filter_map(|l| l.split_whitespace().next()).collect();
    // The slowest: its prediction differs from the best's (the fastest few may tie).
    let other = ranked.iter().rev().find(|c| **c != best).expect("another compiled candidate").to_string();
    let measured = cache.join("measured.json");
    std::fs::write(&measured, serde_json::json!({ best.clone(): 2.0, other: 1.0 }).to_string()).expect("writes");
    let (third, table) = tune(&["--no-cache", "--measured", measured.to_str().expect("utf-8")]);
    assert_eq!(third["agreement"]["compared"], 2, "{third}");
    assert_eq!(third["agreement"]["best_measured_rank"], 2, "{third}");
    assert!(table.contains("measured 2.0000 ms"), "{table}");
    std::fs::write(&measured, "[1, 2]").expect("writes");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_torchtpu"))
        .args(["tune", "matmul", "--device", "v6e", "--measured", measured.to_str().expect("utf-8")])
        .env("TORCHTPU_CACHE_DIR", &cache)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a JSON object of config to milliseconds"));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn tune_rejects_what_it_cannot_tune() {
    let (code, _, err) = torchtpu(&["tune", "softmax"]);
    assert_eq!(code, 2);
    assert!(err.contains("no op `softmax`") && err.contains("the ops are matmul, flash_attention"), "{err}");
    let (code, _, err) = torchtpu(&["tune", "matmul", "--device", "v9"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown device `v9`"), "{err}");
}
