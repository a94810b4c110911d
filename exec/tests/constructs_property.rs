//! Tile constructs at drawn shapes, shifts, windows and axes (valid or not): a trace error
//! exactly when the request is invalid, else the independent reference on the interpreter and
//! on PJRT CPU; never a panic.

use ndarray::{ArrayD, Axis, IxDyn};
use proptest::prelude::*;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_exec::{Backend, Compiled};

/// What a kernel does to its input tile.
#[derive(Clone, Debug)]
enum Construct {
    Roll {
        shift: i32,
        axis: usize,
    },
    Slice {
        start: [usize; 2],
        shape: [usize; 2],
    },
    /// Joined with itself (cut to `cols` columns when along 1) along `axis`.
    Concat {
        axis: usize,
        cols: usize,
    },
    Transpose,
}

#[tpu_kernel]
fn apply<T: Element>(x: &Ref<T>, y: &mut Ref<T>, c: Construct) {
    let t = x.load();
    y.store(match c {
        Construct::Roll { shift, axis } => t.roll(shift, axis),
        Construct::Slice { start, shape } => t.slice(start, shape),
        Construct::Concat { axis, cols } => concatenate(&[t, t.slice([0, 0], [t.shape()[0], cols.min(t.shape()[1])])], axis),
        Construct::Transpose => t.transpose([1, 0]),
    });
}

/// The output shape and values, or `None` where the construct is invalid for `shape`.
fn reference(c: &Construct, x: &ArrayD<f64>) -> Option<ArrayD<f64>> {
    let (r, k) = (x.shape()[0], x.shape()[1]);
    match *c {
        Construct::Roll { shift, axis } if axis < 2 => {
            let n = x.shape()[axis] as i64;
            Some(ArrayD::from_shape_fn(x.raw_dim(), |ix| {
                let mut src = ix.clone();
                src[axis] = (ix[axis] as i64 - i64::from(shift)).rem_euclid(n) as usize;
                x[src]
            }))
        }
        Construct::Slice { start, shape } if start[0] + shape[0] <= r && start[1] + shape[1] <= k && shape[0] > 0 && shape[1] > 0 => {
            Some(ArrayD::from_shape_fn(IxDyn(&shape), |ix| x[[start[0] + ix[0], start[1] + ix[1]]]))
        }
        Construct::Concat { axis, cols } if axis < 2 && cols > 0 => {
            let part = x.slice_axis(Axis(1), (0..cols.min(k)).into()).to_owned();
            if axis == 0 && part.shape()[1] != k {
                return None;
            }
            ndarray::concatenate(Axis(axis), &[x.view(), part.view()]).ok()
        }
        Construct::Transpose => Some(x.t().as_standard_layout().into_owned()),
        _ => None,
    }
}

fn construct() -> impl Strategy<Value = Construct> {
    prop_oneof![
        (any::<i32>(), 0usize..3).prop_map(|(shift, axis)| Construct::Roll { shift, axis }),
        (-300i32..300, 0usize..2).prop_map(|(shift, axis)| Construct::Roll { shift, axis }),
        ([0usize..20, 0usize..300], [0usize..20, 0usize..300]).prop_map(|(start, shape)| Construct::Slice { start, shape }),
        (0usize..3, 0usize..300).prop_map(|(axis, cols)| Construct::Concat { axis, cols }),
        Just(Construct::Transpose),
    ]
}

fn run(dtype: DType, shape: [usize; 2], c: Construct, seed: u64) -> Result<(), TestCaseError> {
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |ix| ((ix[0] * 131 + ix[1] * 7 + seed as usize) % 251) as f64 - 125.0);
    let input = HostArray::from_f64(dtype, &x);
    let want = reference(&c, &input.to_f64());
    let out_shape = want.as_ref().map_or(shape.to_vec(), |w| w.shape().to_vec());
    let kernel = match dtype {
        DType::BF16 => apply::kernel::<bf16>(c.clone()),
        DType::I32 => apply::kernel::<i32>(c.clone()),
        _ => apply::kernel::<f32>(c.clone()),
    };
    let call = PallasCall::new(kernel).grid([1]).in_specs([BlockSpec::whole()]).out_specs([BlockSpec::whole()]).out_shapes([out_shape]);
    let traced = call.trace(&[ValueType::new(dtype, shape)]);
    let Some(want) = want else {
        prop_assert!(traced.is_err(), "{c:?} on {shape:?} is invalid but traced");
        return Ok(());
    };
    let traced = traced.map_err(|e| TestCaseError::fail(format!("{c:?} on {shape:?}: {e}")))?;
    let interpreted = call.interpret(std::slice::from_ref(&input)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&interpreted[0].to_f64(), &want, "interpreter: {:?} on {:?}", c, shape);
    let cpu = Compiled::new(&traced, Backend::Cpu).and_then(|k| k.run(std::slice::from_ref(&input))).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&cpu[0].to_f64(), &want, "PJRT CPU: {:?} on {:?}", c, shape);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn constructs_agree_with_their_references_or_refuse(dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::I32)], rows in 1usize..20, cols in 1usize..300, c in construct(), seed in any::<u64>()) {
        run(dtype, [rows, cols], c, seed)?;
    }
}
