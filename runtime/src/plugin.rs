//! Finding, loading and calling a PJRT plugin.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::ffi::{self, PjrtFn, Slot};

/// A loaded, initialized PJRT plugin. Cheap to clone; the library is never unloaded.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Loaded>,
}

struct Loaded {
    path: PathBuf,
    api: *const u8,
    api_size: usize,
    version: (i32, i32),
    _lib: libloading::os::unix::Library,
}

// SAFETY: PJRT plugins are thread-safe (the C API is designed to be called from any thread),
// and `api` points into the library, which is never unloaded (RTLD_NODELETE, and we keep it).
unsafe impl Send for Loaded {}
unsafe impl Sync for Loaded {}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("path", &self.inner.path).field("version", &self.inner.version).finish()
    }
}

/// Plugins already loaded, by canonical path: loading one twice would initialize it twice.
fn loaded() -> &'static Mutex<Vec<Plugin>> {
    static LOADED: OnceLock<Mutex<Vec<Plugin>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(Vec::new()))
}

impl Plugin {
    /// Loads the plugin at `path` (once per process), checks its API table and initializes it.
    pub fn load(path: &Path) -> Result<Plugin> {
        Self::load_checked(path, None)
    }

    /// Like [`Plugin::load`], for a plugin that must not be libtpu (a `cpu` or `cuda` one):
    /// libtpu is recognised by its exports before it is initialized, since initializing it
    /// off a TPU VM blocks for minutes on cloud metadata retries.
    pub fn load_non_tpu(path: &Path, kind: &str) -> Result<Plugin> {
        Self::load_checked(path, Some(kind))
    }

    fn load_checked(path: &Path, non_tpu_kind: Option<&str>) -> Result<Plugin> {
        let canonical = path.canonicalize().map_err(|e| Error::PluginLoad { path: path.into(), message: e.to_string() })?;
        let mut cache = loaded().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.iter().find(|p| p.inner.path == canonical) {
            return Ok(p.clone());
        }
        let broken = |message: String| Error::PluginBroken { path: canonical.clone(), message };
        // Unloading a PJRT plugin crashes at exit: keep it mapped for the life of the process.
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: loading a shared library runs its initializers; a PJRT plugin is meant to be loaded so.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&canonical), flags) }.map_err(|e| Error::PluginLoad { path: canonical.clone(), message: e.to_string() })?;
        // SAFETY: `GetPjrtApi` is the C entry point every PJRT plugin exports, with this signature.
        let get_api: libloading::os::unix::Symbol<unsafe extern "C" fn() -> *const u8> =
            unsafe { lib.get(b"GetPjrtApi\0") }.map_err(|_| broken("it has no `GetPjrtApi` symbol; is it a PJRT plugin?".into()))?;
        if let Some(kind) = non_tpu_kind {
            // SAFETY: only looking the symbol up; it is never called.
            if unsafe { lib.get::<unsafe extern "C" fn()>(b"GetLibtpuSdkApi\0") }.is_ok() {
                return Err(broken(format!("this is libtpu, the TPU plugin, not a {kind} PJRT plugin; point the {kind} plugin setting at a {kind} plugin (for cpu: libpjrt_cpu.so, which scripts/setup.sh installs), or unset it")));
            }
        }
        // SAFETY: calling the entry point; it returns a pointer to a static table or null.
        let api = unsafe { get_api() };
        if api.is_null() {
            return Err(broken("GetPjrtApi returned null".into()));
        }
        // SAFETY: a PJRT_Api begins with its size (size_t), then the version struct.
        let (api_size, version) = unsafe {
            let size = std::ptr::read_unaligned(api as *const usize);
            let major = std::ptr::read_unaligned(api.add(ffi::API_VERSION_OFFSET) as *const i32);
            let minor = std::ptr::read_unaligned(api.add(ffi::API_VERSION_OFFSET + 4) as *const i32);
            (size, (major, minor))
        };
        if version.0 != 0 {
            return Err(broken(format!("PJRT C API version {}.{}; torchtpu speaks major version 0", version.0, version.1)));
        }
        let plugin = Plugin { inner: Arc::new(Loaded { path: canonical, api, api_size, version, _lib: lib }) };
        let mut init = ffi::PluginInitializeArgs::new();
        plugin.call(Slot::PluginInitialize, "Plugin_Initialize", &mut init)?;
        cache.push(plugin.clone());
        Ok(plugin)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The plugin's PJRT C API version (major, minor).
    pub fn api_version(&self) -> (i32, i32) {
        self.inner.version
    }

    fn function(&self, slot: Slot, name: &'static str) -> Result<PjrtFn> {
        let offset = ffi::API_FUNCTIONS_OFFSET + slot as usize * std::mem::size_of::<usize>();
        if offset + std::mem::size_of::<usize>() > self.inner.api_size {
            return Err(Error::Call { call: name, code: -1, message: format!("this plugin's API table ({} bytes) is too old to have PJRT_{name}", self.inner.api_size) });
        }
        // SAFETY: the slot lies inside the table, as checked above; PJRT tables hold function pointers.
        let f = unsafe { std::ptr::read_unaligned(self.inner.api.add(offset) as *const Option<PjrtFn>) };
        f.ok_or(Error::Call { call: name, code: -1, message: "the plugin leaves this function unimplemented".into() })
    }

    /// Calls `slot` with `args` (an `args!` struct), turning a returned PJRT_Error into `Error`.
    pub(crate) fn call<A>(&self, slot: Slot, name: &'static str, args: &mut A) -> Result<()> {
        let f = self.function(slot, name)?;
        // SAFETY: `args` is the argument struct this slot takes, with struct_size set.
        let err = unsafe { f(args as *mut A as *mut c_void) };
        if err.is_null() {
            return Ok(());
        }
        Err(self.take_error(name, err))
    }

    fn take_error(&self, call: &'static str, err: *mut c_void) -> Error {
        let mut msg = ffi::ErrorMessageArgs::new();
        msg.error = err;
        let mut code = ffi::ErrorGetCodeArgs::new();
        code.error = err;
        let mut message = String::from("(no message)");
        if let Ok(f) = self.function(Slot::ErrorMessage, "Error_Message") {
            // SAFETY: PJRT_Error_Message fills a pointer/length pair valid until the error is destroyed.
            unsafe {
                f(&mut msg as *mut _ as *mut c_void);
                if !msg.message.is_null() {
                    let bytes = std::slice::from_raw_parts(msg.message as *const u8, msg.message_size);
                    message = String::from_utf8_lossy(bytes).into_owned();
                }
            }
        }
        if let Ok(f) = self.function(Slot::ErrorGetCode, "Error_GetCode") {
            // SAFETY: as above; GetCode returns its own error only on misuse, which we ignore.
            unsafe { f(&mut code as *mut _ as *mut c_void) };
        }
        if let Ok(f) = self.function(Slot::ErrorDestroy, "Error_Destroy") {
            let mut d = ffi::ErrorDestroyArgs::new();
            d.error = err;
            // SAFETY: destroys the error we own; the message was copied out above.
            unsafe { f(&mut d as *mut _ as *mut c_void) };
        }
        Error::Call { call, code: code.code, message }
    }

    /// Copies a (pointer, length) string the plugin returned.
    pub(crate) fn string(ptr: *const std::ffi::c_char, len: usize) -> String {
        if ptr.is_null() {
            return String::new();
        }
        // SAFETY: PJRT returns strings as pointer + length into memory it keeps alive.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }).into_owned()
    }
}
