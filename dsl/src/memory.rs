//! Host memory: whether arrays of a given size can be allocated here. Allocation failure aborts
//! a Rust process and overcommitted memory ends in the OOM killer, so a request that cannot
//! fit is refused up front with an error that says how much it needed.

use crate::ir::ValueType;

/// Bytes the system can still hand out without swapping (`MemAvailable`), if it says.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes of dense arrays of these types; saturating, since a size past the address space is
/// too large for any machine anyway.
pub fn bytes_of<'a>(types: impl IntoIterator<Item = &'a ValueType>) -> u128 {
    types.into_iter().map(|t| t.checked_size_bytes().map_or(u128::MAX, |b| b as u128)).fold(0, u128::saturating_add)
}

/// `Err(message)` when `copies` copies of arrays of `types` (for `what`) exceed the memory
/// available now.
pub fn check_types_fit<'a>(types: impl IntoIterator<Item = &'a ValueType>, copies: u128, what: &str) -> Result<(), String> {
    check_fits(bytes_of(types).saturating_mul(copies), what)
}

/// `Err(message)` when `bytes` (for `what`) exceed the memory available now, or (where the
/// system does not say) what any allocation can address.
pub fn check_fits(bytes: u128, what: &str) -> Result<(), String> {
    if bytes > isize::MAX as u128 {
        return Err(format!("{what} needs {bytes} bytes, more than this machine can address"));
    }
    let Some(available) = available_bytes() else {
        return Ok(());
    };
    if bytes > available as u128 {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(format!("{what} needs {:.2} GiB of host memory, but only {:.2} GiB is available", gib(bytes), gib(available as u128)));
    }
    Ok(())
}
