//! A gated MLP's first half in one kernel: `act(x · W_gateᵀ) · (x · W_upᵀ)` (PyTorch's
//! `act(F.linear(x, W_gate)) * F.linear(x, W_up)`), reading each block of x once for both
//! products and applying the activation to the accumulators, so neither projection reaches
//! memory. For training, a second form also writes the two projections, which the backward
//! (`glu_backward`, then matmuls) takes.

use ndarray::{ArrayD, Ix2};
use serde::{Deserialize, Serialize};
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::blocks;
use crate::glu::{activation, reference_activation, Activation};
use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

/// The two projections of an `[bm, bk]` block of x accumulated over K (the last K block's
/// overhang masked), or `None` before the last K block.
#[tpu_fn]
fn accumulate<T: Float>(x: &Ref<T>, w_gate: &Ref<T>, w_up: &Ref<T>, gate_acc: &mut Scratch<f32>, up_acc: &mut Scratch<f32>, k_len: usize) -> Scalar<bool> {
    let kk = program_id(2);
    if kk == 0 {
        gate_acc.store(zeros());
        up_acc.store(zeros());
    }
    let mut xb = x.load();
    let (mut gb, mut ub) = (w_gate.load(), w_up.load());
    let bk = xb.shape()[1];
    if k_len % bk != 0 {
        let k0 = kk * bk as i32;
        xb = zero_outside(xb, 1, k0, k_len);
        gb = zero_outside(gb, 1, k0, k_len);
        ub = zero_outside(ub, 1, k0, k_len);
    }
    gate_acc.store(gate_acc.load() + dot_nt(xb, gb));
    up_acc.store(up_acc.load() + dot_nt(xb, ub));
    kk == num_programs(2) - 1
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<T: Float>(x: &Ref<T>, w_gate: &Ref<T>, w_up: &Ref<T>, out: &mut Ref<T>, gate_acc: &mut Scratch<f32>, up_acc: &mut Scratch<f32>, act: Activation, k_len: usize) {
    if accumulate(x, w_gate, w_up, gate_acc, up_acc, k_len) {
        let (a, _) = activation(act, gate_acc.load());
        out.store((a * up_acc.load()).cast());
    }
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn saving_kernel<T: Float>(
    x: &Ref<T>,
    w_gate: &Ref<T>,
    w_up: &Ref<T>,
    out: &mut Ref<T>,
    gate: &mut Ref<T>,
    up: &mut Ref<T>,
    gate_acc: &mut Scratch<f32>,
    up_acc: &mut Scratch<f32>,
    act: Activation,
    k_len: usize,
) {
    if accumulate(x, w_gate, w_up, gate_acc, up_acc, k_len) {
        let (g, u) = (gate_acc.load(), up_acc.load());
        let (a, _) = activation(act, g);
        out.store((a * u).cast());
        gate.store(g.cast());
        up.store(u.cast());
    }
}

/// The fused gated projection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GluLinearOp;

/// x `[rows, k]`, W_gate and W_up `[n, k]` (`nn.Linear` weights) in `dtype`; `save`: also
/// output the two projections `[rows, n]` (for a backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluLinearProblem {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    pub activation: Activation,
    pub save: bool,
}

/// The blocks: rows of x, output columns (rows of the weights), and K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluLinearConfig {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
}

impl Op for GluLinearOp {
    type Problem = GluLinearProblem;
    type Config = GluLinearConfig;

    fn name(&self) -> &'static str {
        "glu_linear"
    }
    fn example(&self) -> GluLinearProblem {
        GluLinearProblem { rows: 2048, n: 5632, k: 2048, dtype: DType::F32, activation: Activation::Silu, save: false }
    }
    fn check(&self, p: &GluLinearProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)
    }
    /// Saving the projections does not change which blocks are fastest enough to matter.
    fn tuning_problem(&self, p: &GluLinearProblem) -> GluLinearProblem {
        GluLinearProblem { save: false, ..*p }
    }
    /// The activation only touches the accumulators once, at the end: the tables are tuned with
    /// the heaviest (tanh GELU), whose blocks fit for the others too.
    fn bucket(&self, p: &GluLinearProblem) -> String {
        let b = |n| tables::bucket(n, 128, 8192);
        format!("m{}n{}k{}/{}", b(p.rows), b(p.n), b(p.k), p.dtype)
    }
    /// Blocks from 128 (rows, columns) and 256 (K) up to 512, 512 and 1024: two accumulators and
    /// two weight blocks make larger ones spill, smaller ones re-read x and W too often.
    fn space(&self, p: &GluLinearProblem) -> SearchSpace {
        let from = |lo: usize, dim: usize, cap: usize| block_candidates(dim, cap).into_iter().filter(move |&b| b >= lo.min(dim.next_power_of_two().max(64)));
        SearchSpace::new().param("bm", from(128, p.rows, 512)).param("bn", from(128, p.n, 512)).param("bk", from(256, p.k, 1024))
    }
    /// Two f32 accumulators and two weight blocks: half a matmul's 512-blocks along N.
    fn default_config(&self, p: &GluLinearProblem) -> GluLinearConfig {
        self.fit(p, GluLinearConfig { bm: 256, bn: 256, bk: 512 })
    }
    fn fit(&self, p: &GluLinearProblem, c: GluLinearConfig) -> GluLinearConfig {
        if c.bm == 0 || c.bn == 0 || c.bk == 0 {
            return self.default_config(p);
        }
        GluLinearConfig { bm: blocks::whole_tiles(c.bm, p.rows, sublanes(p.dtype)), bn: blocks::whole_tiles(c.bn, p.n, LANES), bk: blocks::whole_tiles(c.bk, p.k, LANES) }
    }
    fn call(&self, p: &GluLinearProblem, c: &GluLinearConfig) -> Result<PallasCall, Error> {
        self.check(p)?;
        if self.is_empty(p) || c.bm == 0 || c.bn == 0 || c.bk == 0 {
            return Err(Error::Shape(format!("glu_linear: a kernel call needs rows, n, k and blocks (the host API handles empty problems): {p:?} at {c:?}")));
        }
        let kernel = match (p.save, p.dtype) {
            (false, DType::F32) => forward_kernel::kernel::<f32>(p.activation, p.k),
            (false, _) => forward_kernel::kernel::<bf16>(p.activation, p.k),
            (true, DType::F32) => saving_kernel::kernel::<f32>(p.activation, p.k),
            (true, _) => saving_kernel::kernel::<bf16>(p.activation, p.k),
        };
        let weight = || BlockSpec::new([c.bn, c.bk], |[_i, j, kk]| (j, kk));
        let output = || BlockSpec::new([c.bm, c.bn], |[i, j, _kk]| (i, j));
        let outputs = if p.save { vec![output(), output(), output()] } else { vec![output()] };
        Ok(PallasCall::new(kernel)
            .name(self.name())
            .grid([p.rows.div_ceil(c.bm), p.n.div_ceil(c.bn), p.k.div_ceil(c.bk)])
            .dimension_semantics([Parallel, Parallel, Arbitrary])
            .in_specs([BlockSpec::new([c.bm, c.bk], |[i, _j, kk]| (i, kk)), weight(), weight()])
            .out_specs(outputs)
            .scratch([Vmem::new([c.bm, c.bn]), Vmem::new([c.bm, c.bn])])
            .out_shapes(self.output_types(p).into_iter().map(|t| t.shape)))
    }
    /// x `[rows, k]`, W_gate and W_up `[n, k]`.
    fn operand_types(&self, p: &GluLinearProblem) -> Vec<ValueType> {
        let w = ValueType::new(p.dtype, [p.n, p.k]);
        vec![ValueType::new(p.dtype, [p.rows, p.k]), w.clone(), w]
    }
    /// The output `[rows, n]`; saving, the gate's and up's projections too.
    fn output_types(&self, p: &GluLinearProblem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, [p.rows, p.n]); if p.save { 3 } else { 1 }]
    }
    fn is_empty(&self, p: &GluLinearProblem) -> bool {
        p.rows == 0 || p.n == 0 || p.k == 0
    }
    fn reference(&self, p: &GluLinearProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let two = |a: &HostArray| a.to_f64().into_dimensionality::<Ix2>().ok();
        let (Some(x), Some(wg), Some(wu)) = (inputs.first().and_then(two), inputs.get(1).and_then(two), inputs.get(2).and_then(two)) else { return Vec::new() };
        let (g, u) = (x.dot(&wg.t()), x.dot(&wu.t()));
        let out = ndarray::Zip::from(&g).and(&u).map_collect(|&g, &u| reference_activation(p.activation, g).0 * u);
        if p.save {
            vec![out.into_dyn(), g.into_dyn(), u.into_dyn()]
        } else {
            vec![out.into_dyn()]
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<GluLinearProblem> {
        let problem = |dtype, rows, n, k, activation| GluLinearProblem { rows, n, k, dtype, activation, save: false };
        match target {
            TableTarget::Cpu => vec![problem(DType::F32, 512, 1408, 512, Activation::GeluTanh), problem(DType::F32, 1024, 2816, 1024, Activation::GeluTanh)],
            TableTarget::Chip(_) => [DType::BF16, DType::F32]
                .into_iter()
                .flat_map(|dtype| [(2048, 5632, 2048), (4096, 11008, 4096)].map(|(m, n, k)| problem(dtype, m, n, k, Activation::GeluTanh)))
                .collect(),
        }
    }
}
