//! A child forked after the parent started PJRT gets a clear error from PJRT backends (a new
//! client would abort there) and can still interpret.

use torchtpu_dsl::HostArray;
use torchtpu_exec::{client, run, Backend, Error};
use torchtpu_testkernels::{add::Add, Example};

#[test]
fn forked_children_get_an_error_for_pjrt_and_can_interpret() {
    client(Backend::Cpu).expect("the parent starts a CPU client");
    let ex = Add { rows: 64, cols: 256, block: (16, 128), dtype: torchtpu_dsl::DType::F32 };
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(5));
    // The parent's interpreter pool exists before the fork too.
    let want = run(&ex.call(), Backend::Interpret, &inputs).expect("interprets");
    // SAFETY: the child only runs the checks below and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let forked = matches!(client(Backend::Cpu), Err(Error::Forked { .. }));
        let got = run(&ex.call(), Backend::Interpret, &inputs);
        let same = got.map(|g| g.iter().map(HostArray::to_f64).eq(want.iter().map(HostArray::to_f64))).unwrap_or(false);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if forked && same { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw no Forked error or could not interpret (status {status})");
}
