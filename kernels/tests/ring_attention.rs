//! Ring attention's SPMD programs compile with libtpu for multi-chip slices of every
//! generation, forward and backward, causal and not, each device with its share of the
//! flops, and their portable form on a
//! multi-device PJRT CPU client equals unsharded attention.

use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use torchtpu_codegen::cost::estimate;
use torchtpu_codegen::{Mesh, PartitionSpec};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::PallasCall;
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::spmd::run_sharded;
use torchtpu_kernels::flash::{backward_calls, backward_operand_types, forward_call, forward_operand_types, reference, reference_backward, AttentionOptions, AttentionShape};
use torchtpu_kernels::ring_attention::{zigzag_order, Ring, RingLayout};
use torchtpu_kernels::tables::TableTarget;
use torchtpu_runtime::{Slice, TpuCompiler};

fn compiler() -> &'static TpuCompiler {
    TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required for these tests (run scripts/setup.sh): {e}"))
}

#[test]
fn ring_attention_compiles_for_every_slice_forward_and_backward() {
    let compiler = compiler();
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 2, q_len: 2048, kv_len: 2048, head_dim: 128 };
    for slice in Slice::multi_chip_examples() {
        let devices = compiler.devices(&slice).expect("devices");
        // The ring over every device; and a ring of half of them, the heads split over the other two.
        let ring_only = Mesh::new([("seq", devices)]).expect("mesh");
        let with_heads = Mesh::new([("model", 2), ("seq", devices / 2)]).expect("mesh");
        let variants = [
            (&ring_only, None, false, RingLayout::Contiguous),
            (&ring_only, None, true, RingLayout::Contiguous),
            (&ring_only, None, true, RingLayout::Zigzag),
            (&with_heads, Some("model"), false, RingLayout::Contiguous),
        ];
        for (mesh, heads_axis, causal, layout) in variants {
            let ring = Ring { mesh, axis: "seq", shape, dtype: DType::BF16, opts: AttentionOptions { causal, ..Default::default() }, layout, batch_axis: None, heads_axis };
            let target = TableTarget::Chip(slice.chip);
            // The unsharded kernels' flops (their cost estimate, which libtpu's cost analysis
            // reports for a `tpu_custom_call`), for attention without a mask: each device then
            // attends its queries to every key once, a 1/n share (within the blocks' rounding),
            // plus the merges' few flops per element.
            let whole = |pass: &str| {
                let flops = |call: PallasCall, types: Vec<ValueType>| estimate(&call.trace(&types).expect("traces")).flops as f64;
                let opts = AttentionOptions::default();
                if pass == "forward" {
                    flops(forward_call(shape, DType::BF16, opts, false).expect("call"), forward_operand_types(shape, DType::BF16, false))
                } else {
                    let (dkv, dq) = backward_calls(shape, DType::BF16, opts, false).expect("calls");
                    let types = backward_operand_types(shape, DType::BF16, false);
                    flops(dkv, types.clone()) + flops(dq, types)
                }
            };
            let (f, b) = (ring.forward(target), ring.backward(target));
            for (pass, module) in [("forward", f), ("backward", b)] {
                let module = module.unwrap_or_else(|e| panic!("{slice} {pass}: {e}"));
                let compiled =
                    compiler.compile_spmd(&slice, module.partitions(), &module.text).unwrap_or_else(|e| panic!("{slice} mesh {mesh} causal={causal} {layout:?} {pass}: {e}"));
                if !causal {
                    let (got, share) = (compiled.cost("flops").expect("flops"), whole(pass) / devices as f64);
                    assert!(got >= 0.99 * share && got <= 1.05 * share, "{slice} mesh {mesh} {pass}: {got:.4e} flops per device, the unsharded / {devices} = {share:.4e}");
                }
            }
        }
    }
}

fn normal(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_fn(shape.to_vec(), |_| StandardNormal.sample(rng))
}

fn max_error(got: &HostArray, want: &ArrayD<f64>) -> f64 {
    let got = got.to_f64();
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().filter(|x| x.is_finite()).fold(1.0f64, |m, x| m.max(x.abs()));
    // Equal infinities (a log-sum-exp of no keys) agree; a NaN, or a finite value against an
    // infinite one, is an infinite error.
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g == w {
                0.0
            } else if (g - w).is_finite() {
                (g - w).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
        / scale
}

/// `x` (`[b, h, seq, d]`) with its sequence in `order`: row `i` is `x`'s row `order[i]`.
fn reorder(x: &ArrayD<f64>, order: &[usize]) -> ArrayD<f64> {
    x.select(ndarray::Axis(2), order)
}

/// The sharded programs' portable form on a PJRT CPU client with a device per ring position
/// equals unsharded attention computed in f64: over 2 and 4 devices, causal (contiguous and
/// zigzag layouts) and not, with grouped kv heads, forward (output and log-sum-exp) and
/// backward (dq, dk, dv); on `mesh`, whose `seq` axis is the ring and whose `data` and
/// `model` axes (if any) split the batch and the heads.
fn ring_attention_on_cpu_devices_matches_unsharded_attention(mesh: &str, cases: &[(bool, RingLayout)]) {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = AttentionShape { batch: 2, heads: 4, kv_heads: 2, q_len: 256, kv_len: 256, head_dim: 128 };
    let (q_shape, kv_shape) = ([2, 4, 256, 128], [2, 2, 256, 128]);
    let (q, k, v, d_o) = (normal(&mut rng, &q_shape), normal(&mut rng, &kv_shape), normal(&mut rng, &kv_shape), normal(&mut rng, &q_shape));
    let host = |a: &ArrayD<f64>| HostArray::from_f64(DType::F32, a);
    let scale = 1.0 / (shape.head_dim as f64).sqrt();
    let mesh: Mesh = mesh.parse().expect("mesh");
    let named = |axis: &'static str| mesh.size(axis).is_ok().then_some(axis);
    let (batch_axis, heads_axis) = (named("data"), named("model"));
    let spec = PartitionSpec::new([batch_axis, heads_axis, Some("seq"), None]);
    let devices = mesh.size("seq").expect("a seq axis");
    for &(causal, layout) in cases {
        let what = format!("mesh {mesh}, causal={causal}, {layout:?}, seed {seed}");
        let order: Vec<usize> = if layout == RingLayout::Zigzag { zigzag_order(256, devices as usize).expect("divides") } else { (0..256).collect() };
        let laid = |x: &ArrayD<f64>| reorder(x, &order);
        let ring = Ring { mesh: &mesh, axis: "seq", shape, dtype: DType::F32, opts: AttentionOptions { causal, ..Default::default() }, layout, batch_axis, heads_axis };
        let (o_want, lse_want) = reference(&q, &k, &v, None, causal, scale);
        let forward = ring.forward(TableTarget::Cpu).expect("lowers");
        let inputs = [host(&laid(&q)), host(&laid(&k)), host(&laid(&v))];
        let specs = [(ValueType::new(DType::F32, q_shape), spec.clone()), (ValueType::new(DType::F32, [2, 4, 256, 1]), spec.clone())];
        let out = run_sharded(&forward, &inputs.iter().map(|a| (a, &spec)).collect::<Vec<_>>(), &specs).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(max_error(&out[0], &laid(&o_want.into_dyn())) < 1e-4, "{what}: o");
        let lse_want = lse_want.insert_axis(ndarray::Axis(3)).into_dyn();
        assert!(max_error(&out[1], &laid(&lse_want)) < 1e-4, "{what}: lse");

        let (dq, dk, dv) = reference_backward(&q, &k, &v, &d_o, None, causal, scale);
        let backward = ring.backward(TableTarget::Cpu).expect("lowers");
        let inputs = [inputs[0].clone(), inputs[1].clone(), inputs[2].clone(), out[0].clone(), host(&laid(&d_o)), out[1].clone()];
        let grads =
            [(ValueType::new(DType::F32, q_shape), spec.clone()), (ValueType::new(DType::F32, kv_shape), spec.clone()), (ValueType::new(DType::F32, kv_shape), spec.clone())];
        let got = run_sharded(&backward, &inputs.iter().map(|a| (a, &spec)).collect::<Vec<_>>(), &grads).unwrap_or_else(|e| panic!("{what}: {e}"));
        for (name, g, want) in [("dq", &got[0], dq), ("dk", &got[1], dk), ("dv", &got[2], dv)] {
            let err = max_error(g, &laid(&want.into_dyn()));
            assert!(err < 1e-4, "{what}: {name} off by {err:.2e}");
        }
    }
}

#[test]
fn ring_attention_on_2_cpu_devices_matches_unsharded_attention() {
    ring_attention_on_cpu_devices_matches_unsharded_attention("seq=2", &[(false, RingLayout::Contiguous), (true, RingLayout::Zigzag)]);
}

#[test]
fn ring_attention_on_4_cpu_devices_matches_unsharded_attention() {
    ring_attention_on_cpu_devices_matches_unsharded_attention("seq=4", &[(false, RingLayout::Contiguous), (true, RingLayout::Contiguous), (true, RingLayout::Zigzag)]);
}

/// The ring inside a bigger mesh: 8 CPU devices, the batch over `data`, the heads (whole GQA
/// groups) over `model`, a ring of 2 along `seq`.
#[test]
fn ring_attention_with_batch_and_heads_split_too_matches_unsharded_attention() {
    ring_attention_on_cpu_devices_matches_unsharded_attention("data=2,model=2,seq=2", &[(true, RingLayout::Zigzag)]);
}

#[test]
fn zigzag_order_gives_each_device_a_chunk_from_each_end() {
    assert_eq!(zigzag_order(8, 2).expect("divides"), [0, 1, 6, 7, 2, 3, 4, 5]);
    assert_eq!(zigzag_order(4, 2).expect("divides"), [0, 3, 1, 2]);
    assert!(zigzag_order(6, 2).unwrap_err().to_string().contains("divisible by 4; got 6"));
    assert!(zigzag_order(8, 0).is_err());
}

#[test]
fn rings_that_do_not_fit_their_mesh_are_errors() {
    let mesh: Mesh = "model=2,seq=4".parse().expect("mesh");
    let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 2, q_len: 64, kv_len: 64, head_dim: 128 };
    let ring = |shape, causal, layout, heads_axis, axis| Ring {
        mesh: &mesh,
        axis,
        shape,
        dtype: DType::F32,
        opts: AttentionOptions { causal, ..Default::default() },
        layout,
        batch_axis: None,
        heads_axis,
    };
    let cases = [
        (ring(AttentionShape { q_len: 62, kv_len: 62, ..shape }, false, RingLayout::Contiguous, None, "seq"), "divisible by 4; got 62 and 62"),
        (ring(AttentionShape { q_len: 36, kv_len: 36, ..shape }, true, RingLayout::Zigzag, None, "seq"), "divisible by 8; got 36 and 36"),
        (ring(AttentionShape { kv_len: 32, ..shape }, true, RingLayout::Contiguous, None, "seq"), "one length"),
        (ring(AttentionShape { kv_heads: 1, heads: 2, ..shape }, false, RingLayout::Contiguous, Some("model"), "seq"), "whole GQA groups"),
        (ring(shape, false, RingLayout::Contiguous, None, "ring"), "no mesh axis `ring`"),
        (ring(AttentionShape { q_len: 0, ..shape }, false, RingLayout::Contiguous, None, "seq"), "non-empty"),
        (ring(shape, false, RingLayout::Contiguous, Some("seq"), "seq"), "twice"),
        (ring(shape, false, RingLayout::Contiguous, Some("experts"), "seq"), "no mesh axis `experts`"),
    ];
    for (ring, why) in cases {
        let err = ring.forward(TableTarget::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(why), "{why}: {err}");
    }
    let odd_batch = Ring { batch_axis: Some("model"), ..ring(AttentionShape { batch: 3, ..shape }, false, RingLayout::Contiguous, None, "seq") };
    let err = odd_batch.backward(TableTarget::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("a batch of 3 does not split evenly over the 2 devices of axis `model`"), "{err}");
}
