//! Bad input on the PJRT path is a clear error and never reaches (or aborts) the plugin.

use ndarray::Array2;
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::{client, run, Backend, Compiled};
use torchtpu_testkernels::{add::Add, Example};

fn example() -> Add {
    Add { rows: 64, cols: 256, block: (16, 128), dtype: DType::F32 }
}

#[test]
fn wrong_shapes_and_dtypes_are_rejected_before_the_plugin() {
    let ex = example();
    let good = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(1));
    let traced = ex.call().trace(&good.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    let compiled = Compiled::new(&traced, Backend::Cpu).expect("compiles");
    let wrong_shape = vec![HostArray::from(Array2::<f32>::zeros((32, 256))), good[1].clone()];
    let err = compiled.run(&wrong_shape).expect_err("wrong shape").to_string();
    assert!(err.contains("operand 0 is 32x256xf32, but the call was compiled for 64x256xf32"), "{err}");
    let err = compiled.run(&good[..1]).expect_err("missing operand").to_string();
    assert!(err.contains("expected 2 arrays, got 1"), "{err}");
    let wrong_dtype = vec![HostArray::from(Array2::<i32>::zeros((64, 256))), good[1].clone()];
    let err = run(&ex.call(), Backend::Cpu, &wrong_dtype).expect_err("wrong dtype").to_string();
    assert!(err.contains("must be f32, got i32"), "{err}");
    // The compiled call still works after all that.
    assert_eq!(compiled.run(&good).expect("runs").len(), 1);
}

#[test]
fn a_module_the_plugin_rejects_is_an_error() {
    let ex = example();
    let inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(1));
    let traced = ex.call().trace(&inputs.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    // A TPU custom call means nothing to the CPU plugin.
    let tpu_module = lower(&traced, Target::TpuStableHlo).expect("lowers");
    let err = client(Backend::Cpu).expect("client").compile(&tpu_module).expect_err("rejected").to_string();
    assert!(err.contains("Client_Compile") && err.contains("tpu_custom_call"), "{err}");
}

#[test]
fn a_scalar_prefetch_index_past_the_table_is_an_error_on_every_backend() {
    // A compiled dynamic slice would clamp the index to the last page and gather the wrong
    // one; PJRT runs check the data-dependent block indices first, as the interpreter does.
    use torchtpu_testkernels::gather::Gather;
    let ex = Gather { pages: 10, dim: 128, indices: 5, dtype: DType::F32 };
    let mut inputs = ex.random_inputs(&mut rand::SeedableRng::seed_from_u64(2));
    inputs[0] = HostArray::from(ndarray::Array1::from(vec![0, 3, 10, 1, 2]));
    let traced = ex.call().trace(&ex.operand_types()).expect("traces");
    let compiled = Compiled::new(&traced, Backend::Cpu).expect("compiles");
    for err in [run(&ex.call(), Backend::Interpret, &inputs).expect_err("interpreter"), compiled.run(&inputs).expect_err("PJRT CPU")] {
        let err = err.to_string();
        assert!(err.contains("grid index [2]") && err.contains("block [10, 0, 0]"), "{err}");
    }
    let prepared = torchtpu_exec::Prepared::new(&traced, Backend::Cpu).expect("compiles");
    let indices: Vec<u8> = [0i32, 3, 10, 1, 2].iter().flat_map(|i| i.to_le_bytes()).collect();
    let table: Vec<u8> = inputs[1].to_f64().iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
    let raw = [indices, table];
    let raw: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
    assert!(prepared.run_to_host(&raw).is_err(), "raw-memory runs check too");
    inputs[0] = HostArray::from(ndarray::Array1::from(vec![0, 3, 9, 1, 2]));
    assert!(compiled.run(&inputs).is_ok(), "in range runs");
}
