//! Quantized matmul (weight-only int8 and w8a8, scales per channel and per block) against f64
//! on fresh random inputs: ragged shapes, f32 and bf16, on the interpreter (checked) and PJRT
//! CPU; w8a8's int32 accumulation checked bit for bit; bad scale blocks and layouts refused;
//! compiled by libtpu for every chip.

mod common;

use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::op::{self, Op};
use torchtpu_kernels::quantized_matmul::{kernel_scales, Quantization, QuantizedConfig, QuantizedMatmulOp, QuantizedProblem};
use torchtpu_runtime::{Chip, TpuCompiler};

const OP: QuantizedMatmulOp = QuantizedMatmulOp;

#[test]
fn matches_f64_on_every_backend() {
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    for (m, k, n) in [(1, 128, 128), (37, 300, 200), (64, 640, 256)] {
        for dtype in [DType::F32, DType::BF16] {
            for quantization in [Quantization::WeightOnly, Quantization::W8a8] {
                for block in [None, Some(128), Some(256)] {
                    let p = QuantizedProblem { m, k, n, dtype, quantization, block };
                    let inputs = OP.random_inputs(&p, &mut rng);
                    // w8a8's dots on int8, and widened to bf16 (as on v4).
                    for int8_dots in [1, 0] {
                        let small = QuantizedConfig { bm: 32, bn: 128, bk: 256, int8_dots };
                        common::assert_matches_f64(&OP, &p, small, &inputs, dtype, 2.0, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn w8a8_accumulates_exactly() {
    let mut rng = StdRng::seed_from_u64(7);
    // |sums| < 128 · 128 · 512 = 2^23: exact in f32, so unit scales give the integers.
    let p = QuantizedProblem { m: 70, k: 512, n: 160, dtype: DType::F32, quantization: Quantization::W8a8, block: None };
    let ints = |rng: &mut StdRng, shape: [usize; 2]| ArrayD::from_shape_simple_fn(shape.to_vec(), || f64::from(rng.random_range(-128i32..=127)));
    let (x, w) = (ints(&mut rng, [p.m, p.k]), ints(&mut rng, [p.n, p.k]));
    let inputs = [
        HostArray::from_f64(DType::I8, &x),
        HostArray::from_f64(DType::F32, &ArrayD::ones(vec![p.m, 1])),
        HostArray::from_f64(DType::I8, &w),
        HostArray::from_f64(DType::F32, &ArrayD::ones(vec![1, 1, p.n])),
    ];
    let want: Vec<i64> = (0..p.m).flat_map(|i| (0..p.n).map(move |j| (i, j))).map(|(i, j)| (0..p.k).map(|c| x[[i, c]] as i64 * w[[j, c]] as i64).sum()).collect();
    for config in [QuantizedConfig { bm: 32, bn: 128, bk: 128, int8_dots: 1 }, QuantizedConfig { bm: 32, bn: 128, bk: 512, int8_dots: 0 }, OP.default_config(&p)] {
        let got = OP.call(&p, &OP.fit(&p, config)).expect("call").interpret_checked(&inputs).expect("interprets");
        let got: Vec<i64> = got[0].to_f64().iter().map(|&v| v as i64).collect();
        assert_eq!(got, want, "{config:?}");
    }
    let on_cpu = op::run(&OP, &p, None, &inputs, Backend::Cpu).expect("runs");
    assert_eq!(on_cpu[0].to_f64().iter().map(|&v| v as i64).collect::<Vec<_>>(), want);
}

#[test]
fn bad_scales_are_errors() {
    let p = QuantizedProblem { m: 8, k: 256, n: 128, dtype: DType::F32, quantization: Quantization::WeightOnly, block: Some(100) };
    assert!(OP.check(&p).unwrap_err().to_string().contains("positive multiple of 128"));
    assert!(OP.check(&QuantizedProblem { block: Some(0), ..p }).is_err());
    assert!(OP.check(&QuantizedProblem { dtype: DType::I8, block: None, ..p }).is_err());
    let per_block = QuantizedProblem { block: Some(128), ..p };
    assert_eq!(kernel_scales(&ArrayD::ones(vec![128, 2]), &per_block).expect("[n, k blocks]").shape(), &[2, 1, 128]);
    assert!(kernel_scales(&ArrayD::ones(vec![128]), &per_block).unwrap_err().to_string().contains("[128, 2]"));
    assert!(kernel_scales(&ArrayD::ones(vec![64]), &QuantizedProblem { block: None, ..p }).unwrap_err().to_string().contains("[128]"));
    assert!(OP.call(&per_block, &QuantizedConfig { bm: 8, bn: 128, bk: 192, int8_dots: 1 }).is_err());
}

#[test]
fn empty_problems_give_zeros() {
    let mut rng = StdRng::seed_from_u64(3);
    for (m, k, n) in [(0, 128, 128), (8, 0, 128), (8, 128, 0)] {
        let p = QuantizedProblem { m, k, n, dtype: DType::F32, quantization: Quantization::W8a8, block: None };
        let out = op::run(&OP, &p, None, &OP.random_inputs(&p, &mut rng), Backend::Cpu).expect("runs");
        assert_eq!(out[0].shape(), &[m, n]);
        assert!(out[0].to_f64().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    for (m, k, n, dtype) in [(1024, 4096, 4096, DType::BF16), (37, 300, 200, DType::F32), (8, 4096, 11008, DType::BF16)] {
        for quantization in [Quantization::WeightOnly, Quantization::W8a8] {
            for block in [None, Some(128)] {
                let p = QuantizedProblem { m, k, n, dtype, quantization, block };
                for chip in Chip::ALL {
                    let module = op::tpu_module(&OP, &p, None, chip).unwrap_or_else(|e| panic!("{p:?}: {e}"));
                    compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{p:?} on {chip}: {e}"));
                }
            }
        }
    }
}
