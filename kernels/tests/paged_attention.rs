//! Ragged paged attention against an f64 reference that gathers each sequence's pages and
//! runs masked attention per sequence: mixes of decode and (chunked) prefill sequences, page
//! sizes 16/32/128, sequences shorter than one page and longer than 100 pages, grouped-query
//! heads, head_dim 64 and 128, sliding window and soft-cap, f32 and bf16, on the interpreter (checked) and PJRT
//! CPU; tables that would read another sequence's pages or leave the cache refused; compiled
//! by libtpu for every chip.

mod common;

use ndarray::{Array1, Array2};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use torchtpu_dsl::{DType, HostArray};
use torchtpu_exec::Backend;
use torchtpu_kernels::op::{self, Op};
use torchtpu_kernels::paged_attention::{PagedAttentionOp, PagedConfig, PagedProblem};
use torchtpu_runtime::{Chip, TpuCompiler};

const OP: PagedAttentionOp = PagedAttentionOp;

fn problem(tokens: usize, page_size: usize, max_seqs: usize, pages_per_seq: usize, dtype: DType) -> PagedProblem {
    PagedProblem {
        tokens,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 128,
        num_pages: max_seqs * pages_per_seq + 3,
        page_size,
        max_seqs,
        pages_per_seq,
        dtype,
        sm_scale: 1.0 / (128f64).sqrt(),
        sliding_window: None,
        soft_cap: None,
    }
}

/// Inputs for sequences of (new queries, cache length), over distinct shuffled pages.
fn inputs(p: &PagedProblem, seqs: &[(usize, usize)], rng: &mut StdRng) -> Vec<HostArray> {
    let mut pages: Vec<i32> = (0..p.num_pages as i32).collect();
    pages.shuffle(rng);
    let page_indices = Array2::from_shape_fn((p.max_seqs, p.pages_per_seq), |(s, j)| pages[s * p.pages_per_seq + j]);
    let mut kv_lens = vec![0i32; p.max_seqs];
    let mut cu = vec![0i32; p.max_seqs + 1];
    for (s, &(q_len, kv_len)) in seqs.iter().enumerate() {
        kv_lens[s] = kv_len as i32;
        cu[s + 1] = cu[s] + q_len as i32;
    }
    for s in seqs.len()..p.max_seqs {
        cu[s + 1] = cu[s];
    }
    let mut all = OP.random_inputs(p, rng);
    all[0] = HostArray::from(Array1::from(kv_lens));
    all[1] = HostArray::from(page_indices);
    all[2] = HostArray::from(Array1::from(cu));
    all[3] = HostArray::from(Array1::from(vec![seqs.len() as i32]));
    all
}

fn seed() -> u64 {
    std::env::var("TORCHTPU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random())
}

#[test]
fn decode_and_prefill_mixes_match_f64() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // (new queries, cache length): decode shorter than a page, a whole prefill, a chunk of a
    // long prefill, decodes; then padding rows.
    let seqs = [(1, 5), (20, 20), (7, 90), (1, 33), (1, 1)];
    for page_size in [16, 32, 128] {
        for dtype in [DType::F32, DType::BF16] {
            let p = problem(40, page_size, 6, 96usize.div_ceil(page_size), dtype);
            let inputs = inputs(&p, &seqs, &mut rng);
            let small = PagedConfig { block_q: 16, pages_per_block: 2 };
            common::assert_matches_f64(&OP, &p, small, &inputs, dtype, 2.0, seed);
        }
    }
}

#[test]
fn sequences_of_over_a_hundred_pages_match_f64() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let p = problem(24, 16, 3, 128, DType::F32);
    let inputs = inputs(&p, &[(3, 1700), (1, 2048), (16, 16)], &mut rng);
    common::assert_matches_f64(&OP, &p, PagedConfig { block_q: 8, pages_per_block: 16 }, &inputs, DType::F32, 2.0, seed);
}

#[test]
fn sliding_window_soft_cap_and_head_groups_match_f64() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for (q_heads, kv_heads, head_dim) in [(8, 1, 128), (4, 4, 64)] {
        for (window, cap) in [(Some(24), None), (None, Some(5.0)), (Some(1), Some(30.0))] {
            let p = PagedProblem { q_heads, kv_heads, head_dim, sliding_window: window, soft_cap: cap, ..problem(32, 16, 4, 6, DType::F32) };
            // Scores of a few units, so that the cap bends them.
            let mut inputs = inputs(&p, &[(9, 60), (1, 77), (12, 12), (2, 40)], &mut rng);
            inputs[4] = HostArray::from_f64(DType::F32, &(inputs[4].to_f64() * 40.0));
            common::assert_matches_f64(&OP, &p, PagedConfig { block_q: 8, pages_per_block: 3 }, &inputs, DType::F32, 2.0, seed);
        }
    }
}

#[test]
fn row_windows_cover_unaligned_sequences_and_odd_groups() {
    // Heads folded into rows: 8 query heads per kv head with 32-token blocks (256 rows: two
    // whole 128-row windows, then tiles), and 3 per kv head (a token's rows straddle tiles);
    // sequences starting and ending mid-tile; a window longer than any cache.
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let seqs = [(3, 10), (37, 50), (1, 5), (0, 9), (20, 100)];
    for (q_heads, kv_heads, block_q) in [(8, 1, 32), (6, 2, 16)] {
        for dtype in [DType::F32, DType::BF16] {
            for window in [None, Some(1 << 40)] {
                let p = PagedProblem { q_heads, kv_heads, sliding_window: window, ..problem(64, 16, 6, 7, dtype) };
                let inputs = inputs(&p, &seqs, &mut rng);
                common::assert_matches_f64(&OP, &p, PagedConfig { block_q, pages_per_block: 2 }, &inputs, dtype, 2.0, seed);
            }
        }
    }
}

/// A random f32 serving batch (the op's own random tables) and a random config.
fn random_batch(rng: &mut StdRng) -> (PagedProblem, Vec<HostArray>, PagedConfig) {
    let p = problem(rng.random_range(1..64), 16, rng.random_range(1..8), rng.random_range(1..10), DType::F32);
    let inputs = OP.random_inputs(&p, rng);
    let config = PagedConfig { block_q: [4, 8, 16, 32][rng.random_range(0..4)], pages_per_block: rng.random_range(1..4) };
    (p, inputs, config)
}

#[test]
fn random_batches_match_f64() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..3 {
        let (p, inputs, config) = random_batch(&mut rng);
        common::assert_matches_f64(&OP, &p, config, &inputs, DType::F32, 2.0, seed);
    }
}

#[test]
fn bad_tables_are_errors() {
    let mut rng = StdRng::seed_from_u64(5);
    let p = problem(16, 16, 3, 4, DType::F32);
    let good = inputs(&p, &[(4, 30), (2, 2)], &mut rng);
    assert!(op::run(&OP, &p, None, &good, Backend::Interpret).is_ok());
    let with = |i: usize, a: HostArray| {
        let mut x = good.clone();
        x[i] = a;
        x
    };
    let cases = [
        (with(3, HostArray::from(Array1::from(vec![4]))), "num_seqs is 4"),
        (with(0, HostArray::from(Array1::from(vec![30, 1, 0]))), "kv_len 1"),
        (with(0, HostArray::from(Array1::from(vec![65, 2, 0]))), "needs 5 pages"),
        (with(2, HostArray::from(Array1::from(vec![0, 4, 3, 3]))), "must not decrease"),
        (with(2, HostArray::from(Array1::from(vec![0, 4, 17, 17]))), "within q's 16 tokens"),
        (with(2, HostArray::from(Array1::from(vec![1, 4, 6, 6]))), "must start at 0"),
        (with(1, HostArray::from(Array2::from_elem((3, 4), 99))), "the cache has pages 0..15"),
        (with(1, HostArray::from(Array2::from_elem((3, 4), -1))), "is -1"),
    ];
    for (bad, want) in cases {
        for backend in [Backend::Interpret, Backend::Cpu] {
            let err = op::run(&OP, &p, None, &bad, backend).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
    assert!(OP.check(&PagedProblem { q_heads: 3, ..p }).is_err());
    assert!(OP.check(&PagedProblem { page_size: 12, ..p }).is_err());
    assert!(OP.check(&PagedProblem { soft_cap: Some(f64::NAN), ..p }).is_err());
    assert!(OP.check(&PagedProblem { sliding_window: Some(0), ..p }).is_err());
    // Sizes whose product wraps round to 0 in usize are still too large.
    assert!(OP.check(&PagedProblem { page_size: 1 << 32, pages_per_seq: 1 << 32, ..p }).is_err());
    assert!(OP.check(&PagedProblem { tokens: usize::MAX, ..p }).is_err());
}

#[test]
fn clamped_tables_never_leave_the_cache() {
    // A table the host check refuses still runs inside the arrays when a kernel meets it
    // (as on a TPU, where the tables are not read on the host): no out-of-bounds copy.
    let mut rng = StdRng::seed_from_u64(6);
    let p = problem(16, 16, 2, 2, DType::F32);
    let mut bad = inputs(&p, &[(4, 20)], &mut rng);
    bad[1] = HostArray::from(Array2::from_elem((2, 2), 1_000_000));
    bad[0] = HostArray::from(Array1::from(vec![1_000_000, -5]));
    let out = OP.call(&p, &OP.default_config(&p)).expect("call").interpret_checked(&bad).expect("stays in bounds");
    // Two kv heads, each with its two query heads folded into rows.
    assert_eq!(out[0].shape(), &[2, 32, 128]);
}

#[test]
fn compiles_for_every_chip() {
    let compiler = TpuCompiler::shared().unwrap_or_else(|e| panic!("libtpu is required (run scripts/setup.sh): {e}"));
    let base = OP.example();
    for p in [
        base,
        PagedProblem { dtype: DType::F32, sliding_window: Some(128), soft_cap: Some(50.0), ..base },
        PagedProblem { tokens: 8, q_heads: 8, kv_heads: 8, page_size: 128, pages_per_seq: 8, ..base },
        PagedProblem { page_size: 32, ..base },
        PagedProblem { head_dim: 64, ..base },
        PagedProblem { head_dim: 64, dtype: DType::F32, ..base },
    ] {
        for chip in Chip::ALL {
            let module = op::tpu_module(&OP, &p, None, chip).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            compiler.compile(chip, &module.artifact).unwrap_or_else(|e| panic!("{p:?} on {chip}: {e}"));
        }
    }
}

/// The TPU model's integer-scalar reading of the index maps (`TracedCall::block_indices`)
/// finds the blocks the interpreter's run of the same maps finds, over random serving tables.
#[test]
fn the_models_block_indices_are_the_interpreters() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..3 {
        let (p, inputs, config) = random_batch(&mut rng);
        let config = OP.fit(&p, config);
        let traced = OP.call(&p, &config).expect("call").trace(&OP.operand_types(&p)).expect("traces");
        let tables = &inputs[..traced.prefetch.len()];
        assert_eq!(traced.block_indices(tables).expect("scalar maps"), traced.interpreted_block_indices(tables).expect("interpreted maps"), "{p:?} at {config:?} (seed {seed})");
    }
}
