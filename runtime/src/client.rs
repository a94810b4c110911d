//! A PJRT client on one device, with buffers and compiled executables: safe, `Send + Sync`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::ffi::{self, Slot};
use crate::plugin::Plugin;

/// An element type a buffer can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementType {
    F32,
    BF16,
    F16,
    I32,
    I8,
    Pred,
}

impl ElementType {
    fn pjrt(self) -> i32 {
        match self {
            ElementType::F32 => ffi::BUFFER_F32,
            ElementType::BF16 => ffi::BUFFER_BF16,
            ElementType::F16 => ffi::BUFFER_F16,
            ElementType::I32 => ffi::BUFFER_S32,
            ElementType::I8 => ffi::BUFFER_S8,
            ElementType::Pred => ffi::BUFFER_PRED,
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            ElementType::F32 | ElementType::I32 => 4,
            ElementType::BF16 | ElementType::F16 => 2,
            ElementType::I8 | ElementType::Pred => 1,
        }
    }
}

struct ClientInner {
    plugin: Plugin,
    raw: *mut c_void,
    device: *mut c_void,
    platform: String,
    platform_version: String,
    executables: Mutex<HashMap<u64, Arc<ExecutableInner>>>,
}

// SAFETY: PJRT clients are thread-safe; the raw pointers are only passed back to the plugin.
unsafe impl Send for ClientInner {}
unsafe impl Sync for ClientInner {}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.executables.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        let mut args = ffi::ClientDestroyArgs::new();
        args.client = self.raw;
        // A client that fails to shut down leaks; nothing else can be done in drop.
        let _ = self.plugin.call(Slot::ClientDestroy, "Client_Destroy", &mut args);
    }
}

/// A PJRT client, bound to the plugin's first addressable device.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("platform", &self.inner.platform).field("plugin", &self.inner.plugin).finish()
    }
}

/// FNV-1a: a stable hash of module text for the executable cache.
fn module_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Client {
    pub fn new(plugin: &Plugin) -> Result<Client> {
        let mut create = ffi::ClientCreateArgs::new();
        plugin.call(Slot::ClientCreate, "Client_Create", &mut create)?;
        let raw = create.client;
        let mut name = ffi::ClientStringArgs::new();
        name.client = raw;
        plugin.call(Slot::ClientPlatformName, "Client_PlatformName", &mut name)?;
        let platform = Plugin::string(name.value, name.value_size);
        let mut version = ffi::ClientStringArgs::new();
        version.client = raw;
        plugin.call(Slot::ClientPlatformVersion, "Client_PlatformVersion", &mut version)?;
        let platform_version = Plugin::string(version.value, version.value_size);
        let mut devices = ffi::ClientDevicesArgs::new();
        devices.client = raw;
        plugin.call(Slot::ClientAddressableDevices, "Client_AddressableDevices", &mut devices)?;
        // Owned from here on: an early return destroys the client.
        let mut inner = ClientInner { plugin: plugin.clone(), raw, device: std::ptr::null_mut(), platform, platform_version, executables: Mutex::new(HashMap::new()) };
        if devices.num_devices == 0 || devices.devices.is_null() {
            return Err(Error::PluginBroken { path: plugin.path().into(), message: "the client has no addressable device".into() });
        }
        // SAFETY: the plugin returned `num_devices` device pointers owned by the client.
        inner.device = unsafe { *devices.devices };
        Ok(Client { inner: Arc::new(inner) })
    }

    /// The platform name the plugin reports (`cpu`, `cuda`, `tpu`...).
    pub fn platform(&self) -> &str {
        &self.inner.platform
    }

    pub fn plugin(&self) -> &Plugin {
        &self.inner.plugin
    }

    /// The plugin's own version string (e.g. the XLA build), for cache keys.
    pub fn platform_version(&self) -> &str {
        &self.inner.platform_version
    }

    /// How many distinct modules this client has compiled (and keeps).
    pub fn cached_executables(&self) -> usize {
        self.inner.executables.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Compiles StableHLO text; compiled once per distinct module (cached by its hash).
    pub fn compile(&self, stablehlo: &str) -> Result<Executable> {
        let key = module_hash(stablehlo);
        if let Some(e) = self.inner.executables.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Executable { client: self.clone(), inner: e.clone() });
        }
        let program = ffi::Program::mlir(stablehlo);
        let mut args = ffi::ClientCompileArgs::new();
        args.client = self.inner.raw;
        args.program = &program;
        args.compile_options = ffi::COMPILE_OPTIONS.as_ptr() as *const _;
        args.compile_options_size = ffi::COMPILE_OPTIONS.len();
        self.inner.plugin.call(Slot::ClientCompile, "Client_Compile", &mut args)?;
        let loaded = args.executable;
        // Owned from here on: an early return destroys the executable.
        let mut inner = ExecutableInner { plugin: self.inner.plugin.clone(), raw: loaded, num_outputs: 0 };
        let mut get = ffi::LoadedExecutableGetExecutableArgs::new();
        get.loaded_executable = loaded;
        self.inner.plugin.call(Slot::LoadedExecutableGetExecutable, "LoadedExecutable_GetExecutable", &mut get)?;
        let mut n = ffi::ExecutableNumOutputsArgs::new();
        n.executable = get.executable;
        let counted = self.inner.plugin.call(Slot::ExecutableNumOutputs, "Executable_NumOutputs", &mut n);
        let mut destroy = ffi::ExecutableDestroyArgs::new();
        destroy.executable = get.executable;
        let _ = self.inner.plugin.call(Slot::ExecutableDestroy, "Executable_Destroy", &mut destroy);
        counted?;
        inner.num_outputs = n.num_outputs;
        let inner = Arc::new(inner);
        self.inner.executables.lock().unwrap_or_else(|p| p.into_inner()).insert(key, inner.clone());
        Ok(Executable { client: self.clone(), inner })
    }

    /// Copies `data` (dense, row-major, `dims`) to the device.
    pub fn buffer(&self, data: &[u8], element_type: ElementType, dims: &[usize]) -> Result<Buffer> {
        let (buffer, done) = self.buffer_from_host(data, element_type, dims, ffi::HOST_BUFFER_IMMUTABLE_ONLY_DURING_CALL)?;
        if !done.is_null() {
            self.await_event(done)?;
        }
        Ok(buffer)
    }

    /// `data` as a device buffer without a copy where the plugin can alias host memory (the
    /// CPU plugin, suitably aligned data); a copy otherwise. `data` stays borrowed until the
    /// buffer is dropped.
    pub fn borrow_buffer<'a>(&self, data: &'a [u8], element_type: ElementType, dims: &[usize]) -> Result<BorrowedBuffer<'a>> {
        let (buffer, done) = self.buffer_from_host(data, element_type, dims, ffi::HOST_BUFFER_IMMUTABLE_ZERO_COPY)?;
        Ok(BorrowedBuffer { buffer: Some(buffer), done, _data: std::marker::PhantomData })
    }

    fn buffer_from_host(&self, data: &[u8], element_type: ElementType, dims: &[usize], semantics: i32) -> Result<(Buffer, *mut c_void)> {
        let n: usize = dims.iter().product();
        if data.len() != n * element_type.size_bytes() {
            return Err(Error::Invalid(format!("{} bytes do not make a {element_type:?} array of shape {dims:?} ({} bytes)", data.len(), n * element_type.size_bytes())));
        }
        let dims64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let mut args = ffi::BufferFromHostArgs::new();
        args.client = self.inner.raw;
        args.data = data.as_ptr() as *const c_void;
        args.element_type = element_type.pjrt();
        args.dims = dims64.as_ptr();
        args.num_dims = dims64.len();
        args.host_buffer_semantics = semantics;
        args.device = self.inner.device;
        self.inner.plugin.call(Slot::ClientBufferFromHostBuffer, "Client_BufferFromHostBuffer", &mut args)?;
        Ok((Buffer { client: self.clone(), raw: args.buffer, element_type, dims: dims.to_vec() }, args.done_with_host_buffer))
    }

    /// Waits for `event` and destroys it.
    fn await_event(&self, event: *mut c_void) -> Result<()> {
        let mut wait = ffi::EventArgs::new();
        wait.event = event;
        let waited = self.inner.plugin.call(Slot::EventAwait, "Event_Await", &mut wait);
        let mut destroy = ffi::EventArgs::new();
        destroy.event = event;
        let _ = self.inner.plugin.call(Slot::EventDestroy, "Event_Destroy", &mut destroy);
        waited
    }
}

struct ExecutableInner {
    plugin: Plugin,
    raw: *mut c_void,
    num_outputs: usize,
}

// SAFETY: loaded executables may be executed concurrently from several threads.
unsafe impl Send for ExecutableInner {}
unsafe impl Sync for ExecutableInner {}

impl Drop for ExecutableInner {
    fn drop(&mut self) {
        let mut args = ffi::LoadedExecutableDestroyArgs::new();
        args.executable = self.raw;
        let _ = self.plugin.call(Slot::LoadedExecutableDestroy, "LoadedExecutable_Destroy", &mut args);
    }
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable").field("num_outputs", &self.inner.num_outputs).finish()
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("element_type", &self.element_type).field("dims", &self.dims).finish()
    }
}

/// A compiled module, ready to run on its client's device.
#[derive(Clone)]
pub struct Executable {
    client: Client,
    inner: Arc<ExecutableInner>,
}

impl Executable {
    pub fn num_outputs(&self) -> usize {
        self.inner.num_outputs
    }

    /// Runs on `args` and waits for completion; returns the outputs.
    pub fn execute(&self, args: &[&Buffer]) -> Result<Vec<Buffer>> {
        if let Some(b) = args.iter().find(|b| !Arc::ptr_eq(&b.client.inner, &self.client.inner)) {
            return Err(Error::Invalid(format!("an argument buffer ({:?} {:?}) belongs to another client", b.element_type, b.dims)));
        }
        let raw_args: Vec<*mut c_void> = args.iter().map(|b| b.raw).collect();
        let arg_lists = [raw_args.as_ptr()];
        let mut outputs: Vec<*mut c_void> = vec![std::ptr::null_mut(); self.inner.num_outputs];
        let output_lists = [outputs.as_mut_ptr()];
        let mut done: [*mut c_void; 1] = [std::ptr::null_mut()];
        let options = ffi::ExecuteOptions::new();
        let mut exec = ffi::ExecuteArgs::new();
        exec.executable = self.inner.raw;
        exec.options = &options;
        exec.argument_lists = arg_lists.as_ptr();
        exec.num_devices = 1;
        exec.num_args = raw_args.len();
        exec.output_lists = output_lists.as_ptr();
        exec.device_complete_events = done.as_mut_ptr();
        self.inner.plugin.call(Slot::LoadedExecutableExecute, "LoadedExecutable_Execute", &mut exec)?;
        let results: Vec<Buffer> = outputs.into_iter().map(|raw| Buffer { client: self.client.clone(), raw, element_type: ElementType::F32, dims: Vec::new() }).collect();
        if !done[0].is_null() {
            self.client.await_event(done[0])?;
        }
        Ok(results)
    }
}

/// An array on the device. Shape and type are the caller's to know for outputs.
pub struct Buffer {
    client: Client,
    raw: *mut c_void,
    element_type: ElementType,
    dims: Vec<usize>,
}

// SAFETY: PJRT buffers are reference-counted by the plugin and usable from any thread.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut args = ffi::BufferDestroyArgs::new();
        args.buffer = self.raw;
        let _ = self.client.inner.plugin.call(Slot::BufferDestroy, "Buffer_Destroy", &mut args);
    }
}

impl Buffer {
    /// Copies the buffer to the host: exactly `len` bytes are expected.
    pub fn to_host(&self, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// Copies the buffer into `dst`, which must be exactly the buffer's size.
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        let plugin = &self.client.inner.plugin;
        let mut query = ffi::BufferToHostArgs::new();
        query.src = self.raw;
        plugin.call(Slot::BufferToHostBuffer, "Buffer_ToHostBuffer", &mut query)?;
        if query.dst_size != dst.len() {
            return Err(Error::Invalid(format!("the device buffer holds {} bytes, {} were expected", query.dst_size, dst.len())));
        }
        let mut args = ffi::BufferToHostArgs::new();
        args.src = self.raw;
        args.dst = dst.as_mut_ptr() as *mut c_void;
        args.dst_size = dst.len();
        plugin.call(Slot::BufferToHostBuffer, "Buffer_ToHostBuffer", &mut args)?;
        if !args.event.is_null() {
            self.client.await_event(args.event)?;
        }
        Ok(())
    }

    /// Where the buffer's data lies in this process' memory: for the CPU plugin, host memory
    /// valid while the buffer lives; for a device plugin, a device address.
    pub fn unsafe_pointer(&self) -> Result<*const u8> {
        let mut args = ffi::BufferUnsafePointerArgs::new();
        args.buffer = self.raw;
        self.client.inner.plugin.call(Slot::BufferUnsafePointer, "Buffer_UnsafePointer", &mut args)?;
        Ok(args.buffer_pointer as *const u8)
    }

    pub fn element_type(&self) -> ElementType {
        self.element_type
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
}

/// A buffer that may alias borrowed host memory (see [`Client::borrow_buffer`]).
pub struct BorrowedBuffer<'a> {
    buffer: Option<Buffer>,
    done: *mut c_void,
    _data: std::marker::PhantomData<&'a [u8]>,
}

// SAFETY: as for `Buffer`; the event is only awaited once, on drop.
unsafe impl Send for BorrowedBuffer<'_> {}
unsafe impl Sync for BorrowedBuffer<'_> {}

impl std::ops::Deref for BorrowedBuffer<'_> {
    type Target = Buffer;
    fn deref(&self) -> &Buffer {
        self.buffer.as_ref().expect("present until drop")
    }
}

impl Drop for BorrowedBuffer<'_> {
    fn drop(&mut self) {
        // The plugin lets go of the host memory once its buffer is gone: destroy, then wait,
        // so the borrow really ends here.
        if let Some(buffer) = self.buffer.take() {
            let client = buffer.client.clone();
            drop(buffer);
            if !self.done.is_null() {
                let _ = client.await_event(self.done);
            }
        }
    }
}
