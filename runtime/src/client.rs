//! A PJRT client on one device (or, for SPMD programs, several), with buffers and compiled
//! executables: safe, `Send + Sync`.

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
    /// Every addressable device (at least one): single-device work runs on the first, an SPMD
    /// program's partition `i` on `devices[i]`.
    devices: Vec<*mut c_void>,
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
        Client::create(plugin, &[])
    }

    /// A client of the PJRT CPU plugin with `devices` CPU devices (its `cpu_device_count`
    /// option): what runs an SPMD program's partitions on one machine.
    pub fn with_cpu_devices(plugin: &Plugin, devices: usize) -> Result<Client> {
        const NAME: &str = "cpu_device_count";
        if devices == 0 {
            return Err(Error::Invalid("a client needs at least one device".into()));
        }
        let option = ffi::NamedValue {
            struct_size: std::mem::size_of::<ffi::NamedValue>(),
            extension_start: std::ptr::null_mut(),
            name: NAME.as_ptr() as *const _,
            name_size: NAME.len(),
            value_type: ffi::NAMED_VALUE_INT64,
            value: devices as u64,
            value_size: 1,
        };
        let client = Client::create(plugin, std::slice::from_ref(&option))?;
        if client.device_count() != devices {
            return Err(Error::Invalid(format!(
                "asked {} for {devices} devices and got {}: only the PJRT CPU plugin takes a device count",
                plugin.path().display(),
                client.device_count()
            )));
        }
        Ok(client)
    }

    fn create(plugin: &Plugin, options: &[ffi::NamedValue]) -> Result<Client> {
        let mut create = ffi::ClientCreateArgs::new();
        create.create_options = options.as_ptr();
        create.num_options = options.len();
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
        let mut inner = ClientInner { plugin: plugin.clone(), raw, devices: Vec::new(), platform, platform_version, executables: Mutex::new(HashMap::new()) };
        if devices.num_devices == 0 || devices.devices.is_null() {
            return Err(Error::PluginBroken { path: plugin.path().into(), message: "the client has no addressable device".into() });
        }
        // SAFETY: the plugin returned `num_devices` device pointers owned by the client.
        inner.devices = unsafe { std::slice::from_raw_parts(devices.devices, devices.num_devices) }.to_vec();
        Ok(Client { inner: Arc::new(inner) })
    }

    /// Addressable devices: the most partitions an SPMD program may have here.
    pub fn device_count(&self) -> usize {
        self.inner.devices.len()
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
        self.compile_with(stablehlo, 1, false)
    }

    /// Compiles an SPMD program over `partitions` of this client's devices (its module's
    /// `mhlo.num_partitions` must say the same); run it with [`Executable::execute_partitioned`].
    pub fn compile_spmd(&self, stablehlo: &str, partitions: usize) -> Result<Executable> {
        self.compile_with(stablehlo, partitions, true)
    }

    fn compile_with(&self, stablehlo: &str, partitions: usize, spmd: bool) -> Result<Executable> {
        if partitions == 0 || partitions > self.device_count() {
            return Err(Error::Invalid(format!("a program over {partitions} devices does not fit this {} client's {}", self.inner.platform, self.device_count())));
        }
        let key = module_hash(stablehlo) ^ (partitions as u64).rotate_left(32) ^ u64::from(spmd);
        if let Some(e) = self.inner.executables.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Executable { client: self.clone(), inner: e.clone() });
        }
        let program = ffi::Program::mlir(stablehlo.as_bytes());
        let mut args = ffi::ClientCompileArgs::new();
        args.client = self.inner.raw;
        args.program = &program;
        let options = ffi::compile_options(partitions as u64, spmd);
        args.compile_options = options.as_ptr() as *const _;
        args.compile_options_size = options.len();
        self.inner.plugin.call(Slot::ClientCompile, "Client_Compile", &mut args)?;
        let loaded = args.executable;
        // Owned from here on: an early return destroys the executable.
        let mut inner = ExecutableInner { plugin: self.inner.plugin.clone(), raw: loaded, num_outputs: 0, partitions };
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
        // Partition i's arguments are placed on the client's device i: the executable must
        // run its partitions there.
        let mut devices = ffi::LoadedExecutableDevicesArgs::new();
        devices.executable = loaded;
        self.inner.plugin.call(Slot::LoadedExecutableAddressableDevices, "LoadedExecutable_AddressableDevices", &mut devices)?;
        // SAFETY: the plugin returned `num_devices` device pointers owned by the executable.
        let assigned = if devices.devices.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(devices.devices, devices.num_devices) } };
        if assigned != &self.inner.devices[..partitions] {
            return Err(Error::Invalid(format!("the plugin assigned the program's {partitions} partitions to other devices than the client's first {partitions}, in order")));
        }
        let inner = Arc::new(inner);
        self.inner.executables.lock().unwrap_or_else(|p| p.into_inner()).insert(key, inner.clone());
        Ok(Executable { client: self.clone(), inner })
    }

    /// Copies `data` (dense, row-major, `dims`) to the device.
    pub fn buffer(&self, data: &[u8], element_type: ElementType, dims: &[usize]) -> Result<Buffer> {
        self.buffer_on(0, data, element_type, dims)
    }

    /// Copies `data` (dense, row-major, `dims`) to device `device` (an SPMD program's partition).
    pub fn buffer_on(&self, device: usize, data: &[u8], element_type: ElementType, dims: &[usize]) -> Result<Buffer> {
        let device = *self.inner.devices.get(device).ok_or_else(|| Error::Invalid(format!("no device {device}: this client has {}", self.device_count())))?;
        let (buffer, done) = self.buffer_from_host_on(device, data, element_type, dims, ffi::HOST_BUFFER_IMMUTABLE_ONLY_DURING_CALL)?;
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
        // The client was made with at least one device.
        self.buffer_from_host_on(self.inner.devices[0], data, element_type, dims, semantics)
    }

    fn buffer_from_host_on(&self, device: *mut c_void, data: &[u8], element_type: ElementType, dims: &[usize], semantics: i32) -> Result<(Buffer, *mut c_void)> {
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
        args.device = device;
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
    /// Devices it runs on: its SPMD partitions.
    partitions: usize,
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
        let mut outputs = self.execute_partitioned(&[args.to_vec()])?;
        Ok(outputs.pop().unwrap_or_default())
    }

    /// Runs an SPMD program (see [`Client::compile_spmd`]) on `args[i]`, partition `i`'s
    /// arguments (each on that partition's device, see [`Client::buffer_on`]), and waits for
    /// every partition; returns each partition's outputs.
    pub fn execute_partitioned(&self, args: &[Vec<&Buffer>]) -> Result<Vec<Vec<Buffer>>> {
        if args.len() != self.inner.partitions {
            return Err(Error::Invalid(format!("the program runs on {} devices; arguments for {} were given", self.inner.partitions, args.len())));
        }
        let num_args = args.first().map_or(0, Vec::len);
        if let Some(list) = args.iter().find(|l| l.len() != num_args) {
            return Err(Error::Invalid(format!("every device takes the same arguments: {num_args} for the first, {} for another", list.len())));
        }
        if let Some(b) = args.iter().flatten().find(|b| !Arc::ptr_eq(&b.client.inner, &self.client.inner)) {
            return Err(Error::Invalid(format!("an argument buffer ({:?} {:?}) belongs to another client", b.element_type, b.dims)));
        }
        let raw_args: Vec<Vec<*mut c_void>> = args.iter().map(|l| l.iter().map(|b| b.raw).collect()).collect();
        let arg_lists: Vec<*const *mut c_void> = raw_args.iter().map(|l| l.as_ptr()).collect();
        let mut outputs: Vec<Vec<*mut c_void>> = vec![vec![std::ptr::null_mut(); self.inner.num_outputs]; args.len()];
        let output_lists: Vec<*mut *mut c_void> = outputs.iter_mut().map(|l| l.as_mut_ptr()).collect();
        let mut done: Vec<*mut c_void> = vec![std::ptr::null_mut(); args.len()];
        let options = ffi::ExecuteOptions::new();
        let mut exec = ffi::ExecuteArgs::new();
        exec.executable = self.inner.raw;
        exec.options = &options;
        exec.argument_lists = arg_lists.as_ptr();
        exec.num_devices = args.len();
        exec.num_args = num_args;
        exec.output_lists = output_lists.as_ptr();
        exec.device_complete_events = done.as_mut_ptr();
        self.inner.plugin.call(Slot::LoadedExecutableExecute, "LoadedExecutable_Execute", &mut exec)?;
        let results: Vec<Vec<Buffer>> =
            outputs.into_iter().map(|l| l.into_iter().map(|raw| Buffer { client: self.client.clone(), raw, element_type: ElementType::F32, dims: Vec::new() }).collect()).collect();
        // Every partition finishes (and its event is freed) before any error is returned.
        let waited: Vec<Result<()>> = done.into_iter().filter(|e| !e.is_null()).map(|e| self.client.await_event(e)).collect();
        waited.into_iter().collect::<Result<()>>()?;
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
