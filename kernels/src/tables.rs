//! The tuned tables: JSON per target (`cpu` and each TPU chip), op name → shape bucket →
//! config, made by `torchtpu tables` and read by every op's calls through [`crate::op`].

use std::collections::BTreeMap;
use std::sync::OnceLock;

use torchtpu_runtime::Chip;

use crate::Error;

/// What a table is for: the CPU through PJRT, or one TPU generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableTarget {
    Cpu,
    Chip(Chip),
}

impl TableTarget {
    pub fn name(self) -> &'static str {
        match self {
            TableTarget::Cpu => "cpu",
            TableTarget::Chip(c) => c.name(),
        }
    }

    pub const ALL: [TableTarget; 6] =
        [TableTarget::Cpu, TableTarget::Chip(Chip::V4), TableTarget::Chip(Chip::V5e), TableTarget::Chip(Chip::V5p), TableTarget::Chip(Chip::V6e), TableTarget::Chip(Chip::Tpu7x)];

    /// Whether int8 dots (int32 sums) run on the target ([`Chip::int8_matmul`]; XLA's CPU
    /// has them).
    pub fn int8_matmul(self) -> bool {
        match self {
            TableTarget::Cpu => true,
            TableTarget::Chip(c) => c.int8_matmul(),
        }
    }

    /// The target called `name` (`cpu`, `v5e`, ...).
    pub fn parse(name: &str) -> Result<TableTarget, Error> {
        TableTarget::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| Error::Table(format!("unknown table target `{name}`; expected cpu, v4, v5e, v5p, v6e or tpu7x")))
    }
}

/// `n` rounded up to a power of two within [lo, hi]: the buckets' unit.
pub fn bucket(n: usize, lo: usize, hi: usize) -> usize {
    n.checked_next_power_of_two().unwrap_or(usize::MAX).clamp(lo, hi)
}

/// A target's table: op name → bucket → config (the op's typed config, as JSON).
pub type Table = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

/// A set of tuned tables, one per target, parsed from JSON texts (a crate's `include_str!`ed
/// files); a text that does not parse is reported when its target is asked for.
pub struct Tables {
    parsed: Vec<(String, Result<Table, String>)>,
}

impl Tables {
    /// The tables in `sources`: (target name, JSON text) pairs.
    pub fn parse(sources: &[(&str, &str)]) -> Tables {
        let parsed = sources.iter().map(|&(name, text)| (name.to_string(), serde_json::from_str(text).map_err(|e| format!("the {name} table is not valid JSON: {e}")))).collect();
        Tables { parsed }
    }

    /// `target`'s table.
    pub fn get(&self, target: TableTarget) -> Result<&Table, Error> {
        match self.parsed.iter().find(|(n, _)| n == target.name()) {
            Some((_, Ok(t))) => Ok(t),
            Some((_, Err(e))) => Err(Error::Table(e.clone())),
            None => Err(Error::Table(format!("no table for {}", target.name()))),
        }
    }

    /// The entry for `op` at `bucket` on `target`, if the table has one.
    pub fn entry(&self, target: TableTarget, op: &str, bucket: &str) -> Option<&serde_json::Value> {
        self.get(target).ok()?.get(op)?.get(bucket)
    }
}

/// The tuned tables of a folder, `<target>.json` for every target of [`TableTarget::ALL`],
/// embedded in the binary: `include_tables!("../tables")`, the path relative to the calling
/// file (as `include_str!`'s).
#[macro_export]
macro_rules! include_tables {
    ($dir:literal) => {
        $crate::tables::Tables::parse(&[
            ("cpu", include_str!(concat!($dir, "/cpu.json"))),
            ("v4", include_str!(concat!($dir, "/v4.json"))),
            ("v5e", include_str!(concat!($dir, "/v5e.json"))),
            ("v5p", include_str!(concat!($dir, "/v5p.json"))),
            ("v6e", include_str!(concat!($dir, "/v6e.json"))),
            ("tpu7x", include_str!(concat!($dir, "/tpu7x.json"))),
        ])
    };
}

/// The tables shipped in this crate (`kernels/tables/<target>.json`), parsed once per process.
pub fn shipped() -> &'static Tables {
    static SHIPPED: OnceLock<Tables> = OnceLock::new();
    SHIPPED.get_or_init(|| crate::include_tables!("../tables"))
}

/// A target's shipped table.
pub fn table(target: TableTarget) -> Result<&'static Table, Error> {
    shipped().get(target)
}

/// The shipped table's entry for `op` at `bucket` on `target`, if it has one.
pub fn entry(target: TableTarget, op: &str, bucket: &str) -> Option<&'static serde_json::Value> {
    shipped().entry(target, op, bucket)
}

/// The table a tuning device's results stand for: a chip ranked without hardware is its own.
pub fn target_of_device(device: torchtpu_autotune::Device) -> Option<TableTarget> {
    match device {
        torchtpu_autotune::Device::Chip(chip) => Some(TableTarget::Chip(chip)),
        torchtpu_autotune::Device::Pjrt(backend) => target_of(backend),
    }
}

/// The table a backend uses: the CPU's for the CPU and the interpreter, a chip's for a TPU
/// (`$TORCHTPU_TPU_CHIP`, default v5e; an unknown chip gets no table, so the heuristic); none
/// for CUDA.
pub fn target_of(backend: torchtpu_exec::Backend) -> Option<TableTarget> {
    use torchtpu_exec::Backend;
    match backend {
        Backend::Cpu | Backend::Interpret => Some(TableTarget::Cpu),
        Backend::Cuda => None,
        Backend::Tpu => match std::env::var("TORCHTPU_TPU_CHIP") {
            Err(_) => Some(TableTarget::Chip(Chip::V5e)),
            Ok(chip) => chip.parse().ok().map(TableTarget::Chip),
        },
    }
}

/// The device `torchtpu tune` tunes for a target (whose cache the ops' calls read).
pub fn tuning_device(target: TableTarget) -> torchtpu_autotune::Device {
    match target {
        TableTarget::Cpu => torchtpu_autotune::Device::Pjrt(torchtpu_exec::Backend::Cpu),
        TableTarget::Chip(c) => torchtpu_autotune::Device::Chip(c),
    }
}
