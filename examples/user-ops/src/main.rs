//! `user-ops`: the torchtpu command line over this crate's ops (`list`, `ir`, `lower`, `check`,
//! `run`, `interpret`, `tune`, `tables`).

use torchtpu::cli::{main_with, Ops};

fn main() -> std::process::ExitCode {
    main_with(&Ops { program: "user-ops", ops: user_ops::OPS, tables_dir: "tables" })
}
