//! The on-disk cache of tuning results: human-readable JSON, one file per key, written
//! atomically (temp file + rename) so concurrent writers never leave a torn file.

use std::path::{Path, PathBuf};

use crate::report::TuneReport;

/// Bumped when the file format or what a result means changes; older files are then stale
/// (3: chip candidates past the default scoped VMEM get a raised limit instead of pruning).
pub const FORMAT_VERSION: u32 = 3;

/// Everything a result depends on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheKey {
    pub format: u32,
    pub kernel: String,
    pub problem: String,
    /// The exact device: `cpu`, or a TPU generation such as `v5e`.
    pub device: String,
    /// The plugin's own version string (PJRT platform version, or libtpu's).
    pub platform_version: String,
    /// A hash of the kernel's IR and index maps at the default config.
    pub ir_hash: String,
    pub strategy: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    key: CacheKey,
    report: TuneReport,
}

/// `$TORCHTPU_CACHE_DIR`, else `~/.cache/torchtpu`; tuning results live in `autotune/` below it.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("TORCHTPU_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torchtpu")))
        .unwrap_or_else(|| std::env::temp_dir().join("torchtpu"));
    base.join("autotune")
}

/// FNV-1a of `s`, as 16 hex digits.
pub fn hash(s: &str) -> String {
    format!("{:016x}", s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)))
}

fn path(dir: &Path, key: &CacheKey) -> PathBuf {
    let name: String = format!("{}-{}-{}", key.kernel, key.device, hash(&serde_json::to_string(key).unwrap_or_default()))
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    dir.join(format!("{name}.json"))
}

/// The cached report for `key`; a missing file is `Ok(None)`, a corrupt or stale one is
/// `Err(warning)` (and is ignored by the caller, never fatal).
pub fn load(dir: &Path, key: &CacheKey) -> Result<Option<TuneReport>, String> {
    let p = path(dir, key);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("ignoring unreadable tuning cache {}: {e}", p.display())),
    };
    let entry: Entry = serde_json::from_str(&text).map_err(|e| format!("ignoring corrupt tuning cache {}: {e}", p.display()))?;
    if entry.key != *key {
        return Err(format!("ignoring stale tuning cache {} (it was made for another kernel version, device or plugin)", p.display()));
    }
    Ok(Some(entry.report))
}

/// Stores `report` under `key`; returns a warning if it could not.
pub fn store(dir: &Path, key: &CacheKey, report: &TuneReport) -> Result<(), String> {
    let p = path(dir, key);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create the tuning cache {}: {e}", dir.display()))?;
    let entry = Entry { key: key.clone(), report: report.clone() };
    let text = serde_json::to_string_pretty(&entry).map_err(|e| format!("cannot serialize a tuning result: {e}"))?;
    let tmp = dir.join(format!(".{}.{}.{}.tmp", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id(), rand::random::<u32>()));
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &p).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", p.display())
    })
}

/// Where `key` is cached under `dir` (for messages and tests).
pub fn location(dir: &Path, key: &CacheKey) -> PathBuf {
    path(dir, key)
}
