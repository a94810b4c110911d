//! The README's quick start.

use ndarray::Array2;
use torchtpu::prelude::*;

#[tpu_kernel]
fn matmul(x: &Ref<f32>, y: &Ref<f32>, z: &mut Ref<f32>, acc: &mut Scratch<f32>) {
    let k = program_id(2);
    if k == 0 {
        acc.store(zeros());
    }
    acc.store(acc.load() + dot(x.load(), y.load()));
    if k == num_programs(2) - 1 {
        z.store(acc.load());
    }
}

fn main() -> Result<(), torchtpu::dsl::Error> {
    let (m, n, k, b) = (256, 256, 512, 128);
    let call = PallasCall::new(matmul::kernel())
        .grid([m / b, n / b, k / b])
        .in_specs([BlockSpec::new([b, b], |[i, _, k]| (i, k)), BlockSpec::new([b, b], |[_, j, k]| (k, j))])
        .out_specs([BlockSpec::new([b, b], |[i, j, _]| (i, j))])
        .out_shapes([[m, n]])
        .scratch([Vmem::new([b, b])])
        .dimension_semantics([Parallel, Parallel, Arbitrary]);

    let x = Array2::<f32>::from_shape_fn((m, k), |(i, j)| ((i + j) % 7) as f32);
    let y = Array2::<f32>::from_shape_fn((k, n), |(i, j)| ((i * j) % 5) as f32);
    let z = call.interpret(&[HostArray::from(&x), HostArray::from(&y)])?; // CPU interpreter
    let z = z[0].view::<f32>().expect("f32 output");
    assert_eq!(z, x.dot(&y).into_dyn());

    let traced = call.trace(&[HostArray::from(&x).value_type(), HostArray::from(&y).value_type()])?;
    println!("{}", traced.body); // the kernel IR, each op tagged with its Rust line
    Ok(())
}
