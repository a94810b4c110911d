//! The shipped ops by name, behind one object-safe face ([`AnyOp`]) that the CLI, the table
//! maker and the Python extension use without knowing an op's types: problems and configs
//! cross it as JSON.

use ndarray::ArrayD;
use rand::rngs::StdRng;
use serde_json::Value;
use torchtpu_autotune::Tunable;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::{DType, HostArray, PallasCall};
use torchtpu_runtime::Chip;

use torchtpu_codegen::TpuModule;

use crate::flash::{FlashOp, FlashPass};
use crate::glu::GluOp;
use crate::glu_linear::GluLinearOp;
use crate::gmm::GroupedOp;
use crate::layer_norm::LayerNormOp;
use crate::linear_cross_entropy::LinearCrossEntropyOp;
use crate::matmul::MatmulOp;
use crate::op::{self, Op, Tuning};
use crate::paged_attention::PagedAttentionOp;
use crate::quantized_matmul::QuantizedMatmulOp;
use crate::rms_norm::RmsNormOp;
use crate::rope::RopeOp;
use crate::tables::TableTarget;
use crate::Error;

/// An op with its problem and config as JSON: what [`Registered`] makes of an [`Op`].
pub trait AnyOp: Send + Sync {
    fn name(&self) -> &'static str;
    /// The op's example problem: the fields a problem has, with the CLI's defaults.
    fn example(&self) -> Value;
    /// The problem `problem` describes, checked: the tuner's view of it, its configs built as
    /// they run on `target`.
    fn tunable(&self, problem: &Value, target: Option<TableTarget>) -> Result<Box<dyn Tunable>, Error>;
    /// The call for `problem` at `config` (the config it uses on `target` when `None`), with
    /// its operand types.
    fn call(&self, problem: &Value, config: Option<&Value>, target: Option<TableTarget>) -> Result<(PallasCall, Vec<ValueType>), Error>;
    /// Random operands for `problem`.
    fn random_inputs(&self, problem: &Value, rng: &mut StdRng) -> Result<Vec<HostArray>, Error>;
    /// The f64 reference outputs for `problem` on `inputs`.
    fn reference(&self, problem: &Value, inputs: &[HostArray]) -> Result<Vec<ArrayD<f64>>, Error>;
    /// What `torchtpu tables` tunes for `target`: (bucket, problem) pairs.
    fn table_jobs(&self, target: TableTarget) -> Vec<(String, Box<dyn Tunable>)>;
    /// The module a TPU runs for `problem` on `chip` (its tuned config), as [`op::tpu_module`].
    fn tpu_module(&self, problem: &Value, chip: Chip) -> Result<TpuModule, Error>;
    /// The config `problem` uses on `target` (the heuristic for `None`).
    fn config(&self, problem: &Value, target: Option<TableTarget>) -> Result<Value, Error>;
    /// The operand and output types of `problem`.
    fn signature(&self, problem: &Value) -> Result<(Vec<ValueType>, Vec<ValueType>), Error>;
    /// Whether `problem` has nothing for a kernel to do; then [`AnyOp::empty_outputs`] answers it.
    fn is_empty(&self, problem: &Value) -> Result<bool, Error>;
    /// The outputs of an empty `problem`, computed on the host from its inputs.
    fn empty_outputs(&self, problem: &Value, inputs: &[HostArray]) -> Result<Vec<HostArray>, Error>;
    /// How many leading operands of `problem` are scalar-prefetch tables ([`op::table_count`]).
    fn table_count(&self, problem: &Value) -> Result<usize, Error>;
    /// Whether `tables` (those leading operands) are ones `problem`'s kernel can run on, as
    /// [`Op::check_tables`].
    fn check_tables(&self, problem: &Value, tables: &[HostArray]) -> Result<(), Error>;
}

fn problem_of<O: Op>(op: &O, v: &Value) -> Result<O::Problem, Error> {
    let p: O::Problem = serde_json::from_value(v.clone()).map_err(|e| Error::Argument(format!("not a {} problem: {e} (in {v})", op.name())))?;
    op.check(&p)?;
    Ok(p)
}

/// An [`Op`] as a registry holds it: `&Registered(MyOp)` in a list of `&dyn AnyOp`. (A
/// wrapper, so that an op's own methods and the registry's never meet on one type.)
#[derive(Clone, Copy, Debug)]
pub struct Registered<O: Op>(pub O);

impl<O: Op> AnyOp for Registered<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn example(&self) -> Value {
        serde_json::to_value(self.0.example()).unwrap_or(Value::Null)
    }
    fn tunable(&self, problem: &Value, target: Option<TableTarget>) -> Result<Box<dyn Tunable>, Error> {
        Ok(Box::new(Tuning::new(self.0.clone(), problem_of(&self.0, problem)?)?.on(target)))
    }
    fn call(&self, problem: &Value, config: Option<&Value>, target: Option<TableTarget>) -> Result<(PallasCall, Vec<ValueType>), Error> {
        let p = problem_of(&self.0, problem)?;
        let explicit: Option<O::Config> = match config {
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| Error::Config(format!("not a {} config: {e} (in {v})", self.0.name())))?),
            None => None,
        };
        Ok((op::call_for(&self.0, &p, explicit.as_ref(), target)?, self.0.operand_types(&p)))
    }
    fn random_inputs(&self, problem: &Value, rng: &mut StdRng) -> Result<Vec<HostArray>, Error> {
        Ok(self.0.random_inputs(&problem_of(&self.0, problem)?, rng))
    }
    fn reference(&self, problem: &Value, inputs: &[HostArray]) -> Result<Vec<ArrayD<f64>>, Error> {
        Ok(self.0.reference(&problem_of(&self.0, problem)?, inputs))
    }
    fn table_jobs(&self, target: TableTarget) -> Vec<(String, Box<dyn Tunable>)> {
        self.0
            .table_problems(target)
            .into_iter()
            .map(|p| (self.0.bucket(&p), Box::new(Tuning { op: self.0.clone(), problem: p, target: Some(target) }) as Box<dyn Tunable>))
            .collect()
    }
    fn tpu_module(&self, problem: &Value, chip: Chip) -> Result<TpuModule, Error> {
        op::tpu_module(&self.0, &problem_of(&self.0, problem)?, None, chip)
    }
    fn config(&self, problem: &Value, target: Option<TableTarget>) -> Result<Value, Error> {
        serde_json::to_value(op::config_for(&self.0, &problem_of(&self.0, problem)?, target)).map_err(|e| Error::Config(e.to_string()))
    }
    fn signature(&self, problem: &Value) -> Result<(Vec<ValueType>, Vec<ValueType>), Error> {
        let p = problem_of(&self.0, problem)?;
        Ok((self.0.operand_types(&p), self.0.output_types(&p)))
    }
    fn is_empty(&self, problem: &Value) -> Result<bool, Error> {
        Ok(self.0.is_empty(&problem_of(&self.0, problem)?))
    }
    fn empty_outputs(&self, problem: &Value, inputs: &[HostArray]) -> Result<Vec<HostArray>, Error> {
        Ok(self.0.empty_outputs(&problem_of(&self.0, problem)?, inputs))
    }
    fn table_count(&self, problem: &Value) -> Result<usize, Error> {
        Ok(op::table_count(&self.0, &problem_of(&self.0, problem)?))
    }
    fn check_tables(&self, problem: &Value, tables: &[HostArray]) -> Result<(), Error> {
        self.0.check_tables(&problem_of(&self.0, problem)?, tables)
    }
}

/// Every shipped op, in the order `torchtpu list` shows them.
pub fn ops() -> &'static [&'static dyn AnyOp] {
    const OPS: &[&dyn AnyOp] = &[
        &Registered(MatmulOp),
        &Registered(FlashOp(FlashPass::Forward)),
        &Registered(FlashOp(FlashPass::BackwardDkv)),
        &Registered(FlashOp(FlashPass::BackwardDq)),
        &Registered(RmsNormOp::Forward),
        &Registered(RmsNormOp::Backward),
        &Registered(LayerNormOp::Forward),
        &Registered(LayerNormOp::Backward),
        &Registered(GluOp::Forward),
        &Registered(GluOp::Backward),
        &Registered(GluLinearOp),
        &Registered(RopeOp::Forward),
        &Registered(RopeOp::Backward),
        &Registered(LinearCrossEntropyOp::Forward),
        &Registered(LinearCrossEntropyOp::BackwardDh),
        &Registered(LinearCrossEntropyOp::BackwardDw),
        &Registered(GroupedOp::Gmm),
        &Registered(GroupedOp::Tgmm),
        &Registered(QuantizedMatmulOp),
        &Registered(PagedAttentionOp),
    ];
    OPS
}

/// The shipped op called `name`.
pub fn find(name: &str) -> Result<&'static dyn AnyOp, Error> {
    find_in(ops(), name)
}

/// The op of `ops` called `name`.
pub fn find_in(ops: &[&'static dyn AnyOp], name: &str) -> Result<&'static dyn AnyOp, Error> {
    ops.iter().copied().find(|o| o.name() == name).ok_or_else(|| {
        let names: Vec<&str> = ops.iter().map(|o| o.name()).collect();
        Error::Argument(format!("no op `{name}`; the ops are {}", names.join(", ")))
    })
}

/// A problem and, if any of its fields were set, a config, from `key=value` settings.
pub struct Selection {
    pub problem: Value,
    pub config: Option<Value>,
}

/// `op`'s example problem in `dtype` with `settings` (`field`, value) over it, and over the
/// config it would use (the heuristic) when a setting names a config field: each value read as
/// its field's type (a boolean field also takes 0 and 1); an unknown field is an error that
/// lists the known ones.
pub fn select(op: &dyn AnyOp, dtype: Option<DType>, settings: &[(String, String)]) -> Result<Selection, Error> {
    let mut problem = op.example();
    let Some(fields) = problem.as_object_mut() else {
        return Err(Error::Argument(format!("{} has no problem fields", op.name())));
    };
    if let Some(dtype) = dtype {
        fields.insert("dtype".into(), serde_json::to_value(dtype).map_err(|e| Error::Dtype(e.to_string()))?);
    }
    let (problem_settings, config_settings): (Vec<_>, Vec<_>) = settings.iter().partition(|(k, _)| fields.contains_key(k));
    for (key, text) in problem_settings {
        if let Some(slot) = fields.get_mut(key) {
            *slot = typed(slot, text);
        }
    }
    if config_settings.is_empty() {
        return Ok(Selection { problem, config: None });
    }
    let mut config = op.config(&problem, None)?;
    let config_fields = config.as_object_mut().ok_or_else(|| Error::Config(format!("{}'s config has no fields", op.name())))?;
    for (key, text) in config_settings {
        let Some(slot) = config_fields.get_mut(key) else {
            let known = |m: &serde_json::Map<String, Value>| m.keys().filter(|k| *k != "dtype").cloned().collect::<Vec<_>>().join(", ");
            let problem_fields = problem.as_object().map(known).unwrap_or_default();
            return Err(Error::Argument(format!("`{}` has no setting `{key}`; it takes {problem_fields} (the problem) and {} (the config)", op.name(), known(config_fields))));
        };
        *slot = typed(slot, text);
    }
    Ok(Selection { problem, config: Some(config) })
}

/// `text` read as the type of the value in `slot`.
fn typed(slot: &Value, text: &str) -> Value {
    let text = text.trim();
    match (slot, text) {
        (Value::Bool(_), "1") => Value::Bool(true),
        (Value::Bool(_), "0") => Value::Bool(false),
        (Value::String(_), _) => Value::String(text.into()),
        _ => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
    }
}

/// `value`'s fields as `key=value,...` (a config or a problem, for names and messages).
pub fn describe(value: &Value) -> String {
    match value.as_object() {
        Some(fields) => fields.iter().map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect::<Vec<_>>().join(","),
        None => value.to_string(),
    }
}
