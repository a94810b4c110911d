//! Ragged paged attention for serving (vLLM's TPU kernel, v2 layout): a batch of sequences,
//! each with some new query tokens (decode 1, prefill or a chunk of it many) concatenated in
//! `q`, attending causally (bottom-right: a sequence's last query sees its last key) to keys
//! and values in a paged cache `kv_pages [pages, page_size, 2 · kv_heads, head_dim]` (k and v
//! of kv head `h` at `2h` and `2h + 1`; the kernel takes the same memory as `[pages,
//! page_size, 2 · kv_heads · head_dim]`), found through each sequence's row of `page_indices`.
//! Grouped-query heads, an optional sliding window and logit soft-cap.
//!
//! A program owns one kv head and a block of `block_q` query tokens, which may hold the tail
//! of one sequence and the heads of others. As in vLLM's v3 kernel, the query heads that share
//! the kv head are folded into rows (`q` is taken as `[kv_heads, tokens · group, head_dim]`,
//! row `t · group + j` holding head `j` of token `t`), so that one dot serves the whole group.
//! The program walks the sequences that overlap its block and, for each, the sequence's kv
//! blocks (`pages_per_block` pages each), whose pages it copies from HBM itself,
//! double-buffered (the next block's copies in flight while it computes on this one). Each kv
//! block meets only the sequence's own rows, in aligned windows (up to 128 rows, the rest
//! sublane tiles), so that a decode step costs one tile of rows, not the whole block.
//! Online-softmax state is kept per row, so each row only ever sees its own sequence's keys.
//! The scalar tables (kv lengths, page indices, query offsets, the sequence count) are
//! scalar-prefetch operands; every index read from them is clamped into its array, so a bad
//! table cannot make a copy or a window leave its array (the host check refuses it with a
//! message).

use ndarray::{s, Array2, Array3, ArrayD, Ix2, Ix3};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use torchtpu_autotune::SearchSpace;
use torchtpu_dsl::ir::ValueType;
use torchtpu_dsl::prelude::*;
use torchtpu_dsl::{sublanes, HostArray, PallasCall, LANES};

use crate::flash::online_rescale;
use crate::op::{self, Op};
use crate::tables::{self, TableTarget};
use crate::Error;

/// The most query rows one window covers (the bulk of a long sequence's rows in a block).
const BIG_ROWS: usize = 128;

/// One batch: `tokens` query rows (every sequence's new tokens, in order, then padding) of
/// `q_heads` heads, a cache of `num_pages` pages of `page_size` tokens, up to `max_seqs`
/// sequences of up to `pages_per_seq` pages each.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PagedProblem {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_pages: usize,
    pub page_size: usize,
    pub max_seqs: usize,
    pub pages_per_seq: usize,
    pub dtype: DType,
    #[serde(with = "op::float")]
    pub sm_scale: f64,
    /// A query at position `p` sees keys `> p - window` (and `<= p`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Scores become `cap · tanh(score / cap)` (Gemma's logit soft-capping).
    #[serde(default, with = "op::float::option")]
    pub soft_cap: Option<f64>,
}

/// Query tokens per program and cache pages per kv block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedConfig {
    pub block_q: usize,
    pub pages_per_block: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedAttentionOp;

/// What the kernel knows at trace time.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Paging {
    group: usize,
    tokens: usize,
    block_q: usize,
    /// Query rows per window: the sublane tile, and the wide windows that cover the bulk of a
    /// long sequence's rows.
    small_rows: usize,
    big_rows: usize,
    pages_per_block: usize,
    page_size: usize,
    num_pages: usize,
    pages_per_seq: usize,
    max_seqs: usize,
    head_dim: usize,
    sm_scale: f32,
    window: Option<i32>,
    soft_cap: Option<f32>,
}

/// The copies of kv block `block` of sequence `seq` (k and v of kv head `head` together, page
/// by page) into buffer `slot`; pages past the sequence's table read its last entry, and
/// every page number is clamped into the cache. The cache is seen as `[pages, page_size,
/// 2 · kv_heads · head_dim]` (the same memory), so that a head's k and v are one lane-aligned
/// window of each token's row: a copy a TPU's DMA takes for any dtype.
#[allow(clippy::too_many_arguments)]
fn kv_copies<T: Float>(
    page_indices: &Prefetch<i32>,
    kv_pages: &Ref<T>,
    kv_buf: &Scratch<T>,
    sems: &Scratch<DmaSemaphore>,
    a: Paging,
    head: Scalar<i32>,
    seq: Scalar<i32>,
    block: Scalar<i32>,
    slot: Scalar<i32>,
) -> Vec<torchtpu_dsl::trace::refs::AsyncCopy> {
    let per = a.pages_per_block as i32;
    let width = 2 * a.head_dim;
    (0..a.pages_per_block)
        .map(|p| {
            let entry = minimum(block * per + p as i32, a.pages_per_seq as i32 - 1);
            let page = minimum(maximum(page_indices.get([seq, entry]), 0), a.num_pages as i32 - 1);
            let lanes = ds((head * width as i32).multiple_of(LANES as u32), width);
            async_copy(kv_pages.at((page, .., lanes)), kv_buf.at((slot, p, .., ..)), sems.at([slot * per + p as i32]))
        })
        .collect()
}

/// Which keys of a kv block a window's rows see: the sequence's rows `lo..hi` of the block,
/// keys before `kv_len`, and causally: key `k_start + j` is visible from row `r` (token
/// `r / group` of the block) when `(diagonal + j) * group <= r`, its position at most the
/// token's (multiplied out, so that no vector divides).
#[derive(Clone, Copy)]
struct Seen {
    lo: Scalar<i32>,
    hi: Scalar<i32>,
    k_start: Scalar<i32>,
    kv_len: Scalar<i32>,
    diagonal: Scalar<i32>,
}

/// One online-softmax step for the `rows` query rows of the block from `start` (a multiple of
/// the sublane tile) against kv block `k`, `v`.
#[tpu_fn]
#[allow(clippy::too_many_arguments)]
fn attend<T: Float>(
    q: &Ref<T>,
    k: Tile<T>,
    v: Tile<T>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc: &mut Scratch<f32>,
    start: Scalar<i32>,
    rows: usize,
    seen: Seen,
    a: Paging,
) {
    let keys = k.shape()[0];
    let start = start.multiple_of(a.small_rows as u32);
    let mut s = dot_nt(q.load_at((0, ds(start, rows), ..)), k) * a.sm_scale;
    if let Some(cap) = a.soft_cap {
        s = (s / cap).tanh() * cap;
    }
    let g = a.group as i32;
    let r = iota::<i32>([rows, keys], 0) + start;
    let j = iota::<i32>([rows, keys], 1);
    let mut visible = (r >= seen.lo) & (r < seen.hi) & (j + seen.k_start < seen.kv_len) & ((j + seen.diagonal) * g <= r);
    if let Some(window) = a.window {
        visible = visible & ((j + seen.diagonal + window) * g > r);
    }
    let s = select(visible, s, f32::NEG_INFINITY);
    let m_prev = m_scratch.load_at((ds(start, rows), 0..1));
    let l_prev = l_scratch.load_at((ds(start, rows), 0..1));
    let m_next = maximum(m_prev, s.max_keepdims(1));
    let alpha = online_rescale(m_prev, m_next);
    let p = select(visible, (s - m_next).exp(), 0.0);
    l_scratch.store_at((ds(start, rows), ..), (alpha * l_prev + p.sum_keepdims(1)).broadcast_to([rows, LANES]));
    m_scratch.store_at((ds(start, rows), ..), m_next.broadcast_to([rows, LANES]));
    acc.store_at((ds(start, rows), ..), acc.load_at((ds(start, rows), ..)) * alpha + dot(p.cast::<T>(), v));
}

#[tpu_kernel]
#[allow(clippy::too_many_arguments)]
fn ragged_paged_attention<T: Float>(
    kv_lens: &Prefetch<i32>,
    page_indices: &Prefetch<i32>,
    cu_q_lens: &Prefetch<i32>,
    num_seqs: &Prefetch<i32>,
    q: &Ref<T>,
    kv_pages: &Ref<T>,
    out: &mut Ref<T>,
    kv_buf: &mut Scratch<T>,
    sems: &mut Scratch<DmaSemaphore>,
    m_scratch: &mut Scratch<f32>,
    l_scratch: &mut Scratch<f32>,
    acc: &mut Scratch<f32>,
    a: Paging,
) {
    let (head, qi) = (program_id(0), program_id(1));
    let (bq, g, d) = (a.block_q as i32, a.group as i32, a.head_dim);
    let kv_block = (a.pages_per_block * a.page_size) as i32;
    let block_start = qi * bq;
    m_scratch.store(full(f64::NEG_INFINITY));
    l_scratch.store(zeros());
    acc.store(zeros());
    let sequences = minimum(maximum(num_seqs.get([0]), 0), a.max_seqs as i32);
    for seq in 0..sequences {
        // Clamped into q, so that the row windows below stay inside the block.
        let q_start = minimum(maximum(cu_q_lens.get([seq]), 0), a.tokens as i32);
        let q_end = minimum(maximum(cu_q_lens.get([seq + 1]), q_start), a.tokens as i32);
        if q_start < block_start + bq && q_end > block_start && q_end > q_start {
            let kv_len = minimum(maximum(kv_lens.get([seq]), 0), (a.pages_per_seq * a.page_size) as i32);
            let blocks = (kv_len + (kv_block - 1)) / kv_block;
            // The sequence's rows of this block, and the windows that cover them: whole
            // windows of `big_rows` from an aligned start, then sublane-tile windows.
            let lo = (maximum(q_start, block_start) - block_start) * g;
            let hi = (minimum(q_end, block_start + bq) - block_start) * g;
            let first = lo / a.small_rows as i32 * a.small_rows as i32;
            let big = (hi - first) / a.big_rows as i32;
            let rest = first + big * a.big_rows as i32;
            let small = (hi - rest + (a.small_rows as i32 - 1)) / a.small_rows as i32;
            // A row's token is `block_start + row / g`, its position in the sequence that plus
            // `shift` (the last query sits at kv_len - 1).
            let shift = kv_len - (q_end - q_start) - q_start;
            for block in 0..blocks {
                let slot = block % 2;
                if block == 0 {
                    for c in kv_copies(page_indices, kv_pages, kv_buf, sems, a, head, seq, block, slot) {
                        c.start();
                    }
                }
                if block + 1 < blocks {
                    for c in kv_copies(page_indices, kv_pages, kv_buf, sems, a, head, seq, block + 1, 1 - slot) {
                        c.start();
                    }
                }
                for c in kv_copies(page_indices, kv_pages, kv_buf, sems, a, head, seq, block, slot) {
                    c.wait();
                }
                let keys = a.pages_per_block * a.page_size;
                let k_start = block * kv_block;
                let k = kv_buf.load_at((slot, .., .., 0..d)).reshape([keys, d]);
                // Keys past kv_len are whatever the cache holds there: kept out of the dot.
                let key_rows = iota::<i32>([keys, d], 0) + k_start;
                let v = select(key_rows < kv_len, kv_buf.load_at((slot, .., .., d..2 * d)).reshape([keys, d]), 0.0);
                let seen = Seen { lo, hi, k_start, kv_len, diagonal: k_start - block_start - shift };
                for w in 0..big {
                    attend(q, k, v, m_scratch, l_scratch, acc, first + w * a.big_rows as i32, a.big_rows, seen, a);
                }
                for w in 0..small {
                    attend(q, k, v, m_scratch, l_scratch, acc, rest + w * a.small_rows as i32, a.small_rows, seen, a);
                }
            }
        }
    }
    // A row that saw no key (padding, or a sequence with no cache) gives zeros.
    let l = l_scratch.load_at((.., 0..1));
    out.store_at((0, .., ..), select(l == 0.0, 0.0, acc.load() / l).cast());
}

impl PagedProblem {
    fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// The fewest query tokens a block may hold: their rows (`group` per token) fill whole
    /// sublane tiles.
    fn token_tile(&self) -> usize {
        let tile = sublanes(self.dtype);
        (1..tile).find(|t| t * self.group() % tile == 0).unwrap_or(tile)
    }
}

/// The host check of the tables, what vLLM requires of them: offsets that stay within `q`,
/// each sequence's new tokens within its cache, and every page a sequence reads in the cache
/// and listed in its row. (Which sequence owns a page is the caller's bookkeeping: two
/// sequences may share one, as prefix caching does.)
pub fn check_tables(p: &PagedProblem, kv_lens: &[i64], page_indices: &Array2<i64>, cu_q_lens: &[i64], num_seqs: i64) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Shape(m));
    if num_seqs < 0 || num_seqs > p.max_seqs as i64 {
        return bad(format!("num_seqs is {num_seqs}; it must be in 0..={} (the rows of page_indices)", p.max_seqs));
    }
    if cu_q_lens.first().copied().unwrap_or(0) != 0 {
        return bad(format!("cu_q_lens must start at 0; got {}", cu_q_lens.first().copied().unwrap_or(0)));
    }
    for s in 0..num_seqs as usize {
        let (start, end, kv_len) = (cu_q_lens.get(s).copied().unwrap_or(0), cu_q_lens.get(s + 1).copied().unwrap_or(0), kv_lens.get(s).copied().unwrap_or(0));
        if end < start || end > p.tokens as i64 {
            return bad(format!("cu_q_lens[{}] is {end} after {start}: query offsets must not decrease and stay within q's {} tokens", s + 1, p.tokens));
        }
        if kv_len < end - start {
            return bad(format!("sequence {s} has {} new queries but kv_len {kv_len}: its new tokens must be in the cache (kv_len >= q_len)", end - start));
        }
        let pages = (kv_len as usize).div_ceil(p.page_size.max(1));
        if pages > p.pages_per_seq {
            return bad(format!("sequence {s}'s kv_len {kv_len} needs {pages} pages of {}; page_indices has {} per sequence", p.page_size, p.pages_per_seq));
        }
        // A row shorter than the pages it needs (a table of the wrong shape) reads as page -1.
        let page = |j: usize| page_indices.get([s, j]).copied().unwrap_or(-1);
        if let Some(j) = (0..pages).find(|&j| !(0..p.num_pages as i64).contains(&page(j))) {
            return bad(format!("page_indices[{s}, {j}] is {}; the cache has pages 0..{}", page(j), p.num_pages));
        }
    }
    Ok(())
}

/// Random tables for `p`: a mix of decode (one query) and prefill (many) sequences over
/// distinct random pages, queries filling as much of `tokens` as they can.
pub fn random_tables(p: &PagedProblem, rng: &mut StdRng) -> (Vec<i32>, Array2<i32>, Vec<i32>, i32) {
    let seqs = if p.max_seqs == 0 { 0 } else { rng.random_range(1..=p.max_seqs) };
    let capacity = p.pages_per_seq * p.page_size;
    let mut kv_lens = vec![0i32; p.max_seqs];
    let mut cu = vec![0i32; p.max_seqs + 1];
    let mut used = 0usize;
    for s in 0..seqs {
        let kv_len = rng.random_range(1..=capacity.max(1)).min(capacity);
        let room = p.tokens - used;
        let q_len = if rng.random_bool(0.5) { 1.min(room) } else { rng.random_range(0..=kv_len.min(room)) }.min(kv_len);
        kv_lens[s] = kv_len as i32;
        used += q_len;
        cu[s + 1] = used as i32;
    }
    for s in seqs..p.max_seqs {
        cu[s + 1] = used as i32;
    }
    let mut pages: Vec<i32> = (0..p.num_pages as i32).collect();
    let page_indices = Array2::from_shape_fn((p.max_seqs, p.pages_per_seq), |_| {
        let j = rng.random_range(0..pages.len().max(1));
        if pages.is_empty() {
            0
        } else {
            pages.swap_remove(j.min(pages.len() - 1))
        }
    });
    (kv_lens, page_indices, cu, seqs as i32)
}

/// The f64 reference: each sequence's pages gathered, masked attention per head. `q` and the
/// result are in the kernel's layout, `[kv_heads, tokens * group, head_dim]` (query head
/// `kvh * group + j` of token `t` at row `t * group + j` of `kvh`).
#[allow(clippy::too_many_arguments)]
pub fn reference(p: &PagedProblem, kv_lens: &[i64], page_indices: &Array2<i64>, cu_q_lens: &[i64], num_seqs: usize, q: &Array3<f64>, kv_pages: &Array3<f64>) -> Array3<f64> {
    let g = p.group();
    let mut out = Array3::<f64>::zeros((p.kv_heads, p.tokens * g, p.head_dim));
    for s in 0..num_seqs {
        // Clamped as the kernel clamps them: a bad table gives the kernel's answer, not a panic.
        let at = |t: &[i64], i: usize, hi: usize| t.get(i).map_or(0, |&x| x.clamp(0, hi as i64) as usize);
        let start = at(cu_q_lens, s, p.tokens);
        let end = at(cu_q_lens, s + 1, p.tokens).max(start);
        let kv_len = at(kv_lens, s, p.pages_per_seq * p.page_size);
        let q_len = (end - start).min(kv_len);
        for h in 0..p.q_heads {
            let (kvh, j) = (h / g, h % g);
            // Combined heads: k of kv head h at 2h, v at 2h + 1, each head_dim wide.
            let d = p.head_dim;
            let page = |t: usize| page_indices.get([s, t / p.page_size]).map_or(0, |&x| x.clamp(0, p.num_pages as i64 - 1) as usize);
            let key = |t: usize| kv_pages.slice(s![page(t), t % p.page_size, 2 * kvh * d..(2 * kvh + 1) * d]);
            let value = |t: usize| kv_pages.slice(s![page(t), t % p.page_size, (2 * kvh + 1) * d..(2 * kvh + 2) * d]);
            for i in 0..q_len {
                let position = kv_len - q_len + i;
                let row = q.slice(s![kvh, (start + i) * g + j, ..]);
                let seen: Vec<usize> = (0..=position).filter(|&t| p.sliding_window.is_none_or(|w| t + w > position)).collect();
                let scores: Vec<f64> = seen
                    .iter()
                    .map(|&t| {
                        let x = row.dot(&key(t)) * p.sm_scale;
                        p.soft_cap.map_or(x, |c| c * (x / c).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let mut o = out.slice_mut(s![kvh, (start + i) * g + j, ..]);
                for (w, &t) in weights.iter().zip(&seen) {
                    o.scaled_add(w / total, &value(t));
                }
            }
        }
    }
    out
}

fn int_table(a: &HostArray) -> Array2<i64> {
    a.to_f64().mapv(|x| x as i64).into_dimensionality::<Ix2>().unwrap_or_else(|_| Array2::zeros((0, 0)))
}

impl Op for PagedAttentionOp {
    type Problem = PagedProblem;
    type Config = PagedConfig;

    fn name(&self) -> &'static str {
        "ragged_paged_attention"
    }
    fn example(&self) -> PagedProblem {
        PagedProblem {
            tokens: 256,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            num_pages: 2048,
            page_size: 16,
            max_seqs: 64,
            pages_per_seq: 64,
            dtype: DType::BF16,
            sm_scale: 1.0 / (128f64).sqrt(),
            sliding_window: None,
            soft_cap: None,
        }
    }
    fn check(&self, p: &PagedProblem) -> Result<(), Error> {
        op::check_float_dtype("ragged_paged_attention", p.dtype)?;
        if p.kv_heads == 0 || p.q_heads % p.kv_heads != 0 {
            return Err(Error::Shape(format!("q_heads ({}) must be a positive multiple of kv_heads ({})", p.q_heads, p.kv_heads)));
        }
        if p.head_dim == 0 || p.head_dim % (LANES / 2) != 0 {
            return Err(Error::Shape(format!(
                "head_dim must be a positive multiple of {} (a head's k and v are copied as one lane-aligned window); got {}",
                LANES / 2,
                p.head_dim
            )));
        }
        if p.page_size == 0 || p.page_size % sublanes(p.dtype) != 0 {
            return Err(Error::Shape(format!("page_size must be a positive multiple of {} for {} (a page is whole tiles); got {}", sublanes(p.dtype), p.dtype, p.page_size)));
        }
        if p.num_pages == 0 || p.pages_per_seq == 0 {
            return Err(Error::Shape("the cache needs at least one page, and page_indices one per sequence".into()));
        }
        if p.sliding_window == Some(0) {
            return Err(Error::Shape("sliding_window must be at least 1 (a query sees itself)".into()));
        }
        if p.soft_cap.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return Err(Error::Shape(format!("soft_cap must be positive and finite; got {:?}", p.soft_cap)));
        }
        // The kernel compares positions times the group size in i32 (sizes from a user may be
        // anything: saturating, so that none wraps round into range).
        let capacity = p.pages_per_seq.saturating_mul(p.page_size);
        if capacity.saturating_add(p.tokens.saturating_mul(2)).saturating_mul(p.group().saturating_mul(2)) > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "(cache tokens per sequence + 2 · tokens) · 2 · (q_heads / kv_heads) must be below 2^31; got ({capacity} + 2 · {}) · 2 · {}",
                p.tokens,
                p.group()
            )));
        }
        Ok(())
    }
    fn tuning_problem(&self, p: &PagedProblem) -> PagedProblem {
        PagedProblem { sm_scale: 1.0, ..*p }
    }
    fn bucket(&self, p: &PagedProblem) -> String {
        format!("t{}d{}g{}p{}/{}", tables::bucket(p.tokens, 8, 8192), p.head_dim, p.group(), p.page_size, p.dtype)
    }
    fn space(&self, p: &PagedProblem) -> SearchSpace {
        let block_q: Vec<usize> =
            [1, 2, 4, 8, 16, 32, 64, 128, 256].into_iter().filter(|&b| b % p.token_tile() == 0 && b <= p.tokens.next_power_of_two().max(p.token_tile())).collect();
        let pages: Vec<usize> = [1, 2, 4, 8, 16, 32].into_iter().filter(|&n| n <= p.pages_per_seq && n * p.page_size <= 1024).collect();
        SearchSpace::new().param("block_q", block_q).param("pages_per_block", if pages.is_empty() { vec![1] } else { pages })
    }
    fn default_config(&self, p: &PagedProblem) -> PagedConfig {
        self.fit(p, PagedConfig { block_q: 32, pages_per_block: (512 / p.page_size.max(1)).max(1) })
    }
    fn fit(&self, p: &PagedProblem, c: PagedConfig) -> PagedConfig {
        if c.block_q == 0 || c.pages_per_block == 0 {
            return self.default_config(p);
        }
        let tile = p.token_tile();
        PagedConfig { block_q: c.block_q.min(p.tokens.div_ceil(tile) * tile).max(tile), pages_per_block: c.pages_per_block.min(p.pages_per_seq).max(1) }
    }
    fn call(&self, p: &PagedProblem, c: &PagedConfig) -> Result<PallasCall, Error> {
        let PagedConfig { block_q, pages_per_block } = *c;
        if block_q == 0 || block_q % p.token_tile() != 0 || pages_per_block == 0 {
            return Err(Error::Shape(format!(
                "block_q must be a positive multiple of {} (its {} rows per token fill {}-row tiles) and pages_per_block positive; got {c:?}",
                p.token_tile(),
                p.group(),
                sublanes(p.dtype)
            )));
        }
        if self.is_empty(p) {
            return Err(Error::Shape(format!("a kernel call needs query tokens (the host API handles none): {p:?}")));
        }
        let rows = block_q * p.group();
        let a = Paging {
            group: p.group(),
            tokens: p.tokens,
            block_q,
            small_rows: sublanes(p.dtype),
            big_rows: rows.min(BIG_ROWS),
            pages_per_block,
            page_size: p.page_size,
            num_pages: p.num_pages,
            pages_per_seq: p.pages_per_seq,
            max_seqs: p.max_seqs,
            head_dim: p.head_dim,
            sm_scale: p.sm_scale as f32,
            // A window as long as a sequence's cache hides nothing (and would overflow the
            // kernel's i32 comparisons).
            window: p.sliding_window.filter(|&w| w < p.pages_per_seq * p.page_size).map(|w| w as i32),
            soft_cap: p.soft_cap.map(|c| c as f32),
        };
        let kernel = match p.dtype {
            DType::F32 => ragged_paged_attention::kernel::<f32>(a),
            DType::BF16 => ragged_paged_attention::kernel::<bf16>(a),
            other => return Err(Error::Dtype(format!("ragged_paged_attention takes f32 or bf16, not {other}"))),
        };
        let d = p.head_dim;
        let q_block = BlockSpec::new([1, rows, d], |[h, i]| (h, i, 0));
        Ok(PallasCall::new(kernel)
            .grid([p.kv_heads, p.tokens.div_ceil(block_q)])
            .in_specs([q_block.clone(), BlockSpec::any()])
            .out_specs([q_block])
            .out_shapes([vec![p.kv_heads, p.tokens * p.group(), d]])
            .scratch([
                Vmem::new([2, pages_per_block, p.page_size, 2 * d]),
                DmaSemaphores::new(2 * pages_per_block),
                Vmem::new([rows, LANES]),
                Vmem::new([rows, LANES]),
                Vmem::new([rows, d]),
            ])
            .dimension_semantics([Parallel, Parallel])
            .name("ragged_paged_attention"))
    }
    fn operand_types(&self, p: &PagedProblem) -> Vec<ValueType> {
        vec![
            ValueType::new(DType::I32, [p.max_seqs]),
            ValueType::new(DType::I32, [p.max_seqs, p.pages_per_seq]),
            ValueType::new(DType::I32, [p.max_seqs + 1]),
            ValueType::new(DType::I32, [1]),
            ValueType::new(p.dtype, [p.kv_heads, p.tokens * p.group(), p.head_dim]),
            ValueType::new(p.dtype, [p.num_pages, p.page_size, 2 * p.kv_heads * p.head_dim]),
        ]
    }
    fn output_types(&self, p: &PagedProblem) -> Vec<ValueType> {
        vec![ValueType::new(p.dtype, [p.kv_heads, p.tokens * p.group(), p.head_dim])]
    }
    fn is_empty(&self, p: &PagedProblem) -> bool {
        p.tokens == 0 || p.q_heads == 0 || p.max_seqs == 0
    }
    fn check_tables(&self, p: &PagedProblem, tables: &[HostArray]) -> Result<(), Error> {
        match tables {
            [kv_lens, page_indices, cu_q_lens, num_seqs] => {
                check_tables(p, &op::table_values(kv_lens), &int_table(page_indices), &op::table_values(cu_q_lens), op::table_values(num_seqs).first().copied().unwrap_or(0))
            }
            _ => Err(Error::Shape(format!("ragged_paged_attention takes 4 tables (kv_lens, page_indices, cu_q_lens, num_seqs); got {}", tables.len()))),
        }
    }
    fn random_inputs(&self, p: &PagedProblem, rng: &mut StdRng) -> Vec<HostArray> {
        let (kv_lens, page_indices, cu, seqs) = random_tables(p, rng);
        let types = self.operand_types(p);
        let mut inputs = vec![
            HostArray::from(ndarray::Array1::from(kv_lens)),
            HostArray::from(page_indices),
            HostArray::from(ndarray::Array1::from(cu)),
            HostArray::from(ndarray::Array1::from(vec![seqs])),
        ];
        inputs.extend(types.iter().skip(4).map(|t| op::random_operand(rng, t)));
        inputs
    }
    fn reference(&self, p: &PagedProblem, inputs: &[HostArray]) -> Vec<ArrayD<f64>> {
        let [kv_lens, page_indices, cu, seqs, q, kv] = inputs else {
            return Vec::new();
        };
        let (Ok(q), Ok(kv)) = (q.to_f64().into_dimensionality::<Ix3>(), kv.to_f64().into_dimensionality::<Ix3>()) else {
            return Vec::new();
        };
        let seqs = op::table_values(seqs).first().copied().unwrap_or(0).max(0) as usize;
        vec![reference(p, &op::table_values(kv_lens), &int_table(page_indices), &op::table_values(cu), seqs, &q, &kv).into_dyn()]
    }
    fn table_problems(&self, target: TableTarget) -> Vec<PagedProblem> {
        let base = self.example();
        // Batches of 32 query tokens (decode-sized), the example's 256, and on the CPU 512
        // (each tuned on the op's random mixes of decode and prefill sequences).
        let (dtypes, tokens): (&[DType], &[usize]) = if target == TableTarget::Cpu { (&[DType::F32], &[32, 256, 512]) } else { (&[DType::BF16, DType::F32], &[32, 256]) };
        dtypes.iter().flat_map(|&dtype| tokens.iter().map(move |&tokens| PagedProblem { dtype, tokens, max_seqs: base.max_seqs.min(tokens), ..base })).collect()
    }
}
