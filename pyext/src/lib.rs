//! The PyO3 side of torchtpu's ops, for any extension module that serves ops to PyTorch — the
//! `torchtpu` package's own, or a user's crate's: PyTorch CPU tensors cross as raw memory
//! (pointer, shape, dtype; no libtorch), kernels run on the PJRT CPU plugin with the GIL
//! released, reading the inputs where they lie, and outputs go back as DLPack capsules over
//! the memory the plugin wrote them in. [`ops::add_ops`] gives a module the generic functions
//! `torchtpu.library.RustOp` calls for a list of ops.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::PallasCall;
use torchtpu_exec::{Backend, HostOutput, Prepared};
use torchtpu_runtime::Chip;

pub use pyo3;

pub mod dlpack;
pub mod ops;
pub mod tensor;

thread_local! {
    /// Where and why the last panic on this thread happened, for [`guard`]'s error.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs a function's body, turning a panic (a bug of ours: a user's input must give an error
/// value) into a `RuntimeError` that says where, instead of a `PanicException` (which
/// `except Exception` does not catch) and a backtrace on stderr.
pub fn guard<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| {
        let what = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "a panic".into());
        Err(PyRuntimeError::new_err(format!("internal error in torchtpu (please report it): {what}")))
    })
}

/// Reports panics through [`guard`]'s error instead of the default hook's stderr backtrace:
/// call it once, when the module is created.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned()).unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{at}")));
    }));
}

/// The CPU backend the ops run on: PJRT CPU, which runs our kernels several times faster than
/// the interpreter; the interpreter in a child forked after PJRT started (PJRT does not
/// survive fork).
pub fn backend() -> PyResult<Backend> {
    match torchtpu_exec::client(Backend::Cpu) {
        Ok(_) => Ok(Backend::Cpu),
        Err(torchtpu_exec::Error::Forked { .. }) => Ok(Backend::Interpret),
        Err(e) => Err(PyRuntimeError::new_err(format!("{e} (scripts/setup.sh installs the PJRT CPU plugin)"))),
    }
}

/// The Python exception for an op's error: `ValueError` for what the caller passed, `TypeError`
/// for a dtype, `MemoryError` for what cannot fit, `RuntimeError` otherwise.
pub fn kernel_error(e: torchtpu_kernels::Error) -> PyErr {
    use torchtpu_kernels::Error;
    let memory = match &e {
        Error::Memory(_) => true,
        Error::Exec(x) => matches!(**x, torchtpu_exec::Error::Memory(_)),
        Error::Trace(x) => matches!(**x, torchtpu_dsl::Error::TooLarge { .. }),
        _ => false,
    };
    match e {
        _ if memory => PyMemoryError::new_err(e.to_string()),
        Error::Shape(_) | Error::Config(_) | Error::Argument(_) => PyValueError::new_err(e.to_string()),
        Error::Dtype(_) => PyTypeError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// [`kernel_error`] for an error of running.
pub fn exec_error(e: torchtpu_exec::Error) -> PyErr {
    kernel_error(e.into())
}

/// Kernels ready to run, by the backend and what they were made for. Compiling happens with
/// the GIL released. (A child forked after PJRT started runs on the interpreter: its keys
/// differ, so it never touches the parent's PJRT executables.)
pub fn prepared(
    py: Python<'_>,
    key: String,
    make: impl FnOnce(Backend) -> Result<PallasCall, torchtpu_kernels::Error> + Send,
    types: impl FnOnce() -> Vec<ValueType> + Send,
) -> PyResult<Arc<Prepared>> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Prepared>>>> = LazyLock::new(Default::default);
    let backend = backend()?;
    let key = format!("{backend}/{key}");
    if let Some(c) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let c = py.detach(|| {
        let traced = make(backend)?.trace(&types())?;
        Ok(Arc::new(Prepared::new(&traced, backend)?))
    });
    let c = c.map_err(kernel_error)?;
    CACHE.lock().unwrap_or_else(|p| p.into_inner()).insert(key, c.clone());
    Ok(c)
}

/// Runs `c` with the GIL released; the outputs come back as DLPack capsules over the memory
/// the backend wrote them in.
pub fn run(py: Python<'_>, c: &Prepared, inputs: &[&[u8]]) -> PyResult<Vec<Py<PyAny>>> {
    let outputs = py.detach(|| c.run_to_host(inputs)).map_err(exec_error)?;
    capsules(py, outputs)
}

/// Outputs as DLPack capsules over their memory (`torch.from_dlpack` takes them).
pub fn capsules(py: Python<'_>, outputs: Vec<HostOutput>) -> PyResult<Vec<Py<PyAny>>> {
    outputs.into_iter().map(|o| dlpack::capsule(py, o)).collect()
}

/// The chip called `name` (`v5e`...), or a `ValueError` listing the known ones.
pub fn chip(name: &str) -> PyResult<Chip> {
    name.parse().map_err(|e: torchtpu_runtime::UnknownChip| PyValueError::new_err(e.to_string()))
}
