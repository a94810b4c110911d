//! Grouped matmul for mixture-of-experts (megablox's `gmm` and `tgmm`): the rows of `lhs`
//! come in contiguous groups, one per expert, and group `j`'s rows are multiplied by expert
//! `j`'s matrix; `tgmm` is its weight gradient, one `lhsᵀ · grad` per group.
//!
//! The groups reach the kernels as a scalar-prefetch table of group ends (the cumulative
//! group sizes, `torch._grouped_mm`'s `offs`). As in megablox, the grid walks the (group, row
//! block) pairs in row order, a row block shared by two groups visited once for each; the
//! walk has at most `row blocks + groups` steps, and the steps past its end repeat its last
//! block and do nothing. Unlike megablox, each step finds its pair in the index maps from the
//! ends alone, so one compiled kernel serves every split of the rows at every block size and
//! nothing is computed on the host. Rows after the last group belong to no expert: `gmm`
//! gives them zeros.

use ndarray::{s, Array2, Array3, ArrayD, Axis, Ix2};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use torchtpu_autotune::problem::block_candidates;
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::blocks::whole_tiles;
use crate::masking::zero_outside;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

/// The two grouped matmuls: `gmm` (`[m, k] · [g, k, n] → [m, n]`) and `tgmm` (its weight
/// gradient, `[m, k]ᵀ · [m, n] → [g, k, n]` group by group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupedOp {
    Gmm,
    Tgmm,
}

/// One grouped matmul: `lhs [m, k]`, `groups` experts, outputs `n` wide, in `dtype`.
/// `transpose_rhs` (gmm only) takes the experts' matrices as `[g, n, k]` (the layout of
/// `nn.Linear` weights stacked, and of gmm's own gradient for `lhs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupedProblem {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub groups: usize,
    pub dtype: DType,
    #[serde(default)]
    pub transpose_rhs: bool,
}

/// The row, contraction and output-column blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupedConfig {
    pub bm: usize,
    pub bk: usize,
    pub bn: usize,
}

/// What the kernels and their index maps know of a problem at trace time.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Grouping {
    rows: usize,
    groups: usize,
    bm: usize,
    row_blocks: usize,
    /// The contraction's length (gmm's k): its last block may overhang.
    k_len: usize,
    transpose_rhs: bool,
    /// tgmm's walk: every group is visited, an empty one once (its gradient is zeros), and
    /// the rows after the last group not at all. gmm's visits the rows after the last group
    /// (they get zeros) and skips empty groups.
    per_group: bool,
}

impl Grouping {
    /// The grid's steps: at least the visits of any split of the rows. Each group's rows
    /// start at most one row block before the previous group's end, so the groups (the rows
    /// after the last counted as one more in gmm, empty ones visited once in tgmm) visit at
    /// most `row_blocks + groups` blocks.
    fn steps(&self) -> usize {
        self.row_blocks + self.groups
    }
}

/// What step `step` of the walk over (group, row block) pairs does: group `group`'s rows
/// `[start, end)` in row block `block`; whether it is the group's `first` and `last` visit;
/// `valid` false for the steps after the walk, which repeat its last block (so they copy
/// nothing) and do nothing; `multiplies` whether the step has a product to compute (a valid
/// step of an expert's group, not of the rows after the last group).
struct Visit {
    group: Scalar<i32>,
    block: Scalar<i32>,
    start: Scalar<i32>,
    end: Scalar<i32>,
    first: Scalar<bool>,
    last: Scalar<bool>,
    valid: Scalar<bool>,
    multiplies: Scalar<bool>,
}

/// Step `step` of the walk, found from the group ends by counting every group's visits up to
/// it (unrolled over the groups: `O(groups)` scalar work per step, no tables made on the
/// host, one kernel for every split of the rows). Ends outside `[0, rows]` or decreasing are
/// clamped, so that even a table the host check refuses indexes inside the arrays.
#[tpu_fn]
fn visit(ends: &Prefetch<i32>, g: Grouping, step: Scalar<i32>) -> Visit {
    let (bm, rows) = (g.bm as i32, g.rows as i32);
    let zero = Scalar::<i32>::constant(0);
    let (mut group, mut block, mut start, mut end, mut first, mut last) = (zero, zero, zero, zero, zero, zero);
    let (mut seen, mut previous_end) = (zero, zero);
    let walked = if g.per_group { g.groups } else { g.groups + 1 };
    for j in 0..walked {
        let lo = previous_end;
        let hi = if j < g.groups { minimum(maximum(ends.get([j as i32]), lo), rows) } else { Scalar::constant(rows) };
        let (first_block, last_block) = (lo / bm, maximum(hi - 1, lo) / bm);
        let visits = if g.per_group { last_block - first_block + 1 } else { select(lo < hi, last_block - first_block + 1, 0) };
        let here = visits > 0 && seen <= step;
        group = select(here, j as i32, group);
        block = select(here, minimum(first_block + step - seen, last_block), block);
        start = select(here, lo, start);
        end = select(here, hi, end);
        first = select(here, seen, first);
        last = select(here, seen + visits - 1, last);
        seen = seen + visits;
        previous_end = hi;
    }
    let valid = step < seen;
    let multiplies = valid && group < g.groups as i32;
    Visit { group, block: minimum(block, g.row_blocks as i32 - 1), start, end, first: step == first, last: step == last, valid, multiplies }
}

/// `out[rows of group j] = lhs[rows of j] · rhs[j]`; grid (column block, step, k block).
#[tpu_kernel]
fn gmm_kernel<T: Float>(ends: &Prefetch<i32>, lhs: &Ref<T>, rhs: &Ref<T>, out: &mut Ref<T>, acc: &mut Scratch<f32>, g: Grouping) {
    let kk = program_id(2);
    let v = visit(ends, g, program_id(1));
    if kk == 0 {
        acc.store(zeros());
    }
    // The rows after the last group (group `groups`) get zeros: no product to compute.
    if v.multiplies {
        let mut a = lhs.load();
        let mut b = rhs.load();
        let bk = a.shape()[1];
        if g.k_len % bk != 0 {
            let k0 = kk * bk as i32;
            a = zero_outside(a, 1, k0, g.k_len);
            b = zero_outside(b, if g.transpose_rhs { 1 } else { 0 }, k0, g.k_len);
        }
        let product = if g.transpose_rhs { dot_nt(a, b) } else { dot(a, b) };
        acc.store(acc.load() + product);
    }
    if v.valid && kk == num_programs(2) - 1 {
        let y = acc.load();
        let block_start = v.block * g.bm as i32;
        let rows = iota::<i32>(y.shape(), 0) + block_start;
        let mine = (rows >= v.start) & (rows < v.end);
        // The block's first visit is its first row's group; later groups in the same block
        // (consecutive steps, the block still resident) keep the rows written before them.
        if block_start >= v.start {
            out.store(select(mine, y, 0.0).cast());
        } else {
            out.store(select(mine, y.cast::<T>(), out.load()));
        }
    }
}

/// `out[j] = lhs[rows of j]ᵀ · grad[rows of j]`; grid (k block, column block, step).
#[tpu_kernel]
fn tgmm_kernel<T: Float>(ends: &Prefetch<i32>, lhs: &Ref<T>, grad: &Ref<T>, out: &mut Ref<T>, acc: &mut Scratch<f32>, g: Grouping) {
    let v = visit(ends, g, program_id(2));
    if v.valid && v.first {
        acc.store(zeros());
    }
    if v.valid {
        let (a, d) = (lhs.load(), grad.load());
        let block_start = v.block * g.bm as i32;
        // Both sides masked (a select, not a product): another group's inf must not meet a 0.
        let mine = |t: Tile<T>| {
            let rows = iota::<i32>(t.shape(), 0) + block_start;
            select((rows >= v.start) & (rows < v.end), t, 0.0)
        };
        acc.store(acc.load() + dot_tn(mine(a), mine(d)));
    }
    if v.valid && v.last {
        out.store(acc.load().cast());
    }
}

impl GroupedProblem {
    fn grouping(&self, op: GroupedOp, bm: usize) -> Grouping {
        Grouping { rows: self.m, groups: self.groups, bm, row_blocks: self.m.div_ceil(bm), k_len: self.k, transpose_rhs: self.transpose_rhs, per_group: op == GroupedOp::Tgmm }
    }

    fn rhs_shape(&self) -> Vec<usize> {
        if self.transpose_rhs {
            vec![self.groups, self.n, self.k]
        } else {
            vec![self.groups, self.k, self.n]
        }
    }
}

/// The group ends of `sizes` (their running sums, as the kernels take them), checked against
/// `rows`: each size at least 0 and all of them at most `rows` together.
pub fn group_ends(sizes: &[i64], rows: usize) -> Result<Vec<i32>, Error> {
    if rows > i32::MAX as usize {
        return Err(Error::Shape(format!("group ends are i32: at most {} rows; got {rows}", i32::MAX)));
    }
    let mut total: i64 = 0;
    let mut ends = Vec::with_capacity(sizes.len());
    for (j, &s) in sizes.iter().enumerate() {
        if s < 0 {
            return Err(Error::Shape(format!("group sizes must be at least 0; group {j} has {s}")));
        }
        total = total.saturating_add(s);
        if total > rows as i64 {
            return Err(Error::Shape(format!("group sizes sum to more than lhs's {rows} rows (groups 0..={j} already hold {total})")));
        }
        ends.push(total as i32);
    }
    Ok(ends)
}

/// Whether `ends` are group ends of a problem with `rows` rows and `groups` groups: never
/// decreasing, from at least 0 to at most `rows`.
pub fn check_group_ends(ends: &[i64], groups: usize, rows: usize) -> Result<(), Error> {
    if ends.len() != groups {
        return Err(Error::Shape(format!("{groups} groups need {groups} group ends; got {}", ends.len())));
    }
    let mut previous = 0;
    for (j, &e) in ends.iter().enumerate() {
        if e < previous || e > rows as i64 {
            let why = if e > rows as i64 { format!("past lhs's {rows} rows") } else { "a negative group size".to_string() };
            return Err(Error::Shape(format!("group end {j} is {e} after {previous}: {why}; group sizes must be at least 0 and sum to at most {rows}")));
        }
        previous = e;
    }
    Ok(())
}

/// Random group sizes summing to at most `rows`: some groups empty, sometimes one holding
/// every row, sometimes rows left over.
pub fn random_group_sizes(rng: &mut StdRng, groups: usize, rows: usize) -> Vec<i64> {
    let mut sizes = vec![0i64; groups];
    if groups == 0 {
        return sizes;
    }
    match rng.random_range(0..4) {
        0 => sizes[rng.random_range(0..groups)] = rows as i64,
        _ => {
            let used = if rng.random_bool(0.5) { rows } else { rng.random_range(0..=rows) };
            for _ in 0..used {
                // Skewed toward low groups, so that some stay empty.
                let j = rng.random_range(0..groups).min(rng.random_range(0..groups));
                sizes[j] += 1;
            }
        }
    }
    sizes
}

/// The f64 reference: `gmm` or `tgmm` group by group, from the group ends.
pub fn reference(op: GroupedOp, p: &GroupedProblem, ends: &[i64], lhs: &ArrayD<f64>, other: &ArrayD<f64>) -> ArrayD<f64> {
    let lhs = lhs.view().into_dimensionality::<Ix2>().expect("lhs is [m, k]");
    // Clamped as the kernels clamp them: a bad table gives the kernels' answer, not a panic.
    let end = |j: usize| ends.get(j).map_or(p.m, |&e| e.clamp(0, p.m as i64) as usize);
    let bounds = |j: usize| {
        let start = if j == 0 { 0 } else { end(j - 1) };
        (start, end(j).max(start))
    };
    match op {
        GroupedOp::Gmm => {
            let mut out = Array2::<f64>::zeros((p.m, p.n));
            for j in 0..p.groups {
                let (a, b) = bounds(j);
                let w = other.index_axis(Axis(0), j).into_dimensionality::<Ix2>().expect("rhs is [g, k, n]");
                let w = if p.transpose_rhs { w.reversed_axes() } else { w };
                out.slice_mut(s![a..b, ..]).assign(&lhs.slice(s![a..b, ..]).dot(&w));
            }
            out.into_dyn()
        }
        GroupedOp::Tgmm => {
            let grad = other.view().into_dimensionality::<Ix2>().expect("grad is [m, n]");
            let mut out = Array3::<f64>::zeros((p.groups, p.k, p.n));
            for j in 0..p.groups {
                let (a, b) = bounds(j);
                out.index_axis_mut(Axis(0), j).assign(&lhs.slice(s![a..b, ..]).t().dot(&grad.slice(s![a..b, ..])));
            }
            out.into_dyn()
        }
    }
}

/// The most groups a problem may have: each grid step counts its way through every group's
/// end (in its index maps and its body), so the work per step grows with them.
pub const MAX_GROUPS: usize = 256;

impl GroupedOp {
    /// The tile each block must be a multiple of: k and n are lanes of some operand's block;
    /// rows are sublanes, except in tgmm, where they are its dot's contraction.
    fn tiles(&self, p: &GroupedProblem) -> GroupedConfig {
        let bm = if *self == GroupedOp::Tgmm { LANES } else { sublanes(p.dtype) };
        GroupedConfig { bm, bk: LANES, bn: LANES }
    }
}

impl Op for GroupedOp {
    type Problem = GroupedProblem;
    type Config = GroupedConfig;

    fn name(&self) -> &'static str {
        match self {
            GroupedOp::Gmm => "gmm",
            GroupedOp::Tgmm => "tgmm",
        }
    }
    fn example(&self) -> GroupedProblem {
        GroupedProblem { m: 2048, k: 1024, n: 1024, groups: 8, dtype: DType::F32, transpose_rhs: false }
    }
    fn check(&self, p: &GroupedProblem) -> Result<(), Error> {
        op::check_float_dtype(self.name(), p.dtype)?;
        if p.groups == 0 || p.groups > MAX_GROUPS {
            return Err(Error::Shape(format!("{} takes 1 to {MAX_GROUPS} groups; got {}", self.name(), p.groups)));
        }
        if *self == GroupedOp::Tgmm && p.transpose_rhs {
            return Err(Error::Argument("tgmm has no transpose_rhs (it makes [g, k, n]; transpose its output instead)".into()));
        }
        // Group ends and row indices are i32 in the kernels.
        if p.m > i32::MAX as usize / 2 {
            return Err(Error::Shape(format!("{} takes at most {} rows; got {}", self.name(), i32::MAX / 2, p.m)));
        }
        Ok(())
    }
    fn bucket(&self, p: &GroupedProblem) -> String {
        let b = |n| tables::bucket(n, 128, 8192);
        format!("m{}k{}n{}g{}/{}{}", b(p.m), b(p.k), b(p.n), tables::bucket(p.groups, 1, 256), p.dtype, if p.transpose_rhs { "/t" } else { "" })
    }
    fn space(&self, p: &GroupedProblem) -> SearchSpace {
        let tiles = self.tiles(p);
        let aligned = |len, tile: usize, cap| block_candidates(len, cap).into_iter().filter(|b| b % tile == 0).collect::<Vec<_>>();
        // megablox's own search (tokamax's ragged dot) takes gmm's contraction whole, up to
        // 4096 on the chips it was tuned for, and wins there; VMEM prunes what does not fit.
        SearchSpace::new().param("bm", aligned(p.m, tiles.bm, 1024)).param("bk", aligned(p.k, tiles.bk, 8192)).param("bn", aligned(p.n, tiles.bn, 1024))
    }
    fn default_config(&self, p: &GroupedProblem) -> GroupedConfig {
        self.fit(p, GroupedConfig { bm: 256, bk: 512, bn: 512 })
    }
    fn fit(&self, p: &GroupedProblem, c: GroupedConfig) -> GroupedConfig {
        if c.bm == 0 || c.bk == 0 || c.bn == 0 {
            return self.default_config(p);
        }
        let tiles = self.tiles(p);
        GroupedConfig { bm: whole_tiles(c.bm, p.m, tiles.bm), bk: whole_tiles(c.bk, p.k, tiles.bk), bn: whole_tiles(c.bn, p.n, tiles.bn) }
    }
    fn call(&self, p: &GroupedProblem, c: &GroupedConfig) -> Result<PallasCall, Error> {
        let GroupedConfig { bm, bk, bn } = *c;
        if bm == 0 || bk == 0 || bn == 0 {
            return Err(Error::Shape(format!("{} blocks (bm, bk, bn) must be positive; got {:?}", self.name(), (bm, bk, bn))));
        }
        if self.is_empty(p) {
            return Err(Error::Shape(format!("a kernel call needs non-empty dims (the host API handles empty ones): {p:?}")));
        }
        let g = p.grouping(*self, bm);
        let (kb, nb) = (p.k.div_ceil(bk), p.n.div_ceil(bn));
        let last_k = kb as i32 - 1;
        let groups = p.groups as i32;
        match self {
            GroupedOp::Gmm => {
                let t = p.transpose_rhs;
                let kernel = match p.dtype {
                    DType::F32 => gmm_kernel::kernel::<f32>(g),
                    DType::BF16 => gmm_kernel::kernel::<bf16>(g),
                    other => return Err(Error::Dtype(format!("gmm takes f32 or bf16, not {other}"))),
                };
                // A step with nothing to multiply (past the walk, or the rows after the last
                // group) reads the k block its predecessor ended on: no copy.
                let k_of = move |v: &Visit, kk: Scalar<i32>| select(v.multiplies, kk, last_k);
                let rhs_block = if t { [None, Some(bn), Some(bk)] } else { [None, Some(bk), Some(bn)] };
                Ok(PallasCall::new(kernel)
                    .grid([nb, g.steps(), kb])
                    .in_specs([
                        BlockSpec::with_prefetch([bm, bk], move |[_, s, kk], pf| {
                            let v = visit(&pf[0], g, s);
                            (v.block, k_of(&v, kk))
                        }),
                        BlockSpec::with_prefetch(rhs_block, move |[n, s, kk], pf| {
                            let v = visit(&pf[0], g, s);
                            // The rows after the last group compute nothing: any expert will do.
                            let (e, kk) = (minimum(v.group, groups - 1), k_of(&v, kk));
                            if t {
                                (e, n, kk)
                            } else {
                                (e, kk, n)
                            }
                        }),
                    ])
                    .out_specs([BlockSpec::with_prefetch([bm, bn], move |[n, s, _], pf| (visit(&pf[0], g, s).block, n))])
                    .out_shapes([vec![p.m, p.n]])
                    .scratch([Vmem::new([bm, bn])])
                    .dimension_semantics([Parallel, Arbitrary, Arbitrary])
                    .name("gmm"))
            }
            GroupedOp::Tgmm => {
                let kernel = match p.dtype {
                    DType::F32 => tgmm_kernel::kernel::<f32>(g),
                    DType::BF16 => tgmm_kernel::kernel::<bf16>(g),
                    other => return Err(Error::Dtype(format!("tgmm takes f32 or bf16, not {other}"))),
                };
                Ok(PallasCall::new(kernel)
                    .grid([kb, nb, g.steps()])
                    .in_specs([
                        BlockSpec::with_prefetch([bm, bk], move |[kk, _, s], pf| (visit(&pf[0], g, s).block, kk)),
                        BlockSpec::with_prefetch([bm, bn], move |[_, n, s], pf| (visit(&pf[0], g, s).block, n)),
                    ])
                    .out_specs([BlockSpec::with_prefetch([None, Some(bk), Some(bn)], move |[kk, n, s], pf| (visit(&pf[0], g, s).group, kk, n))])
                    .out_shapes([vec![p.groups, p.k, p.n]])
                    .scratch([Vmem::new([bk, bn])])
                    .dimension_semantics([Parallel, Parallel, Arbitrary])
                    .name("tgmm"))
            }
        }
    }
    fn operand_types(&self, p: &GroupedProblem) -> Vec<ValueType> {
        let ends = ValueType::new(DType::I32, [p.groups]);
        let lhs = ValueType::new(p.dtype, [p.m, p.k]);
        match self {
            GroupedOp::Gmm => vec![ends, lhs, ValueType::new(p.dtype, p.rhs_shape())],
            GroupedOp::Tgmm => vec![ends, lhs, ValueType::new(p.dtype, [p.m, p.n])],
        }
    }
    fn output_types(&self, p: &GroupedProblem) -> Vec<ValueType> {
        match self {
            GroupedOp::Gmm => vec![ValueType::new(p.dtype, [p.m, p.n])],
            GroupedOp::Tgmm => vec![ValueType::new(p.dtype, [p.groups, p.k, p.n])],
        }
    }
    /// A dim of 0: the output is empty, or all zeros (k = 0 for gmm, m = 0 for tgmm).
    fn is_empty(&self, p: &GroupedProblem) -> bool {
        p.m == 0 || p.k == 0 || p.n == 0
    }
    fn check_tables(&self, p: &GroupedProblem, tables: &[HostArray]) -> Result<(), Error> {
        check_group_ends(&tables.first().map(op::table_values).unwrap_or_default(), p.groups, p.m)
    }
    /// Every row in a group, the groups as even as the rows allow: a router's balanced split.
    fn sample_tables(&self, p: &GroupedProblem) -> Vec<HostArray> {
        let (share, extra) = (p.m / p.groups.max(1), p.m % p.groups.max(1));
        let sizes: Vec<i64> = (0..p.groups).map(|j| (share + usize::from(j < extra)) as i64).collect();
        group_ends(&sizes, p.m).map(|ends| vec![HostArray::from(ndarray::Array1::from(ends).into_dyn())]).unwrap_or_default()
    }
    fn random_inputs(&self, p: &GroupedProblem, rng: &mut StdRng) -> Vec<HostArray> {
        let mut inputs: Vec<HostArray> = self.operand_types(p).iter().map(|t| op::random_operand(rng, t)).collect();
        let sizes = random_group_sizes(rng, p.groups, p.m);
        if let (Ok(ends), Some(slot)) = (group_ends(&sizes, p.m), inputs.first_mut()) {
            *slot = HostArray::from(ndarray::Array1::from(ends).into_dyn());
        }
        inputs
    }
    fn reference(&self, p: &GroupedProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        match inputs {
            [ends, lhs, other] => vec![reference(*self, p, &op::table_values(ends), &lhs.to_f64(), &other.to_f64())],
            _ => Vec::new(),
        }
    }
    fn table_problems(&self, target: TableTarget) -> Vec<GroupedProblem> {
        let dtypes: &[DType] = if target == TableTarget::Cpu { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        let (m, k, n) = if target == TableTarget::Cpu { (2048, 1024, 1024) } else { (8192, 4096, 4096) };
        dtypes.iter().map(|&dtype| GroupedProblem { m, k, n, groups: 8, dtype, transpose_rhs: false }).collect()
    }
}
