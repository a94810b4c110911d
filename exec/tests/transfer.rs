//! Host arrays survive the trip to a PJRT CPU buffer and back, for every dtype.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use torchtpu_dsl::HostArray;
use torchtpu_exec::{client, download, upload, Backend};

#[test]
fn every_dtype_round_trips_through_the_cpu_plugin() {
    let c = client(Backend::Cpu).expect("the PJRT CPU plugin (run scripts/setup.sh)");
    let shape = IxDyn(&[3, 5, 7]);
    let n = 3 * 5 * 7;
    let f = |i: usize| (i as f32 - 50.0) * 0.37;
    let arrays = [
        HostArray::F32(ArrayD::from_shape_fn(shape.clone(), |ix| f(ix[0] * 35 + ix[1] * 7 + ix[2]))),
        HostArray::BF16(ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| bf16::from_f32(f(i))).collect()).expect("shape")),
        HostArray::F16(ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| f16::from_f32(f(i))).collect()).expect("shape")),
        HostArray::I32(ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| i as i32 * 1_000_003 - 7).collect()).expect("shape")),
        HostArray::I8(ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| (i as i32 - 52) as i8).collect()).expect("shape")),
        HostArray::Bool(ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| i % 3 == 0).collect()).expect("shape")),
    ];
    for a in arrays {
        let b = upload(&c, &a).expect("uploads");
        let back = download(&b, &a.value_type()).expect("downloads");
        assert_eq!(back, a, "{:?}", a.dtype());
    }
}
