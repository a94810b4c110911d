//! Cost features of a traced call, a roofline model of TPU chips, and the surrogate the
//! guided search fits to measured times.

use torchtpu_codegen::cost;
use torchtpu_dsl::ir::{Func, MemorySpace, OpKind};
use torchtpu_dsl::{DType, HostArray, TracedCall};
use torchtpu_runtime::Chip;

/// What a configuration costs, independent of any device.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Features {
    /// Programs in the grid.
    pub steps: f64,
    /// Flops of all programs (a traced `if` counts its dearer branch).
    pub flops: f64,
    /// Bytes the TPU pipeline moves between HBM and VMEM: a block is fetched (or written
    /// back) when its index changes from one grid step to the next.
    pub hbm_bytes: f64,
    /// Bytes the portable lowering slices out per run: every block, every step.
    pub sliced_bytes: f64,
    /// Scoped VMEM the blocks (double-buffered) and scratch need, with TPU tile padding.
    pub vmem_bytes: f64,
    /// Bytes of one block of every operand: what the pipeline moves before the first step
    /// and after the last without overlapping anything.
    #[serde(default)]
    pub first_step_bytes: f64,
}

/// Rounds the last two dims of `shape` up to the TPU tile for `dtype`: (8, 128) for 32-bit,
/// (16, 128) for 16-bit, (32, 128) for 8-bit.
pub fn tile_padded_bytes(shape: &[usize], dtype: DType) -> usize {
    let sublane = torchtpu_dsl::sublanes(dtype);
    let mut s = shape.to_vec();
    let n = s.len();
    if n >= 1 {
        s[n - 1] = s[n - 1].div_ceil(torchtpu_dsl::LANES) * torchtpu_dsl::LANES;
    }
    if n >= 2 {
        s[n - 2] = s[n - 2].div_ceil(sublane) * sublane;
    }
    s.iter().product::<usize>() * dtype.size_bytes()
}

/// Values up to this size may live in vector registers (a TPU core has at most 64 of 4 KiB);
/// a larger one is kept in VMEM.
const REGISTER_FILE_BYTES: usize = 64 * 4096;

/// Scoped VMEM `call`'s blocks (double-buffered, tile-padded) and VMEM scratch need; an
/// operand left in HBM takes none (what the kernel copies in is its scratch).
pub fn vmem_bytes(call: &TracedCall) -> f64 {
    let blocks: f64 =
        call.inputs.iter().chain(&call.outputs).filter(|op| op.space != MemorySpace::Any).map(|op| 2.0 * tile_padded_bytes(&op.block_dims(), op.array.dtype) as f64).sum();
    let scratch: f64 = call.scratch.iter().filter(|s| s.ty.space == MemorySpace::Vmem).map(|s| tile_padded_bytes(&s.ty.shape, s.ty.dtype) as f64).sum();
    blocks + scratch
}

/// An estimate of the scoped VMEM libtpu gives `call`: [`vmem_bytes`] and the largest value
/// the body computes and reads twice where registers cannot hold it (attention's f32 scores
/// and their exponentials; a value read once can stream into its reader, as a matmul's
/// product into its accumulator, and a load is a view of its block). Against libtpu's
/// verdicts on the forward flash kernel for v5p at the 16 MiB default (bf16, head dims
/// 64/128/256, blocks 1024-4096, kv sub-blocks whole, 256 and 512) it agrees on 142 of 156
/// configs (blocks and scratch alone: 96) and passes every config libtpu passes. Not a bound:
/// a few shipped table entries that libtpu compiles exceed the chip's VMEM by it (f32 flash
/// with whole kv blocks on v4), so it only decides whether a call asks for more than the
/// default scoped VMEM ([`vmem_limit`]) and, in the calibration, what configs libtpu was not
/// asked about could run at a fixed limit. Values live across a loop count as read once.
pub fn vmem_estimate(call: &TracedCall) -> f64 {
    vmem_bytes(call) + largest_value_read_twice(&call.body) as f64
}

fn largest_value_read_twice(body: &Func) -> usize {
    let mut reads = vec![0usize; body.values.len()];
    body.body.walk(&mut |op| {
        for v in op.operands() {
            if let Some(n) = reads.get_mut(v.index()) {
                *n += 1;
            }
        }
    });
    let mut largest = 0;
    body.body.walk(&mut |op| {
        if matches!(op.kind, OpKind::Load { .. }) {
            return;
        }
        for &r in &op.results {
            if reads.get(r.index()).is_some_and(|&n| n >= 2) {
                if let Some(t) = body.value_type(r) {
                    largest = largest.max(tile_padded_bytes(&t.shape, t.dtype));
                }
            }
        }
    });
    if largest > REGISTER_FILE_BYTES {
        largest
    } else {
        0
    }
}

/// `tables` stands for the call's scalar-prefetch arrays (empty: blocks whose index maps read
/// them are counted as fetched at every step).
pub fn features(call: &TracedCall, tables: &[HostArray]) -> Result<Features, torchtpu_dsl::Error> {
    let estimate = cost::estimate(call);
    let operands: Vec<_> = call.inputs.iter().chain(&call.outputs).collect();
    let blocks = call.block_indices(tables)?;
    let mut hbm = 0.0;
    let mut sliced = 0.0;
    let mut first = 0.0;
    for (op, indices) in operands.iter().zip(&blocks) {
        if op.space == MemorySpace::Any {
            continue;
        }
        let block_bytes = (op.block_dims().iter().product::<usize>() * op.array.dtype.size_bytes()) as f64;
        sliced += block_bytes * call.num_programs() as f64;
        first += block_bytes;
        let fetches = match indices {
            Some(ix) => 1 + ix.windows(2).filter(|w| w[0] != w[1]).count(),
            None => call.num_programs(),
        };
        hbm += block_bytes * fetches as f64;
    }
    Ok(Features { steps: call.num_programs() as f64, flops: estimate.flops as f64, hbm_bytes: hbm, sliced_bytes: sliced, vmem_bytes: vmem_bytes(call), first_step_bytes: first })
}

/// The share of the faster units' work a step does not hide behind the slowest's (DMA issue,
/// VMEM port contention). Small: the calibration score is the same from 0 to 0.2; it ranks
/// configs of equal compute by the bytes they move, where a perfect overlap would tie them.
const UNHIDDEN: f64 = 0.1;

/// MXU passes of an f32 matmul per bf16 one.
const F32_PASSES: f64 = 3.0;

/// The `vmem_limit_bytes` `call` needs on `chip`: its own if it sets one, else none while
/// [`vmem_estimate`] fits the default scoped VMEM, else all the VMEM the chip has, so that
/// blocks real chips run (f32 matmul blocks past 16 MiB on v5e, measured; attention's f32
/// scores beside its blocks) compile; `Err` with the reason when the blocks and scratch alone,
/// a lower bound, cannot fit. libtpu's compile stays the verdict on what fits.
pub fn vmem_limit(call: &TracedCall, chip: Chip) -> Result<Option<u64>, String> {
    let need = vmem_bytes(call);
    let mib = |b: f64| b / (1u64 << 20) as f64;
    if let Some(limit) = call.vmem_limit_bytes {
        return if limit > chip.vmem_bytes() {
            Err(format!("vmem_limit_bytes {limit} is more than the {} bytes of VMEM {chip} has", chip.vmem_bytes()))
        } else if need > limit as f64 {
            Err(format!("VMEM model: {:.1} MiB of double-buffered blocks and scratch > the kernel's vmem_limit_bytes ({:.0} MiB)", mib(need), mib(limit as f64)))
        } else {
            Ok(Some(limit))
        };
    }
    if vmem_estimate(call) <= chip.default_scoped_vmem_bytes() as f64 {
        Ok(None)
    } else if need <= chip.vmem_bytes() as f64 {
        Ok(Some(chip.vmem_bytes()))
    } else {
        Err(format!("VMEM model: {:.1} MiB of double-buffered blocks and scratch > the {:.0} MiB of VMEM {chip} has", mib(need), mib(chip.vmem_bytes() as f64)))
    }
}

/// Predicted seconds on `chip`: the slowest of the call's MXU work, vector work and HBM
/// traffic (the pipeline overlaps them, all but [`UNHIDDEN`] of the others), plus the
/// overhead of every grid step; work a static condition skips (a causal kernel's blocks right
/// of the diagonal) is not counted; filling the pipeline (the first blocks in, the last out)
/// is not overlapped. A megacore device splits the steps of `parallel` grid axes between its
/// two TensorCores. `tables` stands for the scalar-prefetch arrays, as in [`features`].
pub fn predict_tpu_seconds(call: &TracedCall, f: &Features, chip: Chip, tables: &[HostArray]) -> f64 {
    let work = cost::work(call, chip.mxu_dim(), tables);
    let parallel_programs: usize = call.grid.iter().zip(&call.semantics).filter(|(_, s)| **s == torchtpu_dsl::Semantics::Parallel).map(|(&n, _)| n).product();
    let cores = f64::from(chip.cores_per_device());
    // Each core works at its share of the device's rates; without a parallel axis to split,
    // one core of a megacore device works alone.
    let share = 1.0 / cores;
    let split = if parallel_programs >= 2 { cores } else { 1.0 };
    let seconds = |total: f64, rate: f64| total / (rate * share);
    let mxu_bf16_equivalent = work.mxu_flops + (F32_PASSES - 1.0) * work.f32_mxu_flops;
    let units = [seconds(mxu_bf16_equivalent, chip.peak_bf16_flops()), seconds(work.vector_ops, chip.vector_ops_per_second()), seconds(f.hbm_bytes, chip.hbm_bytes_per_second())];
    let slowest = units.iter().copied().fold(0.0, f64::max);
    let busy = slowest + UNHIDDEN * (units.iter().sum::<f64>() - slowest);
    let fill = f.first_step_bytes / (chip.hbm_bytes_per_second() * share);
    (busy + f.steps * chip.step_overhead_seconds()) / split + fill
}

/// A linear model of measured time over [1, flops, steps, bytes] with non-negative weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Surrogate {
    weights: [f64; 4],
}

fn row(f: &Features) -> [f64; 4] {
    [1.0, f.flops, f.steps, f.sliced_bytes]
}

/// Least squares on the columns in `mask` (normal equations, Gaussian elimination).
fn solve(rows: &[[f64; 4]], y: &[f64], mask: &[bool; 4], scale: &[f64; 4]) -> Option<[f64; 4]> {
    let cols: Vec<usize> = (0..4).filter(|&c| mask[c]).collect();
    let n = cols.len();
    let mut a = vec![vec![0.0; n + 1]; n];
    for (r, &yi) in rows.iter().zip(y) {
        for i in 0..n {
            let xi = r[cols[i]] / scale[cols[i]];
            for j in 0..n {
                a[i][j] += xi * r[cols[j]] / scale[cols[j]];
            }
            a[i][n] += xi * yi;
        }
    }
    for i in 0..n {
        let p = (i..n).max_by(|&x, &z| a[x][i].abs().total_cmp(&a[z][i].abs()))?;
        a.swap(i, p);
        if a[i][i].abs() < 1e-12 {
            return None;
        }
        let pivot = a[i].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != i {
                let f = row[i] / pivot[i];
                for (x, p) in row[i..=n].iter_mut().zip(&pivot[i..=n]) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut w = [0.0; 4];
    for (i, &c) in cols.iter().enumerate() {
        w[c] = a[i][n] / a[i][i] / scale[c];
    }
    Some(w)
}

impl Surrogate {
    /// The best non-negative fit over every subset of the features (4 columns: 15 subsets).
    pub fn fit(samples: &[(Features, f64)]) -> Option<Surrogate> {
        let rows: Vec<[f64; 4]> = samples.iter().map(|(f, _)| row(f)).collect();
        let y: Vec<f64> = samples.iter().map(|&(_, t)| t).collect();
        let mut scale = [1.0f64; 4];
        for r in &rows {
            for c in 0..4 {
                scale[c] = scale[c].max(r[c].abs());
            }
        }
        let mut best: Option<(f64, [f64; 4])> = None;
        for m in 1u8..16 {
            let mask = [m & 1 != 0, m & 2 != 0, m & 4 != 0, m & 8 != 0];
            if mask.iter().filter(|&&b| b).count() > samples.len() {
                continue;
            }
            let Some(w) = solve(&rows, &y, &mask, &scale) else { continue };
            if w.iter().any(|&x| x < 0.0) {
                continue;
            }
            let err: f64 = rows.iter().zip(&y).map(|(r, yi)| (r.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() - yi).powi(2)).sum();
            if best.is_none_or(|(e, _)| err < e) {
                best = Some((err, w));
            }
        }
        best.map(|(_, weights)| Surrogate { weights })
    }

    pub fn predict(&self, f: &Features) -> f64 {
        row(f).iter().zip(&self.weights).map(|(a, b)| a * b).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_surrogate_recovers_a_linear_cost() {
        let truth = |f: &Features| 0.5 + 2e-9 * f.flops + 1e-3 * f.steps;
        let samples: Vec<(Features, f64)> = [(1e9, 10.0), (2e9, 400.0), (4e9, 30.0), (1e9, 900.0), (3e9, 77.0)]
            .into_iter()
            .map(|(flops, steps)| {
                let f = Features { flops, steps, sliced_bytes: 1e6, ..Default::default() };
                (f, truth(&f))
            })
            .collect();
        let s = Surrogate::fit(&samples).expect("fits");
        let probe = Features { flops: 5e9, steps: 50.0, sliced_bytes: 1e6, ..Default::default() };
        assert!(approx::relative_eq!(s.predict(&probe), truth(&probe), max_relative = 1e-6), "{} vs {}", s.predict(&probe), truth(&probe));
    }

    #[test]
    fn tiles_pad_the_last_two_dims() {
        assert_eq!(tile_padded_bytes(&[100, 100], DType::F32), 104 * 128 * 4);
        assert_eq!(tile_padded_bytes(&[100, 100], DType::BF16), 112 * 128 * 2);
        assert_eq!(tile_padded_bytes(&[2, 3, 128], DType::F32), 2 * 8 * 128 * 4);
    }
}
