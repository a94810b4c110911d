//! Manual DMA misuse: the interpreter reports a wait without a start, a read of a buffer whose
//! copy has not landed (checked mode), and a copy never waited for, each at the kernel's Rust
//! line; reading a ref left in HBM is a trace error. (The double-buffered paged gather that
//! uses DMA correctly is in the acceptance set: `testkernels/src/paged_gather.rs`.)

use ndarray::ArrayD;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::InterpretOptions;

/// How the kernel misuses its copy of `src[0]` into `buf`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Misuse {
    None,
    WaitWithoutStart,
    ReadBeforeWait,
    NeverWaited,
}

#[tpu_kernel]
fn copy_page(src: &Ref<f32>, out: &mut Ref<f32>, buf: &mut Scratch<f32>, sems: &mut Scratch<DmaSemaphore>, misuse: Misuse) {
    let copy = async_copy(src.at((0, .., ..)), buf.at((.., ..)), sems.at([0]));
    if misuse != Misuse::WaitWithoutStart {
        copy.start();
    }
    if misuse == Misuse::ReadBeforeWait {
        out.store(buf.load());
    }
    if misuse != Misuse::NeverWaited {
        copy.wait();
    }
    match misuse {
        Misuse::None | Misuse::WaitWithoutStart => out.store(buf.load()),
        _ => out.store(zeros()),
    }
}

fn call(misuse: Misuse) -> PallasCall {
    PallasCall::new(copy_page::kernel(misuse))
        .grid([1])
        .in_specs([BlockSpec::any()])
        .out_specs([BlockSpec::new([8, 128], |[_i]| (0, 0))])
        .out_shapes([[8, 128]])
        .scratch([Vmem::new([8, 128]), DmaSemaphores::new(1)])
}

fn src() -> HostArray {
    HostArray::from_f64(DType::F32, &ArrayD::from_shape_fn(vec![3, 8, 128], |ix| (ix[0] * 10000 + ix[1] * 128 + ix[2]) as f64))
}

fn line_of(marker: &str) -> usize {
    include_str!("dma.rs").lines().position(|l| l.contains(marker)).expect("marker") + 1
}

fn interpret(misuse: Misuse, checked: bool) -> Result<Vec<HostArray>, String> {
    let traced = call(misuse).trace(&[src().value_type()]).map_err(|e| e.to_string())?;
    traced.interpret(&[src()], InterpretOptions { checked }).map_err(|e| e.to_string())
}

#[test]
fn a_correct_copy_lands_by_its_wait() {
    let want = src().to_f64().index_axis(ndarray::Axis(0), 0).to_owned();
    for checked in [false, true] {
        let out = interpret(Misuse::None, checked).expect("runs");
        assert_eq!(out[0].to_f64(), want, "checked {checked}");
    }
}

#[test]
fn a_wait_without_a_start_is_an_error_in_both_modes() {
    for checked in [false, true] {
        let err = interpret(Misuse::WaitWithoutStart, checked).expect_err("no copy to wait for");
        assert!(err.contains("a wait without a start") && err.contains(&format!("dma.rs:{}", line_of("copy.wait();"))), "{err}");
    }
}

#[test]
fn reading_a_buffer_before_its_copy_lands_is_a_checked_mode_error() {
    let err = interpret(Misuse::ReadBeforeWait, true).expect_err("reads an in-flight buffer");
    let (read, start) = (line_of("if misuse == Misuse::ReadBeforeWait {") + 1, line_of("copy.start();"));
    assert!(err.contains("reads `buf`") && err.contains(&format!("dma.rs:{read}")) && err.contains(&format!("dma.rs:{start}")), "{err}");
}

#[test]
fn a_copy_never_waited_for_is_an_error_at_its_start() {
    for checked in [false, true] {
        let err = interpret(Misuse::NeverWaited, checked).expect_err("left in flight");
        assert!(err.contains("never waited") && err.contains("non-zero") && err.contains(&format!("dma.rs:{}", line_of("copy.start();"))), "{err}");
    }
}

#[tpu_kernel]
fn load_from_hbm(src: &Ref<f32>, out: &mut Ref<f32>) {
    out.store(src.load_at((0, .., ..)));
}

#[test]
fn loading_from_a_ref_left_in_hbm_is_a_trace_error() {
    let call = PallasCall::new(load_from_hbm::kernel()).grid([1]).in_specs([BlockSpec::any()]).out_specs([BlockSpec::new([8, 128], |[_i]| (0, 0))]).out_shapes([[8, 128]]);
    let err = call.trace(&[ValueType::new(DType::F32, [3, 8, 128])]).expect_err("HBM is not loadable").to_string();
    assert!(err.contains("left in HBM") && err.contains("async_copy") && err.contains(&format!("dma.rs:{}", line_of("out.store(src.load_at("))), "{err}");
}

#[tpu_kernel]
fn mismatched_copy(src: &Ref<f32>, out: &mut Ref<f32>, buf: &mut Scratch<f32>, sems: &mut Scratch<DmaSemaphore>) {
    async_copy(src.at((0, 0..4, ..)), buf.at((.., ..)), sems.at([0])).start();
    out.store(buf.load());
}

#[test]
fn a_copy_between_regions_of_other_shapes_is_a_trace_error() {
    let call = PallasCall::new(mismatched_copy::kernel())
        .grid([1])
        .in_specs([BlockSpec::any()])
        .out_specs([BlockSpec::new([8, 128], |[_i]| (0, 0))])
        .out_shapes([[8, 128]])
        .scratch([Vmem::new([8, 128]), DmaSemaphores::new(1)]);
    let err = call.trace(&[src().value_type()]).expect_err("4 rows into 8").to_string();
    assert!(err.contains("the two sides must match"), "{err}");
}
