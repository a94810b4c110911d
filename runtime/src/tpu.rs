//! Compiling for TPU chips without a TPU: libtpu's PJRT plugin and deviceless topologies.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::ffi::{self, Slot};
use crate::plugin::Plugin;

pub use torchtpu_hw::{Chip, Slice};

/// Where in the kernel's Rust source a compiler message points (from the module's `loc`s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceLocation {
    pub file: String,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The TPU compiler rejected a module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}TPU compile for {} failed: {message}", location.as_ref().map(|l| format!("{l}: ")).unwrap_or_default(), if *slice == Slice::smallest(slice.chip) { slice.chip.to_string() } else { slice.to_string() })]
pub struct CompileError {
    /// The slice it was compiled for (the chip's smallest for a single-device module).
    pub slice: Slice,
    /// The first Rust source location the compiler's message mentions, if any.
    pub location: Option<SourceLocation>,
    pub message: String,
}

/// The first `something.rs:LINE:COL` (or MLIR's `"something.rs":LINE:COL`) in `message`.
pub fn rust_location(message: &str) -> Option<SourceLocation> {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let mut search = 0;
    while let Some(pos) = message[search..].find(".rs") {
        let file_end = search + pos + 3;
        search = file_end;
        let after = &message[file_end..];
        let after = after.strip_prefix('"').unwrap_or(after);
        let Some(rest) = after.strip_prefix(':') else { continue };
        let n_line = digits(rest);
        let Some(col) = rest[n_line..].strip_prefix(':') else { continue };
        let n_col = digits(col);
        if n_line == 0 || n_col == 0 {
            continue;
        }
        let file_start = message[..file_end].rfind(|c: char| c.is_whitespace() || "\"'(".contains(c)).map_or(0, |i| i + 1);
        return Some(SourceLocation { file: message[file_start..file_end].to_string(), line: rest[..n_line].parse().ok()?, column: col[..n_col].parse().ok()? });
    }
    None
}

/// What a successful compile reports.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledModule {
    pub chip: Chip,
    /// Devices the program runs on (its SPMD partitions).
    pub partitions: u64,
    pub code_size_bytes: i64,
    /// The compiler's cost analysis (e.g. `flops`, `bytes accessed`, `transcendentals`).
    pub cost_analysis: Vec<(String, f64)>,
}

impl CompiledModule {
    /// One entry of the compiler's cost analysis, by name.
    pub fn cost(&self, name: &str) -> Option<f64> {
        self.cost_analysis.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

/// A libtpu topology description, by its name in [`TpuCompiler`]'s cache.
struct Topology(*mut c_void);
// SAFETY: a topology description is immutable after creation and used only through PJRT calls.
unsafe impl Send for Topology {}

/// libtpu used as a compiler for TPU topologies, with no TPU attached.
pub struct TpuCompiler {
    plugin: Plugin,
    topologies: Mutex<HashMap<String, Topology>>,
}

impl fmt::Debug for TpuCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpuCompiler").field("plugin", &self.plugin).finish()
    }
}

fn set_default_env(name: &str, value: &str) {
    if std::env::var_os(name).is_none() {
        // Before libtpu is loaded, on the one thread that loads it (guarded by a OnceLock).
        std::env::set_var(name, value);
    }
}

/// Loads the `libtpu` that [`crate::locate::libtpu`] finds, with the environment it needs
/// off a Cloud TPU VM. Every load of libtpu goes through here.
pub fn load_libtpu() -> Result<Plugin> {
    static ENV: OnceLock<()> = OnceLock::new();
    ENV.get_or_init(|| {
        // Without it libtpu queries a cloud metadata server for minutes before giving up.
        set_default_env("TPU_SKIP_MDS_QUERY", "1");
        set_default_env("TPU_ACCELERATOR_TYPE", "v5litepod-4");
        set_default_env("TPU_WORKER_HOSTNAMES", "localhost");
        // libtpu otherwise takes /tmp/libtpu_lockfile, and a second process (a parallel
        // test, a second `torchtpu check`) fails to initialize while the first runs.
        set_default_env("ALLOW_MULTIPLE_LIBTPU_LOAD", "1");
    });
    Plugin::load(&crate::locate::libtpu()?)
}

impl TpuCompiler {
    /// The process-wide compiler over the libtpu of [`load_libtpu`].
    pub fn shared() -> Result<&'static TpuCompiler> {
        static SHARED: OnceLock<std::result::Result<TpuCompiler, Error>> = OnceLock::new();
        SHARED.get_or_init(|| TpuCompiler::new(load_libtpu()?)).as_ref().map_err(Clone::clone)
    }

    pub fn new(plugin: Plugin) -> Result<TpuCompiler> {
        Ok(TpuCompiler { plugin, topologies: Mutex::new(HashMap::new()) })
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    fn topology(&self, slice: &Slice) -> Result<*mut c_void> {
        let name = slice.topology();
        let mut topologies = self.topologies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = topologies.get(&name) {
            return Ok(t.0);
        }
        let mut args = ffi::TopologyCreateArgs::new();
        args.topology_name = name.as_ptr() as *const _;
        args.topology_name_size = name.len();
        self.plugin.call(Slot::TopologyDescriptionCreate, "TopologyDescription_Create", &mut args)?;
        topologies.insert(name, Topology(args.topology));
        Ok(args.topology)
    }

    /// libtpu's platform version string for `chip` (names the libtpu build).
    pub fn platform_version(&self, chip: Chip) -> Result<String> {
        let mut args = ffi::TopologyStringArgs::new();
        args.topology = self.topology(&Slice::smallest(chip))?;
        self.plugin.call(Slot::TopologyDescriptionPlatformVersion, "TopologyDescription_PlatformVersion", &mut args)?;
        Ok(Plugin::string(args.value, args.value_size))
    }

    /// The devices libtpu gives `slice`: a program for it may span up to this many partitions.
    pub fn devices(&self, slice: &Slice) -> Result<u64> {
        self.topology_devices(self.topology(slice)?)
    }

    fn topology_devices(&self, topology: *mut c_void) -> Result<u64> {
        let mut args = ffi::TopologyDevicesArgs::new();
        args.topology = topology;
        self.plugin.call(Slot::TopologyDescriptionGetDeviceDescriptions, "TopologyDescription_GetDeviceDescriptions", &mut args)?;
        Ok(args.num_descriptions as u64)
    }

    /// Compiles a StableHLO module (text, or a portable artifact) for one device of `chip`.
    pub fn compile(&self, chip: Chip, stablehlo: impl AsRef<[u8]>) -> std::result::Result<CompiledModule, CompileError> {
        self.compile_for(&Slice::smallest(chip), 1, false, stablehlo)
    }

    /// Compiles an SPMD program (its module's `mhlo.num_partitions` must be `partitions`) for
    /// `partitions` devices of `slice`, as XLA's partitioner sees it on that slice.
    pub fn compile_spmd(&self, slice: &Slice, partitions: u64, stablehlo: impl AsRef<[u8]>) -> std::result::Result<CompiledModule, CompileError> {
        self.compile_for(slice, partitions, true, stablehlo)
    }

    fn compile_for(&self, slice: &Slice, partitions: u64, spmd: bool, stablehlo: impl AsRef<[u8]>) -> std::result::Result<CompiledModule, CompileError> {
        let fail = |message: String| CompileError { slice: slice.clone(), location: rust_location(&message), message };
        let topology = self.topology(slice).map_err(|e| fail(e.to_string()))?;
        // Every slice has a device: only a program over several asks how many.
        if partitions != 1 {
            let devices = self.topology_devices(topology).map_err(|e| fail(e.to_string()))?;
            if partitions == 0 || partitions > devices {
                return Err(fail(format!("a program over {partitions} devices does not fit {slice}, which has {devices}; pick a slice with at least {partitions}")));
            }
        }
        let program = ffi::Program::mlir(stablehlo.as_ref());
        let options = ffi::compile_options(partitions, spmd);
        let mut args = ffi::CompileArgs::new();
        args.topology = topology;
        args.program = &program;
        args.compile_options = options.as_ptr() as *const _;
        args.compile_options_size = options.len();
        match self.plugin.call(Slot::Compile, "Compile", &mut args) {
            Err(Error::Call { message, .. }) => return Err(fail(message)),
            Err(e) => return Err(fail(e.to_string())),
            Ok(()) => {}
        }
        let executable = args.executable;
        let result = self.describe(slice.chip, partitions, executable);
        let mut destroy = ffi::ExecutableDestroyArgs::new();
        destroy.executable = executable;
        // A failed destroy leaks one executable; nothing else depends on it.
        let _ = self.plugin.call(Slot::ExecutableDestroy, "Executable_Destroy", &mut destroy);
        result.map_err(|e| fail(e.to_string()))
    }

    fn describe(&self, chip: Chip, partitions: u64, executable: *mut c_void) -> Result<CompiledModule> {
        let mut size = ffi::ExecutableCodeSizeArgs::new();
        size.executable = executable;
        self.plugin.call(Slot::ExecutableSizeOfGeneratedCodeInBytes, "Executable_SizeOfGeneratedCodeInBytes", &mut size)?;
        let mut cost = ffi::ExecutableCostAnalysisArgs::new();
        cost.executable = executable;
        let mut cost_analysis = Vec::new();
        if self.plugin.call(Slot::ExecutableGetCostAnalysis, "Executable_GetCostAnalysis", &mut cost).is_ok() && !cost.properties.is_null() {
            // SAFETY: PJRT returns `num_properties` named values owned by the executable, alive until it is destroyed.
            let props = unsafe { std::slice::from_raw_parts(cost.properties, cost.num_properties) };
            for p in props {
                let name = Plugin::string(p.name, p.name_size);
                let value = match p.value_type {
                    ffi::NAMED_VALUE_FLOAT => f32::from_bits(p.value as u32) as f64,
                    ffi::NAMED_VALUE_INT64 => p.value as i64 as f64,
                    ffi::NAMED_VALUE_BOOL => (p.value & 1) as f64,
                    _ => continue,
                };
                cost_analysis.push((name, value));
            }
        }
        Ok(CompiledModule { chip, partitions, code_size_bytes: size.size_in_bytes, cost_analysis })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_rust_location_in_a_compiler_message() {
        let m = "error: loc(\"testkernels/src/matmul.rs\":25:5): 'tpu.matmul' op bad";
        assert_eq!(rust_location(m), Some(SourceLocation { file: "testkernels/src/matmul.rs".into(), line: 25, column: 5 }));
        assert_eq!(rust_location("at /x/y.rs:3:14: oops"), Some(SourceLocation { file: "/x/y.rs".into(), line: 3, column: 14 }));
        assert_eq!(rust_location("no location in main.rs here"), None);
    }

    #[test]
    fn chips_parse_by_name() {
        for c in Chip::ALL {
            assert_eq!(c.name().parse::<Chip>(), Ok(c));
        }
        assert!("v9".parse::<Chip>().unwrap_err().to_string().contains("v4, v5e, v5p, v6e, tpu7x"));
    }
}
