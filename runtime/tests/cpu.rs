//! The PJRT CPU plugin through our bindings: compile, transfer, execute, and the error paths.
//! Needs the plugin `scripts/setup.sh` installs; never skips.

use torchtpu_runtime::{locate, Client, ElementType, Plugin};

const ADD_MUL: &str = r#"module @add_mul {
  func.func public @main(%a: tensor<2x3xf32>, %b: tensor<2x3xf32>) -> (tensor<2x3xf32>, tensor<2x3xf32>) {
    %0 = stablehlo.add %a, %b : tensor<2x3xf32>
    %1 = stablehlo.multiply %a, %b : tensor<2x3xf32>
    return %0, %1 : tensor<2x3xf32>, tensor<2x3xf32>
  }
}"#;

fn client() -> Client {
    let path = locate::cpu_plugin().unwrap_or_else(|e| panic!("the PJRT CPU plugin is required (run scripts/setup.sh): {e}"));
    Client::new(&Plugin::load(&path).expect("loads")).expect("client")
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn executes_a_module_with_two_outputs() {
    let c = client();
    assert_eq!(c.platform(), "cpu");
    let exe = c.compile(ADD_MUL).expect("compiles");
    assert_eq!(exe.num_outputs(), 2);
    let (a, b) = ([1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5f32, -1.0, 2.0, 0.0, 10.0, -3.0]);
    let ba = c.buffer(&bytes(&a), ElementType::F32, &[2, 3]).expect("upload");
    let bb = c.buffer(&bytes(&b), ElementType::F32, &[2, 3]).expect("upload");
    let out = exe.execute(&[&ba, &bb]).expect("runs");
    let sum = floats(&out[0].to_host(24).expect("download"));
    let prod = floats(&out[1].to_host(24).expect("download"));
    for i in 0..6 {
        assert_eq!(sum[i], a[i] + b[i]);
        assert_eq!(prod[i], a[i] * b[i]);
    }
}

#[test]
fn bad_input_is_an_error_not_an_abort() {
    let c = client();
    let err = c.compile("module { this is not mlir }").expect_err("rejected");
    assert!(err.to_string().contains("Client_Compile"), "{err}");
    let err = c.buffer(&[0u8; 10], ElementType::F32, &[2, 3]).expect_err("short buffer");
    assert!(err.to_string().contains("10 bytes"), "{err}");
    let exe = c.compile(ADD_MUL).expect("compiles");
    let x = c.buffer(&bytes(&[1.0; 6]), ElementType::F32, &[2, 3]).expect("upload");
    let out = exe.execute(&[&x, &x]).expect("runs");
    let err = out[0].to_host(4).expect_err("wrong size");
    assert!(err.to_string().contains("24 bytes"), "{err}");
}

#[test]
fn compiled_executables_are_cached_by_module() {
    let c = client();
    for _ in 0..3 {
        c.compile(ADD_MUL).expect("compiles");
    }
    assert_eq!(c.cached_executables(), 1);
    c.compile(&ADD_MUL.replace("@add_mul", "@other")).expect("compiles");
    assert_eq!(c.cached_executables(), 2);
}

#[test]
fn borrowed_buffers_alias_aligned_host_memory_and_outputs_lie_in_host_memory() {
    #[repr(align(64))]
    struct Aligned([u8; 24]);
    let c = client();
    let exe = c.compile(ADD_MUL).expect("compiles");
    let (a, b) = ([1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5f32, -1.0, 2.0, 0.0, 10.0, -3.0]);
    let (mut da, mut db) = (Aligned([0; 24]), Aligned([0; 24]));
    da.0.copy_from_slice(&bytes(&a));
    db.0.copy_from_slice(&bytes(&b));
    let ba = c.borrow_buffer(&da.0, ElementType::F32, &[2, 3]).expect("borrows");
    let bb = c.borrow_buffer(&db.0, ElementType::F32, &[2, 3]).expect("borrows");
    // No copy: the device buffer is the host memory.
    assert_eq!(ba.unsafe_pointer().expect("pointer"), da.0.as_ptr());
    let out = exe.execute(&[&ba, &bb]).expect("runs");
    // The CPU plugin's outputs are host memory we may read in place.
    let p = out[0].unsafe_pointer().expect("pointer");
    // SAFETY: a live CPU-plugin buffer of six f32s.
    let sum = floats(unsafe { std::slice::from_raw_parts(p, 24) });
    assert_eq!(sum, a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>());
    drop((ba, bb));
    assert_eq!(floats(&da.0), a, "the borrowed memory is released unchanged");
    assert!(c.borrow_buffer(&da.0[..20], ElementType::F32, &[2, 3]).is_err(), "a size mismatch is an error");
}
