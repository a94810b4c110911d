//! The tile constructs beyond elementwise ops (roll, slicing, concatenation, transposition,
//! bitcast, mean, `multiple_of`): each against an independent reference written here, on the
//! interpreter and PJRT CPU, and compiled by libtpu for every chip.

use ndarray::{ArrayD, Axis, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchtpu_codegen::{lower, Target};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::{Chip, TpuCompiler};

#[tpu_kernel]
fn roll_static<T: Element>(x: &Ref<T>, y: &mut Ref<T>, shift: i32, axis: usize) {
    y.store(x.load().roll(shift, axis));
}

/// Program `i` rolls the whole input by `i * step + offset`, a traced shift.
#[tpu_kernel]
fn roll_traced<T: Element>(x: &Ref<T>, y: &mut Ref<T>, step: i32, offset: i32, axis: usize) {
    y.store(x.load().roll(program_id(0) * step + offset, axis));
}

/// A roll by `shift` growing by `stride` with each index along `stride_axis`.
#[tpu_kernel]
fn roll_strided<T: Element>(x: &Ref<T>, y: &mut Ref<T>, shift: i32, axis: usize, stride: u32, stride_axis: usize) {
    y.store(x.load().roll_strided(shift, axis, stride, stride_axis));
}

/// Program `i` rolls by `i * step + offset`, a traced shift, growing by `stride` along `stride_axis`.
#[tpu_kernel]
fn roll_strided_traced(x: &Ref<f32>, y: &mut Ref<f32>, step: i32, offset: i32, axis: usize, stride: u32, stride_axis: usize) {
    y.store(x.load().roll_strided(program_id(0) * step + offset, axis, stride, stride_axis));
}

#[tpu_kernel]
fn window<T: Element>(x: &Ref<T>, y: &mut Ref<T>, start: [usize; 2], shape: [usize; 2]) {
    let w = x.load().slice(start, shape);
    y.store(concatenate(&[w, w], 1).slice([0, 0], y.shape()));
}

#[tpu_kernel]
fn joined<T: Element>(a: &Ref<T>, b: &Ref<T>, y: &mut Ref<T>, axis: usize) {
    y.store(concatenate(&[a.load(), b.load()], axis));
}

#[tpu_kernel]
fn transposed<T: Element>(x: &Ref<T>, y: &mut Ref<T>) {
    y.store(x.load().transpose([1, 0]));
}

#[tpu_kernel]
fn float_bits(x: &Ref<f32>, y: &mut Ref<i32>) {
    y.store(x.load().bitcast::<i32>().shift_right_logical(23));
}

#[tpu_kernel]
fn from_bits(x: &Ref<i32>, y: &mut Ref<f32>) {
    y.store(x.load().bitcast::<f32>());
}

#[tpu_kernel]
fn bitcast_rows<T: Element, U: Element>(x: &Ref<T>, y: &mut Ref<U>) {
    y.store(x.load().bitcast::<U>());
}

#[tpu_kernel]
fn row_mean<T: Float>(x: &Ref<T>, y: &mut Ref<T>) {
    let m = x.load().mean_keepdims(1);
    y.store(m.broadcast_to(y.shape()));
}

/// Program `i` copies the 128 lanes at `offsets[i]`, promised a multiple of 128 when `promise`.
#[tpu_kernel]
fn lanes_at(offsets: &Prefetch<i32>, x: &Ref<f32>, y: &mut Ref<f32>, promise: bool) {
    let at = offsets.get([program_id(0)]);
    let at = if promise { at.multiple_of(128) } else { at };
    y.store(x.load_at((.., ds(at, 128))));
}

/// A problem: the call, its operands, and the outputs computed independently in f64.
struct Case {
    name: String,
    call: PallasCall,
    inputs: Vec<HostArray>,
    want: Vec<ArrayD<f64>>,
    dtype: DType,
}

fn random(rng: &mut StdRng, dtype: DType, shape: &[usize]) -> HostArray {
    let a = ArrayD::from_shape_simple_fn(shape.to_vec(), || if dtype.is_float() { rng.random_range(-4.0..4.0) } else { f64::from(rng.random_range(-1000..1000)) });
    HostArray::from_f64(dtype, &a)
}

/// `jnp.roll`: output `i` along `axis` is input `(i - shift) mod n`.
fn np_roll(x: &ArrayD<f64>, shift: i64, axis: usize) -> ArrayD<f64> {
    np_roll_strided(x, shift, axis, 0, 1 - axis.min(1))
}

/// Pallas' strided roll: slice `j` along `stride_axis` is `jnp.roll`ed by `shift + j * stride`.
fn np_roll_strided(x: &ArrayD<f64>, shift: i64, axis: usize, stride: i64, stride_axis: usize) -> ArrayD<f64> {
    let n = x.shape()[axis] as i64;
    ArrayD::from_shape_fn(x.raw_dim(), |ix| {
        let mut src = ix.clone();
        src[axis] = (ix[axis] as i64 - shift - stride * ix[stride_axis] as i64).rem_euclid(n) as usize;
        x[src]
    })
}

fn spec(shape: [usize; 2]) -> BlockSpec {
    BlockSpec::new(shape, |[_i]| (0, 0))
}

fn cases(rng: &mut StdRng) -> Vec<Case> {
    let mut out = Vec::new();
    let shape = [16, 256];
    for dtype in [DType::F32, DType::BF16, DType::I32] {
        for axis in [0, 1] {
            for shift in [0, 1, 5, 127, 128, -1, -300, 1000] {
                let kernel = match dtype {
                    DType::BF16 => roll_static::kernel::<bf16>(shift, axis),
                    DType::I32 => roll_static::kernel::<i32>(shift, axis),
                    _ => roll_static::kernel::<f32>(shift, axis),
                };
                let x = random(rng, dtype, &shape);
                let want = vec![np_roll(&x.to_f64(), i64::from(shift), axis)];
                let call = PallasCall::new(kernel).grid([1]).in_specs([spec(shape)]).out_specs([spec(shape)]).out_shapes([shape]);
                out.push(Case { name: format!("roll {dtype} by {shift} along {axis}"), call, inputs: vec![x], want, dtype });
            }
            // A traced shift: program i rolls by i * 37 - 60, covering negative and large shifts.
            let (step, offset, programs) = (37, -60, 4);
            let kernel = match dtype {
                DType::BF16 => roll_traced::kernel::<bf16>(step, offset, axis),
                DType::I32 => roll_traced::kernel::<i32>(step, offset, axis),
                _ => roll_traced::kernel::<f32>(step, offset, axis),
            };
            let x = random(rng, dtype, &shape);
            let xf = x.to_f64();
            let parts: Vec<ArrayD<f64>> = (0..programs).map(|i| np_roll(&xf, i64::from(i * step + offset), axis)).collect();
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            let want = vec![ndarray::concatenate(Axis(0), &views).expect("same shapes")];
            let call = PallasCall::new(kernel)
                .grid([programs as usize])
                .in_specs([spec(shape)])
                .out_specs([BlockSpec::new(shape, |[i]| (i, 0))])
                .out_shapes([[shape[0] * programs as usize, shape[1]]]);
            out.push(Case { name: format!("roll {dtype} by a traced shift along {axis}"), call, inputs: vec![x], want, dtype });
        }
        // A window at an unaligned offset, joined with itself and cut to 128 lanes.
        for (start, wshape) in [([8, 0], [8, 128]), ([3, 127], [5, 1]), ([0, 64], [16, 64])] {
            let kernel = match dtype {
                DType::BF16 => window::kernel::<bf16>(start, wshape),
                DType::I32 => window::kernel::<i32>(start, wshape),
                _ => window::kernel::<f32>(start, wshape),
            };
            let x = random(rng, dtype, &shape);
            let xf = x.to_f64();
            let oshape = [wshape[0], (2 * wshape[1]).min(128)];
            let want = vec![ArrayD::from_shape_fn(IxDyn(&oshape), |ix| xf[[start[0] + ix[0], start[1] + ix[1] % wshape[1]]])];
            let call = PallasCall::new(kernel).grid([1]).in_specs([spec(shape)]).out_specs([spec(oshape)]).out_shapes([oshape]);
            out.push(Case { name: format!("slice {dtype} {wshape:?} at {start:?}"), call, inputs: vec![x], want, dtype });
        }
        for axis in [0, 1] {
            let kernel = match dtype {
                DType::BF16 => joined::kernel::<bf16>(axis),
                DType::I32 => joined::kernel::<i32>(axis),
                _ => joined::kernel::<f32>(axis),
            };
            let (a, b) = (random(rng, dtype, &shape), random(rng, dtype, &shape));
            let want = vec![ndarray::concatenate(Axis(axis), &[a.to_f64().view(), b.to_f64().view()]).expect("same shapes")];
            let oshape = if axis == 0 { [32, 256] } else { [16, 512] };
            let call = PallasCall::new(kernel).grid([1]).in_specs([spec(shape), spec(shape)]).out_specs([spec(oshape)]).out_shapes([oshape]);
            out.push(Case { name: format!("concatenate {dtype} along {axis}"), call, inputs: vec![a, b], want, dtype });
        }
        let kernel = match dtype {
            DType::BF16 => transposed::kernel::<bf16>(),
            DType::I32 => transposed::kernel::<i32>(),
            _ => transposed::kernel::<f32>(),
        };
        let tshape = [128, 256];
        let x = random(rng, dtype, &tshape);
        let want = vec![x.to_f64().reversed_axes().as_standard_layout().into_owned()];
        let call = PallasCall::new(kernel).grid([1]).in_specs([spec(tshape)]).out_specs([spec([256, 128])]).out_shapes([[256, 128]]);
        out.push(Case { name: format!("transpose {dtype}"), call, inputs: vec![x], want, dtype });
    }
    for dtype in [DType::F32, DType::BF16] {
        let kernel = if dtype == DType::BF16 { row_mean::kernel::<bf16>() } else { row_mean::kernel::<f32>() };
        let x = random(rng, dtype, &shape);
        let xf = x.to_f64();
        let means = xf.mean_axis(Axis(1)).expect("non-empty");
        let want = vec![ArrayD::from_shape_fn(IxDyn(&shape), |ix| means[ix[0]])];
        let call = PallasCall::new(kernel).grid([1]).in_specs([spec(shape)]).out_specs([spec(shape)]).out_shapes([shape]);
        out.push(Case { name: format!("mean {dtype}"), call, inputs: vec![x], want, dtype });
    }
    let x = random(rng, DType::F32, &shape);
    let bits: Vec<f64> = x.to_f64().iter().map(|&v| f64::from((v as f32).to_bits() >> 23)).collect();
    let call = PallasCall::new(float_bits::kernel()).grid([1]).in_specs([spec(shape)]).out_specs([spec(shape)]).out_shapes([shape]);
    out.push(Case { name: "bitcast f32 to i32".into(), call, inputs: vec![x], want: vec![ArrayD::from_shape_vec(IxDyn(&shape), bits).expect("shape")], dtype: DType::I32 });
    let ints = ArrayD::from_shape_simple_fn(IxDyn(&shape), || rng.random_range(0x3f00_0000..0x4100_0000));
    let want = vec![ints.mapv(|b: i32| f64::from(f32::from_bits(b as u32)))];
    let call = PallasCall::new(from_bits::kernel()).grid([1]).in_specs([spec(shape)]).out_specs([spec(shape)]).out_shapes([shape]);
    out.push(Case { name: "bitcast i32 to f32".into(), call, inputs: vec![HostArray::from(ints)], want, dtype: DType::F32 });
    out
}

#[test]
fn constructs_match_their_references_on_both_cpu_backends_and_compile_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let seed: u64 = std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    for case in cases(&mut rng) {
        let types: Vec<ValueType> = case.inputs.iter().map(HostArray::value_type).collect();
        let traced = match case.call.trace(&types) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let tol = torchtpu_dsl::accuracy::tolerance(case.dtype);
        let interpreted = case.call.interpret_checked(&case.inputs).map_err(|e| e.to_string());
        let cpu = Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&case.inputs)).map_err(|e| e.to_string());
        for (backend, out) in [("interpreter", interpreted), ("PJRT CPU", cpu)] {
            match out {
                Ok(o) => {
                    let err = torchtpu_dsl::accuracy::relative_error(&o[0], &case.want[0]);
                    if err > tol {
                        failures.push(format!("{} on the {backend}: error {err:e} > {tol:e}", case.name));
                    }
                }
                Err(e) => failures.push(format!("{} on the {backend}: {e}", case.name)),
            }
        }
        match lower(&traced, Target::TpuStableHlo) {
            Ok(module) => {
                for chip in Chip::ALL {
                    if let Err(e) = compiler.compile(chip, &module) {
                        failures.push(format!("{} for {chip}: {}", case.name, e.message));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: lower() refuses it: {e}", case.name)),
        }
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// A strided roll against its reference on both CPU backends, with what Mosaic makes of it.
fn strided_case(
    kernel: torchtpu_dsl::KernelDef,
    dtype: DType,
    programs: usize,
    want: impl Fn(&ArrayD<f64>, i64) -> ArrayD<f64>,
    rng: &mut StdRng,
) -> (torchtpu_dsl::TracedCall, String) {
    let shape = [16, 256];
    let call = PallasCall::new(kernel).grid([programs]).in_specs([spec(shape)]).out_specs([BlockSpec::new(shape, |[i]| (i, 0))]).out_shapes([[shape[0] * programs, shape[1]]]);
    let x = random(rng, dtype, &shape);
    let xf = x.to_f64();
    let parts: Vec<ArrayD<f64>> = (0..programs as i64).map(|i| want(&xf, i)).collect();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let want = ndarray::concatenate(Axis(0), &views).expect("same shapes");
    let traced = call.trace(&[x.value_type()]).expect("traces");
    let inputs = [x];
    let outs = [call.interpret_checked(&inputs).expect("interprets"), Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&inputs)).expect("runs on PJRT CPU")];
    let name = format!("{} {dtype}", traced.kernel.name());
    for out in outs {
        assert_eq!(out[0].to_f64(), want, "{name}");
    }
    (traced, name)
}

#[test]
fn strided_rolls_match_pallas_on_both_cpu_backends_and_mosaic_takes_what_libtpu_compiles() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let mut rng = StdRng::seed_from_u64(7);
    // Along the lanes, striding over the sublanes: libtpu compiles it for every chip but v4
    // (which has no lane-strided rotate), while shift + stride * (rows - 1) stays below a vreg's
    // 128 lanes (beyond, libtpu: "the max shift in a vreg is larger than the vreg's width").
    for (shift, stride) in [(0, 1u32), (5, 3), (90, 2)] {
        for dtype in [DType::F32, DType::BF16, DType::I32] {
            let kernel = match dtype {
                DType::BF16 => roll_strided::kernel::<bf16>(shift, 1, stride, 0),
                DType::I32 => roll_strided::kernel::<i32>(shift, 1, stride, 0),
                _ => roll_strided::kernel::<f32>(shift, 1, stride, 0),
            };
            let (traced, name) = strided_case(kernel, dtype, 1, |x, _| np_roll_strided(x, i64::from(shift), 1, i64::from(stride), 0), &mut rng);
            let module = lower(&traced, Target::TpuStableHlo).unwrap_or_else(|e| panic!("{name}: {e}"));
            for chip in Chip::ALL {
                let compiled = compiler.compile(chip, &module);
                assert_eq!(compiled.is_ok(), chip != Chip::V4, "{name} by {shift} stride {stride} on {chip}: {:?}", compiled.err().map(|e| e.message));
            }
        }
    }
    // Striding over the lanes, or by a traced shift: Mosaic has neither, and lower() says so.
    let (step, offset) = (37, -60);
    for axis in [0, 1] {
        let (traced, name) = strided_case(
            roll_strided_traced::kernel(step, offset, axis, 3, 1 - axis),
            DType::F32,
            3,
            |x, i| np_roll_strided(x, i * i64::from(step) + i64::from(offset), axis, 3, 1 - axis),
            &mut rng,
        );
        let err = lower(&traced, Target::TpuStableHlo).expect_err("Mosaic refuses it").to_string();
        let why = if axis == 0 { "along the last axis" } else { "by a traced shift" };
        assert!(err.contains(why) && err.contains("constructs.rs"), "{name}: {err}");
    }
}

/// Each element's little-endian bytes, row-major.
fn le_bytes(a: &HostArray) -> Vec<Vec<u8>> {
    match a {
        HostArray::F32(x) => x.iter().map(|v| v.to_le_bytes().to_vec()).collect(),
        HostArray::BF16(x) => x.iter().map(|v| v.to_le_bytes().to_vec()).collect(),
        HostArray::F16(x) => x.iter().map(|v| v.to_le_bytes().to_vec()).collect(),
        HostArray::I32(x) => x.iter().map(|v| v.to_le_bytes().to_vec()).collect(),
        HostArray::I8(x) => x.iter().map(|v| v.to_le_bytes().to_vec()).collect(),
        HostArray::Bool(x) => x.iter().map(|&v| vec![u8::from(v)]).collect(),
    }
}

/// What `pltpu.bitcast` gives, in bytes: the memory of `p` consecutive narrow rows is one wide
/// row (the first in the lowest bytes), and one wide row's memory is `p` narrow rows.
fn bitcast_bytes(x: &[Vec<u8>], shape: [usize; 2], from: usize, to: usize) -> Vec<Vec<u8>> {
    let [m, n] = shape;
    if from < to {
        let p = to / from;
        (0..m / p * n).map(|e| (0..p).flat_map(|k| x[((e / n) * p + k) * n + e % n].clone()).collect()).collect()
    } else {
        let p = from / to;
        (0..m * p * n).map(|e| x[(e / n / p) * n + e % n][(e / n % p) * to..(e / n % p + 1) * to].to_vec()).collect()
    }
}

/// Finite values of every magnitude a dtype holds, zeros of both signs among them.
fn finite(rng: &mut StdRng, dtype: DType, shape: [usize; 2]) -> HostArray {
    let a = ArrayD::from_shape_simple_fn(IxDyn(&shape), || match rng.random_range(0..8) {
        0 => 0.0,
        1 => -0.0,
        _ if dtype == DType::I8 => f64::from(rng.random_range(-128..128)),
        _ if dtype == DType::I32 => f64::from(rng.random::<i32>()),
        _ => rng.random_range(-1.5..1.5) * 2f64.powi(rng.random_range(-20..20)),
    });
    HostArray::from_f64(dtype, &a)
}

#[test]
fn bitcasts_between_widths_pack_rows_as_pallas_on_both_cpu_backends() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let mut rng = StdRng::seed_from_u64(11);
    let (mut failures, mut refused) = (Vec::new(), Vec::new());
    let pairs = [
        (DType::BF16, DType::I32),
        (DType::I32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::BF16),
        (DType::I8, DType::I32),
        (DType::I32, DType::I8),
        (DType::BF16, DType::I8),
        (DType::I8, DType::BF16),
    ];
    for (from, to) in pairs {
        let shape = [32, 128];
        let out_shape = [32 * from.size_bytes() / to.size_bytes(), 128];
        let kernel = match (from, to) {
            (DType::BF16, DType::I32) => bitcast_rows::kernel::<bf16, i32>(),
            (DType::I32, DType::BF16) => bitcast_rows::kernel::<i32, bf16>(),
            (DType::BF16, DType::F32) => bitcast_rows::kernel::<bf16, f32>(),
            (DType::F32, DType::BF16) => bitcast_rows::kernel::<f32, bf16>(),
            (DType::I8, DType::I32) => bitcast_rows::kernel::<i8, i32>(),
            (DType::I32, DType::I8) => bitcast_rows::kernel::<i32, i8>(),
            (DType::BF16, DType::I8) => bitcast_rows::kernel::<bf16, i8>(),
            _ => bitcast_rows::kernel::<i8, bf16>(),
        };
        let call = PallasCall::new(kernel).grid([1]).in_specs([spec(shape)]).out_specs([spec(out_shape)]).out_shapes([out_shape]);
        let x = finite(&mut rng, from, shape);
        let want = bitcast_bytes(&le_bytes(&x), shape, from.size_bytes(), to.size_bytes());
        let traced = call.trace(&[x.value_type()]).expect("traces");
        let inputs = [x];
        let outs = [
            ("interpreter", call.interpret_checked(&inputs).map_err(|e| e.to_string())),
            ("PJRT CPU", Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&inputs)).map_err(|e| e.to_string())),
        ];
        for (backend, out) in outs {
            match out {
                Ok(o) if le_bytes(&o[0]) == want => {}
                Ok(_) => failures.push(format!("{from} to {to} on the {backend}: bits differ")),
                Err(e) => failures.push(format!("{from} to {to} on the {backend}: {e}")),
            }
        }
        let module = lower(&traced, Target::TpuStableHlo).unwrap_or_else(|e| panic!("{from} to {to}: {e}"));
        for chip in Chip::ALL {
            if let Err(e) = compiler.compile(chip, &module) {
                refused.push(format!("{from} to {to} on {chip}: {}", e.message.lines().next().unwrap_or_default()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(refused.is_empty(), "libtpu refuses:\n{}", refused.join("\n"));
}

#[test]
fn a_bitcast_whose_rows_do_not_pack_is_a_trace_error() {
    let call = PallasCall::new(bitcast_rows::kernel::<bf16, i32>()).grid([1]).in_specs([spec([15, 128])]).out_specs([spec([8, 128])]).out_shapes([[8, 128]]);
    let err = call.trace(&[ValueType::new(DType::BF16, [15, 128])]).expect_err("15 bf16 rows are 7.5 i32 rows").to_string();
    assert!(err.contains("15 rows of 16 bits") && err.contains("multiple of 2 rows") && err.contains("constructs.rs"), "{err}");
}

fn lanes_at_call(promise: bool) -> PallasCall {
    PallasCall::new(lanes_at::kernel(promise)).grid([3]).in_specs([spec([8, 512])]).out_specs([BlockSpec::new([8, 128], |[i]| (0, i))]).out_shapes([[8, 384]])
}

#[test]
fn multiple_of_lets_a_tpu_address_lanes_at_offsets_read_from_memory() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let offsets = HostArray::from(ndarray::arr1(&[256, 0, 384]).into_dyn());
    let x = HostArray::from_f64(DType::F32, &ArrayD::from_shape_fn(IxDyn(&[8, 512]), |ix| (ix[0] * 1000 + ix[1]) as f64));
    let types = [offsets.value_type(), x.value_type()];
    let want = ArrayD::from_shape_fn(IxDyn(&[8, 384]), |ix| (ix[0] * 1000 + [256, 0, 384][ix[1] / 128] + ix[1] % 128) as f64);
    for promise in [false, true] {
        let call = lanes_at_call(promise);
        let traced = call.trace(&types).expect("traces");
        let ours = lower(&traced, Target::TpuStableHlo);
        assert_eq!(ours.is_ok(), promise, "promise {promise}: {:?}", ours.err().map(|e| e.to_string()));
        if let Ok(module) = ours {
            for chip in Chip::ALL {
                assert!(compiler.compile(chip, &module).is_ok(), "{chip}");
            }
        }
        let inputs = [offsets.clone(), x.clone()];
        for out in [call.interpret(&inputs).expect("interprets"), Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&inputs)).expect("runs on PJRT CPU")] {
            assert_eq!(out[0].to_f64(), want);
        }
    }
    // A broken promise is the interpreter's error, at the kernel's line.
    let bad = [HostArray::from(ndarray::arr1(&[256, 64, 384]).into_dyn()), x];
    let err = lanes_at_call(true).interpret(&bad).expect_err("64 is not a multiple of 128").to_string();
    assert!(err.contains("multiple of 128") && err.contains("value is 64") && err.contains("constructs.rs"), "{err}");
}

#[tpu_kernel]
fn row_extrema(x: &Ref<f32>, y: &mut Ref<f32>) {
    let t = x.load();
    y.store_at((.., 0..128), t.max_keepdims(1).broadcast_to([8, 128]));
    y.store_at((.., 128..256), t.min_keepdims(1).broadcast_to([8, 128]));
}

#[test]
fn max_and_min_reductions_propagate_nan_on_both_cpu_backends() {
    let x = ArrayD::from_shape_fn(IxDyn(&[8, 128]), |ix| if ix[1] == ix[0] * 7 && ix[0] % 2 == 1 { f64::NAN } else { (ix[0] * 128 + ix[1]) as f64 });
    let x = HostArray::from_f64(DType::F32, &x);
    let call = PallasCall::new(row_extrema::kernel()).grid([1]).in_specs([spec([8, 128])]).out_specs([spec([8, 256])]).out_shapes([[8, 256]]);
    let traced = call.trace(&[x.value_type()]).expect("traces");
    let outs = [call.interpret(std::slice::from_ref(&x)).expect("interprets"), Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(std::slice::from_ref(&x))).expect("runs")];
    for (backend, out) in ["interpreter", "PJRT CPU"].iter().zip(&outs) {
        let out = out[0].to_f64();
        for r in 0..8 {
            let (max, min) = (out[[r, 0]], out[[r, 128]]);
            if r % 2 == 1 {
                assert!(max.is_nan() && min.is_nan(), "{backend} row {r}: max {max}, min {min}");
            } else {
                assert_eq!((max, min), ((r * 128 + 127) as f64, (r * 128) as f64), "{backend} row {r}");
            }
        }
    }
}

/// Program `p` sums the first `chunks[p]` 128-lane chunks of its rows, one traced `while`
/// iteration per chunk, and counts the halvings of `chunks[p]` down to 1 in another.
#[tpu_kernel]
fn ragged_sum(chunks: &Prefetch<i32>, x: &Ref<f32>, y: &mut Ref<f32>) {
    let n = chunks.get([program_id(0)]);
    let mut i = Scalar::<i32>::constant(0);
    let mut acc = Tile::<f32>::full([8, 128], 0.0);
    while i < n {
        acc = acc + x.load_at((.., ds(i * 128, 128)));
        i = i + 1;
    }
    let mut m = n;
    let mut halvings = Scalar::<i32>::constant(0);
    while m > 1 {
        m = m / 2;
        halvings = halvings + 1;
    }
    y.store_at((.., 0..128), acc);
    y.store_at((.., 128..256), Tile::<f32>::full([8, 128], 0.0) + halvings.cast::<f32>());
}

#[test]
fn a_traced_while_runs_as_many_times_as_its_condition_holds_on_every_backend() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"));
    let chunks = [0, 1, 3, 4, 7];
    let x = ArrayD::from_shape_fn(IxDyn(&[8, 1024]), |ix| ((ix[0] * 7 + ix[1] * 13) % 17) as f64 - 8.0);
    let inputs = [HostArray::from(ndarray::arr1(&chunks).into_dyn()), HostArray::from_f64(DType::F32, &x)];
    let call = PallasCall::new(ragged_sum::kernel())
        .grid([chunks.len()])
        .in_specs([spec([8, 1024])])
        .out_specs([BlockSpec::new([8, 256], |[p]| (0, p))])
        .out_shapes([[8, 256 * chunks.len()]]);
    let want = ArrayD::from_shape_fn(IxDyn(&[8, 256 * chunks.len()]), |ix| {
        let (p, lane) = (ix[1] / 256, ix[1] % 256);
        let n = chunks[p] as usize;
        if lane < 128 {
            (0..n).map(|c| x[[ix[0], c * 128 + lane]]).sum()
        } else {
            f64::from((n.max(1) as f64).log2().floor() as i32)
        }
    });
    let traced = call.trace(&inputs.iter().map(HostArray::value_type).collect::<Vec<_>>()).expect("traces");
    for (backend, out) in [
        ("interpreter", call.interpret_checked(&inputs)),
        (
            "PJRT CPU",
            Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(&inputs)).map_err(|e| torchtpu_dsl::Error::Input { kernel: "ragged_sum".into(), message: e.to_string() }),
        ),
    ] {
        assert_eq!(out.unwrap_or_else(|e| panic!("{backend}: {e}"))[0].to_f64(), want, "{backend}");
    }
    for form in [torchtpu_codegen::Form::Stable, torchtpu_codegen::Form::Pretty] {
        let module = torchtpu_codegen::stablehlo::tpu_custom_call(&traced, form).expect("lowers");
        for chip in Chip::ALL {
            if let Err(e) = compiler.compile(chip, &module) {
                panic!("{chip} {form:?}: {}", e.message);
            }
        }
    }
}

#[tpu_kernel]
fn row_sums(x: &Ref<f32>, y: &mut Ref<f32>) {
    y.store(x.load().sum_keepdims(1).broadcast_to([8, 128]));
}

/// Portable StableHLO sums long f32 rows as a product with ones (XLA CPU's reduction loop is
/// slower): NaN, infinities and overflow come out as a reduction's do, on both CPU backends,
/// and a row of -0.0 sums to zero.
#[test]
fn long_row_sums_keep_a_reductions_special_values_on_both_cpu_backends() {
    let lanes = 512;
    let special = |r: usize, c: usize| match (r, c) {
        (1, 17) => Some(f64::NAN),
        (2, 3) => Some(f64::INFINITY),
        (3, 5) => Some(f64::NEG_INFINITY),
        (4, 0) => Some(f64::INFINITY),
        (4, 511) => Some(f64::NEG_INFINITY),
        (5, _) => Some(3.0e38),
        (6, _) => Some(-0.0),
        _ => None,
    };
    let x = ArrayD::from_shape_fn(IxDyn(&[8, lanes]), |ix| special(ix[0], ix[1]).unwrap_or(((ix[0] * 31 + ix[1] * 7) % 97) as f64 / 8.0 - 6.0));
    let x = HostArray::from_f64(DType::F32, &x);
    let call = PallasCall::new(row_sums::kernel()).grid([1]).in_specs([spec([8, lanes])]).out_specs([spec([8, 128])]).out_shapes([[8, 128]]);
    let traced = call.trace(&[x.value_type()]).expect("traces");
    let outs = [call.interpret(std::slice::from_ref(&x)).expect("interprets"), Compiled::new(&traced, Backend::Cpu).and_then(|c| c.run(std::slice::from_ref(&x))).expect("runs")];
    let exact = x.to_f64().sum_axis(Axis(1));
    for (backend, out) in ["interpreter", "PJRT CPU"].iter().zip(&outs) {
        let out = out[0].to_f64();
        for r in 0..8 {
            let got = out[[r, 0]];
            match r {
                1 | 4 => assert!(got.is_nan(), "{backend} row {r}: {got}"),
                2 | 5 => assert_eq!(got, f64::INFINITY, "{backend} row {r}"),
                3 => assert_eq!(got, f64::NEG_INFINITY, "{backend} row {r}"),
                // Zero; its sign is not compared (`==` takes -0.0 for 0.0).
                6 => assert_eq!(got, 0.0, "{backend} row {r}"),
                _ => assert!((got - exact[r]).abs() <= 1e-5 * exact[r].abs().max(1.0), "{backend} row {r}: {got} against {}", exact[r]),
            }
        }
    }
}
