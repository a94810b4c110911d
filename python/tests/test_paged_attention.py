"""torchtpu.ragged_paged_attention against a reference that gathers each sequence's pages and
runs masked attention in f64 (SDPA with the bottom-right causal mask): mixes of decode and
prefill sequences, page sizes 16/32/128, a sequence shorter than a page and one over 100 pages,
grouped-query heads, sliding window, soft-cap, f32 and bf16; torch's op checks; torch.compile;
bad tables."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchtpu


def batch(rng, seqs, *, tokens, page_size, pages_per_seq, q_heads=4, kv_heads=2, head_dim=128, dtype=torch.float32, spare_pages=3):
    """Inputs for sequences of (new queries, cache length) over shuffled distinct pages."""
    max_seqs = len(seqs) + 1
    num_pages = max_seqs * pages_per_seq + spare_pages
    q = torch.randn(tokens, q_heads, head_dim, generator=rng).to(dtype)
    kv_pages = torch.randn(num_pages, page_size, 2 * kv_heads, head_dim, generator=rng).to(dtype)
    page_indices = torch.randperm(num_pages, generator=rng)[: max_seqs * pages_per_seq].reshape(max_seqs, pages_per_seq).int()
    kv_lens = torch.tensor([kv for _, kv in seqs] + [0], dtype=torch.int32)
    # The spare last sequence row is empty: its offsets repeat the total.
    ends = list(itertools.accumulate(q_len for q_len, _ in seqs))
    cu_q_lens = torch.tensor([0, *ends, ends[-1]], dtype=torch.int32)
    num_seqs = torch.tensor([len(seqs)], dtype=torch.int32)
    return q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs


def reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=1.0, sliding_window=None, soft_cap=None):
    """Each sequence's pages gathered into k and v, then attention with its masks, in f64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    page_size, kv_heads = kv_pages.shape[1], kv_pages.shape[2] // 2
    group = q.shape[1] // kv_heads
    for s in range(int(num_seqs[0])):
        start, end, kv_len = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        pages = page_indices[s, : math.ceil(kv_len / page_size)].long()
        cache = kv_pages[pages].double().reshape(-1, 2 * kv_heads, q.shape[2])[:kv_len]
        k = cache[:, 0::2].repeat_interleave(group, 1).transpose(0, 1)
        v = cache[:, 1::2].repeat_interleave(group, 1).transpose(0, 1)
        qs = q[start:end].double().transpose(0, 1)
        scores = qs @ k.transpose(1, 2) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        position = torch.arange(end - start)[:, None] + (kv_len - (end - start))
        key = torch.arange(kv_len)[None, :]
        visible = key <= position
        if sliding_window is not None:
            visible &= key > position - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 32, 128])
def test_decode_and_prefill_mix_matches_f64(rng, page_size, dtype):
    # Decode shorter than a page, a whole prefill, a chunk of a longer prefill, decodes.
    seqs = [(1, 5), (20, 20), (7, 90), (1, 33), (1, 1)]
    args = batch(rng, seqs, tokens=40, page_size=page_size, pages_per_seq=math.ceil(96 / page_size), dtype=dtype)
    out = torchtpu.ragged_paged_attention(*args, sm_scale=0.125)
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(*args, sm_scale=0.125), **TOL[dtype])


def test_over_a_hundred_pages_matches_f64(rng):
    args = batch(rng, [(3, 1700), (1, 2048), (16, 16)], tokens=24, page_size=16, pages_per_seq=128)
    torch.testing.assert_close(torchtpu.ragged_paged_attention(*args, sm_scale=0.1).double(), reference(*args, sm_scale=0.1), **TOL[torch.float32])


@pytest.mark.parametrize("sliding_window,soft_cap", [(24, None), (None, 5.0), (1, 30.0)])
def test_sliding_window_and_soft_cap(rng, sliding_window, soft_cap):
    args = batch(rng, [(9, 60), (1, 77), (12, 12)], tokens=24, page_size=16, pages_per_seq=5, q_heads=8, kv_heads=1)
    args = (args[0] * 4, *args[1:])
    kw = dict(sm_scale=0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    torch.testing.assert_close(torchtpu.ragged_paged_attention(*args, **kw).double(), reference(*args, **kw), **TOL[torch.float32])


def test_matches_sdpa_for_one_prefill(rng):
    """One whole prefill is SDPA with a causal mask over the sequence's cache."""
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch(rng, [(48, 48)], tokens=48, page_size=16, pages_per_seq=3)
    out = torchtpu.ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=1 / math.sqrt(128))
    cache = kv_pages[page_indices[0].long()].reshape(48, 4, 128)
    k, v = cache[:, 0::2].transpose(0, 1), cache[:, 1::2].transpose(0, 1)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


def test_padding_rows_and_no_sequences_give_zeros(rng):
    args = batch(rng, [(2, 10)], tokens=16, page_size=16, pages_per_seq=1)
    out = torchtpu.ragged_paged_attention(*args)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    none = torchtpu.ragged_paged_attention(*args[:5], torch.tensor([0], dtype=torch.int32))
    assert torch.equal(none, torch.zeros_like(none))


def test_opcheck(rng):
    args = batch(rng, [(3, 20), (1, 7)], tokens=8, page_size=16, pages_per_seq=2)
    opcheck(torch.ops.torchtpu.ragged_paged_attention.default, (*args, 0.125, None, None))
    opcheck(torch.ops.torchtpu.ragged_paged_attention.default, (*args, 0.125, 8, 20.0))


def test_compiles_fullgraph(rng):
    args = batch(rng, [(3, 20), (1, 7)], tokens=8, page_size=16, pages_per_seq=2)
    fn = torch.compile(lambda *a: torchtpu.ragged_paged_attention(*a, sm_scale=0.125) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*args).double(), reference(*args, sm_scale=0.125) * 2, **TOL[torch.float32])


def test_bad_tables_are_clear_errors(rng):
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch(rng, [(4, 30), (2, 2)], tokens=8, page_size=16, pages_per_seq=2)
    run = lambda **over: torchtpu.ragged_paged_attention(  # noqa: E731
        *[over.get(n, t) for n, t in zip(("q", "kv_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"), (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs))]
    )
    with pytest.raises(ValueError, match="num_seqs is 4"):
        run(num_seqs=torch.tensor([4]))
    with pytest.raises(ValueError, match="kv_len >= q_len"):
        run(kv_lens=torch.tensor([3, 2, 0]))
    with pytest.raises(ValueError, match="needs 3 pages"):
        run(kv_lens=torch.tensor([40, 2, 0]))
    with pytest.raises(ValueError, match="needs .* pages"):
        run(kv_lens=torch.tensor([2**40, 2, 0]))
    with pytest.raises(ValueError, match="the cache has pages 0..9"):
        run(page_indices=torch.full((3, 2), 9))
    with pytest.raises(ValueError, match="within q's 8 tokens"):
        run(cu_q_lens=torch.tensor([0, 4, 9, 9]))
    with pytest.raises(ValueError, match="kv_lens must have shape \\[3\\]"):
        run(kv_lens=torch.tensor([30, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        run(kv_lens=torch.tensor([30.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="one dtype"):
        run(q=q.bfloat16())
    with pytest.raises(ValueError, match="2 \\* kv_heads"):
        run(kv_pages=kv_pages[:, :, :3])
    with pytest.raises(ValueError, match="multiple of 8"):
        torchtpu.ragged_paged_attention(q, kv_pages[:, :12].contiguous(), kv_lens, page_indices, cu_q_lens, num_seqs)
    with pytest.raises(ValueError, match="soft_cap must be positive"):
        torchtpu.ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, soft_cap=-1.0)
