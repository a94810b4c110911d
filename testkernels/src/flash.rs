//! (d) Causal flash-attention forward with online softmax: running max, running sum and
//! accumulator in scratch, KV blocks along an `arbitrary` grid axis, blocks above the
//! diagonal skipped. Ragged sequence lengths mask the padded keys and values.

use ndarray::{ArrayD, Axis, Ix4};
use rand::rngs::StdRng;
use torchtpu_dsl::prelude::*;

use torchtpu_dsl::ir::ValueType;

use crate::{random_arrays, Example};

/// Pallas' mask value: large enough to vanish under `exp`, finite so `m - m` is never NaN.
pub const MASK_VALUE: f32 = -0.7 * f32::MAX;

/// Scratch rows are replicated across this many lanes, as TPU kernels keep them.
pub const LANES: usize = 128;

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
pub fn flash_attention<T: Float>(
    q: &Ref<T>,
    k: &Ref<T>,
    v: &Ref<T>,
    o: &mut Ref<T>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc_scratch: &mut Scratch<f32>,
    sm_scale: f32,
    seq_len: usize,
) {
    let (bq, d) = (q.shape()[0], q.shape()[1]);
    let bk = k.shape()[0];
    let (qi, kj) = (program_id(2), program_id(3));

    if kj == 0 {
        m_scratch.store(full(f64::NEG_INFINITY));
        l_scratch.store(zeros());
        acc_scratch.store(zeros());
    }

    let q_start = qi * bq as i32;
    let k_start = kj * bk as i32;
    // Causal: a KV block entirely right of this Q block's last row contributes nothing.
    if k_start <= q_start + (bq as i32 - 1) {
        let s = dot_nt(q.load(), k.load()) * sm_scale;
        let rows = iota::<i32>([bq, bk], 0) + q_start;
        let cols = iota::<i32>([bq, bk], 1) + k_start;
        let mut visible = rows >= cols;
        let mut vb = v.load();
        if seq_len % bk != 0 {
            visible = visible & (cols < seq_len as i32);
            let v_rows = iota::<i32>([bk, d], 0) + k_start;
            vb = select(v_rows < seq_len as i32, vb, 0.0);
        }
        let s = select(visible, s, MASK_VALUE);

        let m_prev = m_scratch.load_at((.., 0..1));
        let l_prev = l_scratch.load_at((.., 0..1));
        let m_next = maximum(m_prev, s.max_keepdims(1));
        let alpha = (m_prev - m_next).exp();
        let p = (s - m_next).exp();
        let l_next = alpha * l_prev + p.sum_keepdims(1);
        acc_scratch.store(acc_scratch.load() * alpha + dot(p.cast::<T>(), vb));
        m_scratch.store(m_next.broadcast_to([bq, LANES]));
        l_scratch.store(l_next.broadcast_to([bq, LANES]));
    }

    if kj == num_programs(3) - 1 {
        let l = l_scratch.load_at((.., 0..1));
        o.store((acc_scratch.load() / l).cast());
    }
}

pub struct Flash {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub dtype: DType,
}

impl Flash {
    pub fn sm_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

impl Example for Flash {
    fn name(&self) -> String {
        format!("flash_attention/{}/b{}h{}s{}d{}/bq{}bk{}", self.dtype, self.batch, self.heads, self.seq, self.head_dim, self.block_q, self.block_k)
    }

    fn call(&self) -> PallasCall {
        let (bq, bk, d) = (self.block_q, self.block_k, self.head_dim);
        let kernel = match self.dtype {
            DType::BF16 => flash_attention::kernel::<bf16>(self.sm_scale(), self.seq),
            _ => flash_attention::kernel::<f32>(self.sm_scale(), self.seq),
        };
        let shape = [self.batch, self.heads, self.seq, d];
        PallasCall::new(kernel)
            .grid([self.batch, self.heads, self.seq.div_ceil(bq), self.seq.div_ceil(bk)])
            .in_specs([
                BlockSpec::new([None, None, Some(bq), Some(d)], |[b, h, i, _]| (b, h, i, 0)),
                BlockSpec::new([None, None, Some(bk), Some(d)], |[b, h, _, j]| (b, h, j, 0)),
                BlockSpec::new([None, None, Some(bk), Some(d)], |[b, h, _, j]| (b, h, j, 0)),
            ])
            .out_specs([BlockSpec::new([None, None, Some(bq), Some(d)], |[b, h, i, _]| (b, h, i, 0))])
            .out_shapes([shape])
            .scratch([Vmem::new([bq, LANES]), Vmem::new([bq, LANES]), Vmem::new([bq, d])])
            .dimension_semantics([Parallel, Parallel, Parallel, Arbitrary])
    }

    fn operand_types(&self) -> Vec<ValueType> {
        vec![ValueType::new(self.dtype, [self.batch, self.heads, self.seq, self.head_dim]); 3]
    }

    fn random_inputs(&self, rng: &mut StdRng) -> Vec<HostArray> {
        random_arrays(rng, &self.operand_types())
    }

    fn reference(&self, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let [q, k, v] = [0, 1, 2].map(|i| inputs[i].to_f64().into_dimensionality::<Ix4>().expect("rank 4"));
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut out = ndarray::Array4::<f64>::zeros(q.raw_dim());
        for b in 0..self.batch {
            for h in 0..self.heads {
                let (qh, kh, vh) = (q.slice(ndarray::s![b, h, .., ..]), k.slice(ndarray::s![b, h, .., ..]), v.slice(ndarray::s![b, h, .., ..]));
                let mut s = qh.dot(&kh.t()) * scale;
                for (i, mut row) in s.axis_iter_mut(Axis(0)).enumerate() {
                    let m = row.iter().take(i + 1).fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if j <= i { (*x - m).exp() } else { 0.0 };
                    }
                    let total = row.sum();
                    row.mapv_inplace(|x| x / total);
                }
                out.slice_mut(ndarray::s![b, h, .., ..]).assign(&s.dot(&vh));
            }
        }
        vec![out.into_dyn()]
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
