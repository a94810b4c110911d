//! The op layer: what a kernel implements once ([`Op`]), and everything written once for every
//! op on top of it — the config a call uses (the tuning cache, then the tuned table, then the
//! op's heuristic), the tuner adapter ([`Tuning`]), and the compiled, TPU-module and host
//! runs. tokamax's `Op` (config: explicit → tuned → autotune cache → heuristic) and CubeCL's
//! `TunableSet` are the models.

use std::fmt::Debug;

use ndarray::ArrayD;
use rand::rngs::StdRng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use torchtpu_autotune::{Config, SearchSpace, Tunable};
use torchtpu_codegen::{lower_tpu, TpuModule};
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, PallasCall, ParamKind, TracedCall};
use torchtpu_exec::{Backend, Compiled};
use torchtpu_runtime::Chip;

use crate::tables::{self, TableTarget};
use crate::Error;

/// One kernel, described once; reached from Rust, the CLI, the tuner, the tables and PyTorch.
///
/// A problem is the typed, serializable description of one call's shapes, dtype and flags; a
/// config is the typed, serializable choice of its tunables (block sizes), whose fields are
/// the [`space`](Op::space)'s parameters.
pub trait Op: Clone + Send + Sync + 'static {
    type Problem: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    type Config: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The op's name: its key in the tuned tables, the tuning cache, the registry and the CLI.
    fn name(&self) -> &'static str;
    /// A representative problem: the CLI's defaults, which `--set` overrides field by field.
    fn example(&self) -> Self::Problem;
    /// Whether this op can run `p`: the error a user sees for a problem it cannot.
    fn check(&self, p: &Self::Problem) -> Result<(), Error>;
    /// `p` as tuning sees it: fields that cannot change which config is fastest (a scale
    /// factor) reset, so that one tuning result serves every value of them.
    fn tuning_problem(&self, p: &Self::Problem) -> Self::Problem {
        p.clone()
    }
    /// The shape bucket `p` falls in: its key in the tuned tables.
    fn bucket(&self, p: &Self::Problem) -> String;
    /// The configs worth trying for `p`; parameter names are the config's field names.
    fn space(&self, p: &Self::Problem) -> SearchSpace;
    /// The config a call uses when nothing is tuned: a safe heuristic for `p`.
    fn default_config(&self, p: &Self::Problem) -> Self::Config;
    /// A tuned config (from another shape in the bucket) fitted to `p`, e.g. blocks clamped
    /// to its dims.
    fn fit(&self, _p: &Self::Problem, c: Self::Config) -> Self::Config {
        c
    }
    /// `c` as `target` can run it (`None`: the heuristic's target): an op with a kernel
    /// variant some chips lack (int8 dots before v5e) switches it off there, so that a config
    /// from the heuristic, or a table of another target, still compiles.
    fn for_target(&self, _p: &Self::Problem, c: Self::Config, _target: Option<TableTarget>) -> Self::Config {
        c
    }
    /// The kernel call for `p` at `c`.
    fn call(&self, p: &Self::Problem, c: &Self::Config) -> Result<PallasCall, Error>;
    /// The operands' types (scalar-prefetch arrays, then inputs), in the call's order.
    fn operand_types(&self, p: &Self::Problem) -> Vec<ValueType>;
    /// The outputs' types, in the call's order.
    fn output_types(&self, p: &Self::Problem) -> Vec<ValueType>;
    /// Whether `p` has nothing for a kernel to do (a dim of 0): [`Op::empty_outputs`] answers it.
    fn is_empty(&self, _p: &Self::Problem) -> bool {
        false
    }
    /// The outputs of an empty problem, computed on the host as PyTorch would: zeros by default.
    fn empty_outputs(&self, p: &Self::Problem, _inputs: &[HostArray]) -> Vec<HostArray> {
        self.output_types(p).iter().map(|t| HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))).collect()
    }
    /// Whether the scalar-prefetch tables a caller passes (the leading operands, as many as
    /// [`table_count`] says) are ones the kernel can run on: index maps read them, so a table
    /// pointing outside an array is refused here, with what would be right.
    fn check_tables(&self, _p: &Self::Problem, _tables: &[HostArray]) -> Result<(), Error> {
        Ok(())
    }
    /// Scalar-prefetch tables typical of `p`, for the TPU model ([`Tunable::sample_tables`]);
    /// none by default.
    fn sample_tables(&self, _p: &Self::Problem) -> Vec<HostArray> {
        Vec::new()
    }
    /// Operands to time and check with: uniform in [-1, 1) for floats, zeros for integers.
    fn random_inputs(&self, p: &Self::Problem, rng: &mut StdRng) -> Vec<HostArray> {
        self.operand_types(p).iter().map(|t| random_operand(rng, t)).collect()
    }
    /// The outputs in f64 from `inputs`, written independently of the kernel.
    fn reference(&self, p: &Self::Problem, inputs: &[HostArray]) -> Vec<ArrayD<f64>>;
    /// The problems `torchtpu tables` tunes for `target`: one per bucket the tables hold.
    fn table_problems(&self, target: TableTarget) -> Vec<Self::Problem>;
    /// The tuned tables the op's calls read: the shipped ones; an op of another crate gives
    /// its own ([`tables::Tables::parse`] over its `include_str!`ed files).
    fn tables(&self) -> &'static tables::Tables {
        tables::shipped()
    }
}

/// How many of `p`'s operands are scalar-prefetch tables (they come first, as in Pallas): the
/// kernel's own count of its prefetch parameters. A problem with no kernel (an empty one) has
/// none to check.
pub fn table_count<O: Op>(op: &O, p: &O::Problem) -> usize {
    op.call(p, &op.default_config(p)).map_or(0, |c| prefetch_count(&c))
}

/// How many scalar-prefetch tables `call`'s kernel takes.
fn prefetch_count(call: &PallasCall) -> usize {
    call.kernel().params_of(ParamKind::Prefetch).count()
}

/// A table's values as integers (tables are i32 arrays): what [`Op::check_tables`] reads.
pub fn table_values(table: &HostArray) -> Vec<i64> {
    table.to_f64().iter().map(|&x| x as i64).collect()
}

/// Uniform [-1, 1) for a float operand, zeros for an integer one.
pub fn random_operand(rng: &mut StdRng, t: &ValueType) -> HostArray {
    use rand::Rng;
    if t.dtype.is_float() {
        let a = ArrayD::from_shape_simple_fn(t.shape.clone(), || rng.random_range(-1.0..1.0));
        HostArray::from_f64(t.dtype, &a)
    } else {
        HostArray::from_f64(t.dtype, &ArrayD::zeros(t.shape.clone()))
    }
}

/// The tuner's untyped config for `c`, its values in the space's parameter order.
pub fn to_tuner_config<O: Op>(op: &O, p: &O::Problem, c: &O::Config) -> Result<Config, Error> {
    let value = serde_json::to_value(c).map_err(|e| Error::Config(format!("{}: {e}", op.name())))?;
    let fields = value.as_object().ok_or_else(|| Error::Config(format!("{}'s config is not a struct of integers: {value}", op.name())))?;
    op.space(p)
        .params()
        .iter()
        .map(|(name, _)| {
            let v = fields.get(name).and_then(serde_json::Value::as_u64).ok_or_else(|| Error::Config(format!("{}'s config has no integer `{name}`: {value}", op.name())))?;
            Ok((name.clone(), usize::try_from(v).map_err(|e| Error::Config(e.to_string()))?))
        })
        .collect::<Result<_, _>>()
        .map(Config)
}

/// The typed config for the tuner's `c`.
pub fn from_tuner_config<O: Op>(op: &O, c: &Config) -> Result<O::Config, Error> {
    let fields: serde_json::Map<String, serde_json::Value> = c.0.iter().map(|(n, v)| (n.clone(), (*v).into())).collect();
    serde_json::from_value(fields.into()).map_err(|e| Error::Config(format!("`{c}` is not a config of {}: {e}", op.name())))
}

/// The config a call of `op` on `p` uses on `target`: a result `torchtpu tune` cached for this
/// exact problem on this machine, else the tuned table's entry for its bucket, else the op's
/// heuristic; tuned configs fitted to `p`.
pub fn config_for<O: Op>(op: &O, p: &O::Problem, target: Option<TableTarget>) -> O::Config {
    let tuned = target.and_then(|target| {
        let tuning = Tuning { op: op.clone(), problem: op.tuning_problem(p), target: Some(target) };
        let cached = torchtpu_autotune::cached_best(&tuning, tables::tuning_device(target)).and_then(|c| from_tuner_config(op, &c).ok());
        cached.or_else(|| op.tables().entry(target, op.name(), &op.bucket(p)).and_then(|v| serde_json::from_value(v.clone()).ok()))
    });
    let c = match tuned {
        Some(c) => op.fit(p, c),
        None => op.default_config(p),
    };
    op.for_target(p, c, target)
}

/// The call of `op` on `p` with the config it uses on `backend` (or `explicit`), checked.
pub fn tuned_call<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, backend: Backend) -> Result<PallasCall, Error> {
    call_for(op, p, explicit, tables::target_of(backend))
}

/// The call of `op` on `p` with the config it uses on `target` (or `explicit`), checked; for
/// a chip, with the VMEM limit its blocks need there ([`fit_vmem`]). Every path that runs or
/// lowers an op for a chip goes through here.
pub fn call_for<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, target: Option<TableTarget>) -> Result<PallasCall, Error> {
    op.check(p)?;
    let config = explicit.map_or_else(|| config_for(op, p, target), |c| op.for_target(p, c.clone(), target));
    let call = op.call(p, &config)?;
    match target {
        Some(TableTarget::Chip(chip)) => fit_vmem(call, &op.operand_types(p), chip),
        _ => Ok(call),
    }
}

/// `call` with the `vmem_limit_bytes` its blocks need on `chip`
/// ([`torchtpu_autotune::model::vmem_limit`], as the tuner ranks it), for operands `types`.
pub fn fit_vmem(call: PallasCall, types: &[ValueType], chip: Chip) -> Result<PallasCall, Error> {
    let traced = call.trace(types)?;
    Ok(match torchtpu_autotune::model::vmem_limit(&traced, chip).map_err(Error::Config)? {
        Some(limit) => call.vmem_limit_bytes(limit),
        None => call,
    })
}

/// `op` on `p` compiled for a device backend with the config it uses there: run on device
/// buffers, time without recompiling.
pub fn compiled<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, backend: Backend) -> Result<Compiled, Error> {
    let traced = tuned_call(op, p, explicit, backend)?.trace(&op.operand_types(p))?;
    Ok(Compiled::new(&traced, backend)?)
}

/// `op` on `p` lowered for `chip` with that chip's tuned config: the StableHLO module running
/// the Mosaic kernel in a `tpu_custom_call` (what a TPU runtime registers), as text and as a
/// portable artifact.
pub fn tpu_module<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, chip: Chip) -> Result<TpuModule, Error> {
    Ok(lower_tpu(&traced_for(op, p, explicit, TableTarget::Chip(chip))?)?)
}

/// `op` on `p` traced with the config it uses on `target` (or `explicit`), checked, as
/// [`call_for`] builds it.
pub fn traced_for<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, target: TableTarget) -> Result<TracedCall, Error> {
    Ok(call_for(op, p, explicit, Some(target))?.trace(&op.operand_types(p))?)
}

/// `op` on `p` run on `backend` over host arrays, with the config it uses there; an empty
/// problem's outputs come from [`Op::empty_outputs`], no kernel run.
pub fn run<O: Op>(op: &O, p: &O::Problem, explicit: Option<&O::Config>, inputs: &[HostArray], backend: Backend) -> Result<Vec<HostArray>, Error> {
    op.check(p)?;
    let types = op.operand_types(p);
    if inputs.len() != types.len() || inputs.iter().zip(&types).any(|(a, t)| a.value_type() != *t) {
        let got: Vec<String> = inputs.iter().map(|a| a.value_type().to_string()).collect();
        let want: Vec<String> = types.iter().map(ToString::to_string).collect();
        return Err(Error::Shape(format!("{} takes operands [{}]; got [{}]", op.name(), want.join(", "), got.join(", "))));
    }
    if op.is_empty(p) {
        return Ok(op.empty_outputs(p, inputs));
    }
    let call = tuned_call(op, p, explicit, backend)?;
    // The tables steer the kernel's copies: checked before it runs.
    match prefetch_count(&call) {
        0 => {}
        n => op.check_tables(p, inputs.get(..n).unwrap_or_default())?,
    }
    Ok(torchtpu_exec::run(&call, backend, inputs)?)
}

/// An op at one problem, its config open: what the tuner tunes. Each config is built as the
/// op runs it on `target` ([`Op::for_target`]).
#[derive(Clone, Debug)]
pub struct Tuning<O: Op> {
    pub op: O,
    pub problem: O::Problem,
    pub target: Option<TableTarget>,
}

impl<O: Op> Tuning<O> {
    /// `op` at `problem` for the tuner, which must be a problem the op can run.
    pub fn new(op: O, problem: O::Problem) -> Result<Self, Error> {
        op.check(&problem)?;
        op.call(&problem, &op.default_config(&problem))?;
        let problem = op.tuning_problem(&problem);
        Ok(Tuning { op, problem, target: None })
    }

    /// The same, its configs built as they run on `target`.
    pub fn on(self, target: Option<TableTarget>) -> Self {
        Tuning { target, ..self }
    }
}

impl<O: Op> Tunable for Tuning<O> {
    fn kernel(&self) -> String {
        self.op.name().into()
    }
    fn problem(&self) -> String {
        serde_json::to_string(&self.problem).unwrap_or_else(|_| format!("{:?}", self.problem))
    }
    fn space(&self) -> SearchSpace {
        self.op.space(&self.problem)
    }
    fn default_config(&self) -> Config {
        let c = self.op.default_config(&self.problem);
        to_tuner_config(&self.op, &self.problem, &c).unwrap_or_else(|_| Config(Vec::new()))
    }
    fn build(&self, c: &Config) -> torchtpu_autotune::Result<PallasCall> {
        let invalid = |e: Error| torchtpu_autotune::Error::Invalid(e.to_string());
        let config = from_tuner_config(&self.op, c).map_err(invalid)?;
        self.op.call(&self.problem, &self.op.for_target(&self.problem, config, self.target)).map_err(invalid)
    }
    fn operand_types(&self) -> Vec<ValueType> {
        self.op.operand_types(&self.problem)
    }
    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        self.op.random_inputs(&self.problem, rng)
    }
    fn sample_tables(&self) -> Vec<HostArray> {
        self.op.sample_tables(&self.problem)
    }
}

/// Float fields of problems that may be NaN or infinite (a scale a user passes through, as
/// PyTorch would): JSON has no such numbers, so they travel as the strings `"nan"`, `"inf"`
/// and `"-inf"`; finite values as numbers. Use as `#[serde(with = "op::float")]`.
pub mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *x {
            x if x.is_finite() => s.serialize_f64(x),
            x if x.is_nan() => s.serialize_str("nan"),
            x if x > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Number(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Wire::deserialize(d)? {
            Wire::Number(x) => Ok(x),
            Wire::Text(t) => match t.as_str() {
                "nan" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!("`{other}` is not a number (nor nan, inf or -inf)"))),
            },
        }
    }

    /// The same for an optional float (`null` for none).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            match x {
                Some(x) => super::serialize(x, s),
                None => s.serialize_none(),
            }
        }

        #[derive(Deserialize)]
        struct Float(#[serde(with = "super")] f64);

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<Float>::deserialize(d)?.map(|Float(x)| x))
        }
    }
}

/// The problems' f32/bf16 dtype check: ops whose kernels compute on f32 or bf16 inputs
/// (accumulating in f32) call it with their name.
pub fn check_float_dtype(op: &str, dtype: DType) -> Result<(), Error> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype(format!("{op} takes f32 or bf16, not {other}"))),
    }
}
