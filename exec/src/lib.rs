//! Running kernels: on the CPU interpreter, or through PJRT after lowering (portable
//! StableHLO for CPU and CUDA, `tpu_custom_call` for TPU). Also device timing.

pub mod spmd;
mod transfer;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{HostArray, InterpretOptions, PallasCall, TracedCall};
use torchtpu_runtime::{locate, Buffer, Client, Executable, Plugin};

pub use transfer::{download, from_bytes, to_bytes, upload};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dsl(#[from] torchtpu_dsl::Error),
    #[error(transparent)]
    Codegen(#[from] torchtpu_codegen::Error),
    #[error(transparent)]
    Runtime(#[from] torchtpu_runtime::Error),
    #[error("bad input: {0}")]
    Input(String),
    /// The outputs would not fit the host's memory.
    #[error("out of memory: {0}")]
    Memory(String),
    /// PJRT plugins' threads and locks do not survive `fork`; a forked child must use the
    /// interpreter (or be started with `spawn`).
    #[error("this process was forked from {parent} after it started a PJRT client, and PJRT plugins do not survive fork; start worker processes with `spawn`, or use the interpret backend")]
    Forked { parent: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The CPU interpreter (no compile step).
    Interpret,
    /// The PJRT CPU plugin, on the portable lowering.
    Cpu,
    /// The PJRT CUDA plugin, on the portable lowering.
    Cuda,
    /// A real TPU through libtpu, on the Mosaic lowering.
    Tpu,
}

impl Backend {
    pub const ALL: [Backend; 4] = [Backend::Interpret, Backend::Cpu, Backend::Cuda, Backend::Tpu];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Interpret => "interpret",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Tpu => "tpu",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| Error::Input(format!("unknown backend `{s}`; expected interpret, cpu, cuda or tpu")))
    }
}

/// The process-wide PJRT client of a device backend (created on first use). A child forked
/// after a client was made cannot have one: the plugins' threads and locks do not survive
/// `fork` (a new client aborts there), so that is an error.
pub fn client(backend: Backend) -> Result<Client> {
    static CLIENTS: OnceLock<Mutex<Vec<(u32, Backend, Client)>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(|| Mutex::new(Vec::new()));
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some(&(parent, _, _)) = clients.iter().find(|(p, _, _)| *p != pid) {
        return Err(Error::Forked { parent });
    }
    if let Some((_, _, c)) = clients.iter().find(|(_, b, _)| *b == backend) {
        return Ok(c.clone());
    }
    let plugin = match backend {
        Backend::Cpu => Plugin::load_non_tpu(&locate::cpu_plugin()?, "cpu")?,
        Backend::Cuda => Plugin::load_non_tpu(&locate::cuda_plugin()?, "cuda")?,
        Backend::Tpu => torchtpu_runtime::tpu::load_libtpu()?,
        Backend::Interpret => return Err(Error::Input("the interpreter has no PJRT client".into())),
    };
    let client = Client::new(&plugin).map_err(|e| match backend {
        Backend::Tpu => Error::Input(format!("no TPU to run on ({e}); `torchtpu check` compiles for TPUs without one")),
        _ => e.into(),
    })?;
    clients.push((pid, backend, client.clone()));
    Ok(client)
}

/// A call compiled for a device backend: upload, run and time without recompiling.
pub struct Compiled {
    client: Client,
    executable: Executable,
    operands: Vec<ValueType>,
    outputs: Vec<ValueType>,
    /// The call, kept where index maps read scalar-prefetch tables: their block indices are
    /// checked on the host before each run, as the interpreter checks them.
    data_dependent: Option<TracedCall>,
}

impl Compiled {
    /// Lowers `traced` for `backend` and compiles it (once per module: the client caches).
    pub fn new(traced: &TracedCall, backend: Backend) -> Result<Compiled> {
        let target = if backend == Backend::Tpu { Target::TpuStableHlo } else { Target::PortableStableHlo };
        let module = lower(traced, target)?;
        let client = client(backend)?;
        let executable = client.compile(&module)?;
        let operands = traced.operand_types().cloned().collect();
        let outputs = traced.outputs.iter().map(|o| o.array.clone()).collect();
        let data_dependent = (!traced.prefetch.is_empty()).then(|| traced.clone());
        Ok(Compiled { client, executable, operands, outputs, data_dependent })
    }

    /// Uploads operands after checking them against the types the call was compiled for.
    pub fn upload(&self, operands: &[HostArray]) -> Result<Vec<Buffer>> {
        if operands.len() != self.operands.len() {
            return Err(Error::Input(format!("expected {} arrays, got {}", self.operands.len(), operands.len())));
        }
        operands
            .iter()
            .zip(&self.operands)
            .enumerate()
            .map(|(i, (a, t))| {
                if a.value_type() != *t {
                    return Err(Error::Input(format!("operand {i} is {}, but the call was compiled for {t}", a.value_type())));
                }
                upload(&self.client, a)
            })
            .collect()
    }

    /// Runs on device buffers; returns device buffers. The block indices data-dependent index
    /// maps compute are not checked here (the tables are on the device): [`Compiled::run`]
    /// and the raw-memory runs check them.
    pub fn execute(&self, operands: &[Buffer]) -> Result<Vec<Buffer>> {
        let refs: Vec<&Buffer> = operands.iter().collect();
        Ok(self.executable.execute(&refs)?)
    }

    /// Runs on host arrays; returns host arrays.
    pub fn run(&self, operands: &[HostArray]) -> Result<Vec<HostArray>> {
        check_outputs_fit(&self.outputs)?;
        let buffers = self.upload(operands)?;
        if let Some(traced) = &self.data_dependent {
            traced.check_block_indices(operands.get(..traced.prefetch.len()).unwrap_or_default())?;
        }
        let out = self.execute(&buffers)?;
        out.iter().zip(&self.outputs).map(|(b, t)| download(b, t)).collect()
    }

    /// Runs on raw host memory (dense, row-major, little-endian, of the compiled types):
    /// operands are read where they lie (the CPU plugin aliases them) and each output is
    /// copied straight into its slice of `outputs`.
    pub fn run_in_place(&self, operands: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        check_host_memory("output", outputs.iter().map(|o| o.len()), &self.outputs)?;
        for (result, dst) in self.run_borrowing(operands)?.iter().zip(outputs.iter_mut()) {
            result.copy_to_host(dst)?;
        }
        Ok(())
    }

    /// Runs on raw host memory as [`Compiled::run_in_place`] does, leaving the outputs in the
    /// device buffers the plugin made.
    fn run_borrowing(&self, operands: &[&[u8]]) -> Result<Vec<Buffer>> {
        check_host_memory("operand", operands.iter().map(|o| o.len()), &self.operands)?;
        if let Some(traced) = &self.data_dependent {
            let prefetch = operands.iter().zip(&self.operands).take(traced.prefetch.len()).map(|(raw, t)| transfer::from_bytes(raw, t)).collect::<Result<Vec<_>>>()?;
            traced.check_block_indices(&prefetch)?;
        }
        let buffers =
            operands.iter().zip(&self.operands).map(|(data, t)| self.client.borrow_buffer(data, transfer::element_type(t.dtype), &t.shape)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Buffer> = buffers.iter().map(|b| &**b).collect();
        Ok(self.executable.execute(&refs)?)
    }

    /// Device time of one execution: `warmup` runs, then the median (and spread) of `reps`,
    /// rotating through `operand_sets` so that caches do not flatter small problems.
    pub fn time(&self, operand_sets: &[Vec<Buffer>], warmup: usize, reps: usize) -> Result<Timing> {
        Ok(Timing::from_samples(self.sample(operand_sets, warmup, reps)?))
    }

    /// The milliseconds of each of `reps` executions after `warmup`, as [`Compiled::time`]
    /// runs them.
    pub fn sample(&self, operand_sets: &[Vec<Buffer>], warmup: usize, reps: usize) -> Result<Vec<f64>> {
        if operand_sets.is_empty() || reps == 0 {
            return Err(Error::Input("timing needs at least one operand set and one repetition".into()));
        }
        for i in 0..warmup {
            self.execute(&operand_sets[i % operand_sets.len()])?;
        }
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps {
            let t = Instant::now();
            self.execute(&operand_sets[i % operand_sets.len()])?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    }
}

/// Summary of repeated timings, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Timing {
    pub fn from_samples(mut ms: Vec<f64>) -> Timing {
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
        Timing { median_ms: median, min_ms: ms[0], max_ms: ms[n - 1], samples: n }
    }

    /// (max - min) / median: how noisy the measurement was.
    pub fn spread(&self) -> f64 {
        (self.max_ms - self.min_ms) / self.median_ms
    }
}

/// Checks raw host memory against the types a call was made for: one slice per type, each
/// exactly that type's size; `what` names the slices in errors.
fn check_host_memory(what: &str, sizes: impl ExactSizeIterator<Item = usize>, types: &[ValueType]) -> Result<()> {
    if sizes.len() != types.len() {
        return Err(Error::Input(format!("expected {} {what}s, got {}", types.len(), sizes.len())));
    }
    for (i, (len, t)) in sizes.zip(types).enumerate() {
        if len != t.size_bytes() {
            return Err(Error::Input(format!("{what} {i} has {len} bytes; the call was made for {t} ({} bytes)", t.size_bytes())));
        }
    }
    Ok(())
}

/// An error, rather than an abort, when outputs of these types cannot be allocated here.
fn check_outputs_fit<'a>(outputs: impl IntoIterator<Item = &'a ValueType>) -> Result<()> {
    torchtpu_dsl::memory::check_types_fit(outputs, 1, "the kernel's outputs").map_err(Error::Memory)
}

/// Runs `call` on `backend` over `operands` (scalar-prefetch arrays first).
pub fn run(call: &PallasCall, backend: Backend, operands: &[HostArray]) -> Result<Vec<HostArray>> {
    let types: Vec<ValueType> = operands.iter().map(HostArray::value_type).collect();
    let traced = call.trace(&types)?;
    if backend == Backend::Interpret {
        check_outputs_fit(traced.outputs.iter().map(|o| &o.array))?;
        return interpreter_pool().install(|| Ok(traced.interpret(operands, InterpretOptions::default())?));
    }
    Compiled::new(&traced, backend)?.run(operands)
}

/// The interpreter's thread pool, one per process: rayon's global pool would hang in a child
/// forked after the parent used it (the child has its bookkeeping but not its threads).
fn interpreter_pool() -> Arc<rayon::ThreadPool> {
    static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    match pool.as_ref() {
        Some((p, existing)) if *p == pid => existing.clone(),
        _ => {
            // A pool inherited through fork has no threads; dropping it would wait for them.
            std::mem::forget(pool.take());
            let fresh = Arc::new(rayon::ThreadPoolBuilder::new().build().unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool")));
            *pool = Some((pid, fresh.clone()));
            fresh
        }
    }
}

/// A traced call made ready to run on raw host memory: compiled for a device backend, or
/// kept for the interpreter.
pub enum Prepared {
    Device(Compiled),
    Interpreter(TracedCall),
}

impl Prepared {
    pub fn new(traced: &TracedCall, backend: Backend) -> Result<Prepared> {
        Ok(match backend {
            Backend::Interpret => Prepared::Interpreter(traced.clone()),
            device => Prepared::Device(Compiled::new(traced, device)?),
        })
    }

    /// Runs over raw host memory (operands as for [`Compiled::run_in_place`]) and returns the
    /// outputs in host memory without copying them where the backend made them there (the
    /// CPU plugin); elsewhere they are downloaded.
    pub fn run_to_host(&self, operands: &[&[u8]]) -> Result<Vec<HostOutput>> {
        let traced = match self {
            Prepared::Device(c) => {
                check_outputs_fit(&c.outputs)?;
                let on_host = c.client.platform() == "cpu";
                return c
                    .run_borrowing(operands)?
                    .into_iter()
                    .zip(&c.outputs)
                    .map(|(buffer, t)| {
                        if !on_host {
                            return Ok(HostOutput::owned(t.clone(), buffer.to_host(t.size_bytes())?));
                        }
                        let data = buffer.unsafe_pointer()?;
                        Ok(HostOutput { value_type: t.clone(), data: HostData::Device { data, _buffer: buffer } })
                    })
                    .collect();
            }
            Prepared::Interpreter(t) => t,
        };
        check_outputs_fit(traced.outputs.iter().map(|o| &o.array))?;
        let types: Vec<ValueType> = traced.operand_types().cloned().collect();
        check_host_memory("operand", operands.iter().map(|o| o.len()), &types)?;
        let arrays = operands.iter().zip(&types).map(|(raw, t)| transfer::from_bytes(raw, t)).collect::<Result<Vec<_>>>()?;
        let results = interpreter_pool().install(|| traced.interpret(&arrays, InterpretOptions::default()))?;
        Ok(results.iter().map(|r| HostOutput::owned(r.value_type(), transfer::to_bytes(r))).collect())
    }
}

/// An output array in host memory: left in the CPU plugin's buffer, or owned.
pub struct HostOutput {
    pub value_type: ValueType,
    data: HostData,
}

enum HostData {
    /// `data` points into the buffer, kept here so the memory lives as long as this.
    Device {
        data: *const u8,
        _buffer: Buffer,
    },
    Owned(Vec<u8>),
}

// SAFETY: the buffer is Send + Sync and its memory is only read through `bytes`.
unsafe impl Send for HostOutput {}
unsafe impl Sync for HostOutput {}

impl HostOutput {
    /// An output over `bytes` (dense, row-major, little-endian `value_type`).
    pub fn owned(value_type: ValueType, bytes: Vec<u8>) -> HostOutput {
        HostOutput { value_type, data: HostData::Owned(bytes) }
    }

    /// The array's bytes (row-major, little-endian).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            HostData::Owned(v) => v,
            HostData::Device { data, .. } => {
                let len = self.value_type.size_bytes();
                if len == 0 {
                    return &[];
                }
                // SAFETY: the CPU plugin's buffer holds exactly this array, dense, and lives
                // (unmodified: nothing else holds it) as long as `self`.
                unsafe { std::slice::from_raw_parts(*data, len) }
            }
        }
    }
}
