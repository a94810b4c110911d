//! The random number generator: the seed contract (the bits are a function of the seeds;
//! other seeds, programs and draws give other bits), the distribution of its bits and
//! uniforms, the interpreter and PJRT CPU giving the same bits, and libtpu compiling the
//! hardware generator's ops for every chip.

use ndarray::{ArrayD, Axis};
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::prelude::*;
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::{Chip, TpuCompiler};

const ROWS: usize = 8;
const LANES: usize = 1024;

/// Program `i`, seeded with `(seed, i)`, writes `draws` tiles of bits in a traced loop, then
/// one tile of uniforms.
#[tpu_kernel]
fn draw(bits: &mut Ref<i32>, uniform: &mut Ref<f32>, seed: i32, draws: i32) {
    prng_seed(&[Scalar::constant(seed), program_id(0)]);
    for d in 0..Scalar::constant(draws) {
        bits.store_at((ds(d * ROWS as i32, ROWS), ..), prng_random_bits([ROWS, LANES]));
    }
    uniform.store(random_uniform([ROWS, LANES]));
}

const DRAWS: usize = 2;

fn call(seed: i32, programs: usize) -> PallasCall {
    PallasCall::new(draw::kernel(seed, DRAWS as i32))
        .grid([programs])
        .out_specs([BlockSpec::new([DRAWS * ROWS, LANES], |[i]| (i, 0)), BlockSpec::new([ROWS, LANES], |[i]| (i, 0))])
        .out_shapes([[programs * DRAWS * ROWS, LANES], [programs * ROWS, LANES]])
}

fn run(seed: i32, programs: usize, backend: Backend) -> (ArrayD<i32>, ArrayD<f32>) {
    let call = call(seed, programs);
    let out = match backend {
        Backend::Interpret => call.interpret(&[]).expect("interprets"),
        _ => Compiled::new(&call.trace(&[]).expect("traces"), backend).and_then(|c| c.run(&[])).expect("runs"),
    };
    let mut out = out.into_iter();
    let bits = out.next().and_then(|a| a.into_array::<i32>().ok()).expect("i32 bits");
    let uniform = out.next().and_then(|a| a.into_array::<f32>().ok()).expect("f32 uniforms");
    (bits, uniform)
}

/// The share of positions where `a` and `b` differ.
fn differing(a: ndarray::ArrayViewD<i32>, b: ndarray::ArrayViewD<i32>) -> f64 {
    a.iter().zip(b.iter()).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

#[test]
fn the_bits_are_a_function_of_the_seeds_and_both_cpu_backends_draw_the_same() {
    let (bits, uniform) = run(7, 4, Backend::Interpret);
    let (cpu_bits, cpu_uniform) = run(7, 4, Backend::Cpu);
    assert_eq!(bits, cpu_bits, "the interpreter and PJRT CPU draw different bits");
    assert_eq!(uniform, cpu_uniform);
    assert_eq!(run(7, 4, Backend::Interpret).0, bits, "a seed gives the same bits every run");
    let other = run(8, 4, Backend::Interpret).0;
    assert!(differing(bits.view(), other.view()) > 0.99, "another seed gives other bits");
    let block = DRAWS * ROWS;
    let program = |i: usize| bits.slice_axis(Axis(0), (i * block..(i + 1) * block).into());
    assert!(differing(program(0), program(1)) > 0.99, "programs seeded with their id draw other bits");
    let first = program(0).slice_axis(Axis(0), (0..ROWS).into()).to_owned().into_dyn();
    let second = program(0).slice_axis(Axis(0), (ROWS..2 * ROWS).into()).to_owned().into_dyn();
    assert!(differing(first.view(), second.view()) > 0.99, "each draw in a traced loop gives new bits");
}

#[test]
fn bits_and_uniforms_are_uniformly_distributed() {
    let (bits, uniform) = run(12345, 16, Backend::Interpret);
    // Every bit position is set about half the time.
    let n = bits.len() as f64;
    for b in 0..32 {
        let ones = bits.iter().filter(|&&v| (v as u32 >> b) & 1 == 1).count() as f64;
        assert!((ones / n - 0.5).abs() < 0.01, "bit {b} is set in {} of draws", ones / n);
    }
    // Uniforms: in [0, 1), mean 1/2, variance 1/12, and a chi-square over 64 bins well under
    // its 0.999 quantile (about 104 for 63 degrees of freedom).
    let m = uniform.len() as f64;
    assert!(uniform.iter().all(|&u| (0.0..1.0).contains(&u)));
    let mean = uniform.iter().map(|&u| f64::from(u)).sum::<f64>() / m;
    let var = uniform.iter().map(|&u| (f64::from(u) - mean).powi(2)).sum::<f64>() / m;
    assert!(approx::abs_diff_eq!(mean, 0.5, epsilon = 0.01) && approx::abs_diff_eq!(var, 1.0 / 12.0, epsilon = 0.005), "mean {mean}, variance {var}");
    let mut bins = [0f64; 64];
    for &u in &uniform {
        bins[((u * 64.0) as usize).min(63)] += 1.0;
    }
    let expected = m / 64.0;
    let chi2: f64 = bins.iter().map(|&o| (o - expected).powi(2) / expected).sum();
    assert!(chi2 < 104.0, "chi-square {chi2} over 64 bins");
}

#[test]
fn the_hardware_generator_compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let module = lower(&call(7, 4).trace(&[]).expect("traces"), Target::TpuStableHlo).expect("lowers");
    for chip in Chip::ALL {
        if let Err(e) = compiler.compile(chip, &module) {
            panic!("{chip}: {}", e.message);
        }
    }
}

#[tpu_kernel]
fn unseeded(bits: &mut Ref<i32>) {
    bits.store(prng_random_bits([ROWS, 128]));
}

#[test]
fn drawing_before_seeding_is_a_trace_error_at_the_kernels_line() {
    let call = PallasCall::new(unseeded::kernel()).grid([1]).out_specs([BlockSpec::new([ROWS, 128], |[_i]| (0, 0))]).out_shapes([[ROWS, 128]]);
    let err = call.trace(&[]).expect_err("unseeded").to_string();
    let line = include_str!("random.rs").lines().position(|l| l.contains("bits.store(prng_random_bits(")).expect("marker") + 1;
    assert!(err.contains("before any prng_seed") && err.contains(&format!("random.rs:{line}")), "{err}");
}
