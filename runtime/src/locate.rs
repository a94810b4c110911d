//! Where plugins live: an environment override, else what `scripts/setup.sh` installed.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The Python venv the setup command installs into.
pub fn venv_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("TORCHTPU_VENV") {
        return Some(PathBuf::from(v));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torchtpu/venv"))
}

/// `relative` inside the venv's `site-packages`, if present.
fn in_site_packages(relative: &str) -> Option<PathBuf> {
    let lib = venv_dir()?.join("lib");
    std::fs::read_dir(lib).ok()?.flatten().map(|e| e.path().join("site-packages").join(relative)).find(|p| p.is_file())
}

/// `libtpu.so`: `$TORCHTPU_LIBTPU`, else the pinned `libtpu` package in the setup venv.
pub fn libtpu() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TORCHTPU_LIBTPU") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(Error::PluginNotFound { kind: "tpu".into(), hint: format!("TORCHTPU_LIBTPU={} is not a file", p.display()) }) };
    }
    in_site_packages("libtpu/libtpu.so").ok_or_else(|| Error::PluginNotFound {
        kind: "tpu".into(),
        hint: format!(
            "no libtpu/libtpu.so in {}; run `bash scripts/setup.sh`, or set TORCHTPU_LIBTPU to a libtpu.so",
            venv_dir().map_or("the setup venv".into(), |v| v.display().to_string())
        ),
    })
}

/// The PJRT CPU plugin: `$TORCHTPU_PJRT_CPU`, else the pinned `fastatomstruct-xla-cpu` package.
pub fn cpu_plugin() -> Result<PathBuf> {
    plugin_from("cpu", "TORCHTPU_PJRT_CPU", "fastatomstruct_xla_cpu/libpjrt_cpu.so")
}

/// The PJRT CUDA plugin: `$TORCHTPU_PJRT_CUDA`, else `jax-cuda13-pjrt`'s, where installed.
pub fn cuda_plugin() -> Result<PathBuf> {
    plugin_from("cuda", "TORCHTPU_PJRT_CUDA", "jax_plugins/xla_cuda13/xla_cuda_plugin.so")
}

fn plugin_from(kind: &str, var: &str, relative: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(Error::PluginNotFound { kind: kind.into(), hint: format!("{var}={} is not a file", p.display()) }) };
    }
    in_site_packages(relative)
        .ok_or_else(|| Error::PluginNotFound { kind: kind.into(), hint: format!("no {relative} in the setup venv; run `bash scripts/setup.sh`, or set {var} to the plugin's .so") })
}
