"""Our PyTorch ops against PyTorch's own CPU kernels, side by side in one run.

    ~/.cache/torchtpu/venv/bin/python benches/torch_ops.py [--reps N] [--only NAME]

Each case is an op of ours and the PyTorch code it replaces, at a realistic shape, forward
(under no_grad) and forward+backward (the gradients of every input that takes one): attention
(1x8x2048x128 causal, contiguous and as a projection's strided per-head view; with a key-padding
mask; causal with dropout 0.1) against scaled_dot_product_attention, matmul (1024^3, and
[4, 512, 1024] @ [1024, 1024]) against torch.matmul, x @ W.T against F.linear, RMS and layer norm (4096x4096) against F.rms_norm / F.layer_norm, SwiGLU and
GeGLU (4096x11008) against F.silu(g) * u / F.gelu(g) * u, the fused gated projection
(1024x2048 -> 5632) against F.silu(F.linear(x, Wg)) * F.linear(x, Wu), RoPE (1x32x4096x128) against HF's
q * cos + rotate_half(q) * sin, and the fused linear cross-entropy (2048 tokens x 1024 hidden x
32768 vocab) against F.cross_entropy(h @ W.T, t), and grouped matmul (2048 token-slots x 1024 ->
1408 over 8 experts, uneven, one idle) against a torch.matmul per group and against one bmm over
the groups padded to the largest; int8 linear layers (256 x 4096 -> 4096, scales per channel),
weight-only and w8a8, against dequantizing in PyTorch then F.linear; ragged paged attention
(32 heads, 8 kv heads, pages of 16: 32 decodes over 1-2k caches, and a mix of prefills and
decodes) against gathering each sequence's pages then SDPA (forward only: serving ops).
All f32. Each pair alternates run by run so
both see the same machine state; reports medians and the ratio ours / PyTorch's.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import torchtpu


def median_ms(fns, reps):
    """Median wall time (ms) of each function, running them alternately."""
    for fn in fns:
        fn()  # compile / warm up
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _matmul_per_group(lhs, rhs, sizes):
    return torch.cat([a @ w for a, w in zip(lhs.split(sizes.tolist()), rhs)])


def _padded_bmm(lhs, rhs, sizes):
    """The groups padded to the largest into one [g, rows, k] batch, one bmm, the rows taken back."""
    longest = int(sizes.max())
    padded = lhs.new_zeros(len(sizes), longest, lhs.shape[1])
    rows = torch.arange(longest)[None, :] < sizes[:, None]
    padded[rows] = lhs
    return torch.bmm(padded, rhs)[rows]


def _dequantize_then_linear(x, weight, weight_scale, x_scale=None):
    w = weight.to(torch.float32) * weight_scale[:, None]
    if x_scale is not None:
        x = x.to(torch.float32) * x_scale[:, None]
    return F.linear(x, w)


def _gather_then_sdpa(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale):
    """Each sequence's pages gathered into k and v, then SDPA (bottom-right causal) per sequence."""
    out = torch.zeros_like(q)
    page_size, kv_heads = kv_pages.shape[1], kv_pages.shape[2] // 2
    for s in range(int(num_seqs[0])):
        start, end, kv_len = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        cache = kv_pages[page_indices[s, : -(-kv_len // page_size)].long()].reshape(-1, 2 * kv_heads, q.shape[2])[:kv_len]
        k, v = cache[:, 0::2].transpose(0, 1), cache[:, 1::2].transpose(0, 1)
        mask = torch.ones(end - start, kv_len, dtype=torch.bool).tril(kv_len - (end - start))
        out[start:end] = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True).transpose(0, 1)
    return out


def _paged_batch(seqs, page_size=16, q_heads=32, kv_heads=8, head_dim=128):
    """A serving batch of sequences (new queries, cache length) over shuffled pages."""
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs)
    num_pages = len(seqs) * pages_per_seq
    ends = [0]
    for q_len, _ in seqs:
        ends.append(ends[-1] + q_len)
    return (
        torch.randn(ends[-1], q_heads, head_dim),
        torch.randn(num_pages, page_size, 2 * kv_heads, head_dim),
        torch.tensor([kv for _, kv in seqs], dtype=torch.int32),
        torch.randperm(num_pages).reshape(len(seqs), pages_per_seq).int(),
        torch.tensor(ends, dtype=torch.int32),
        torch.tensor([len(seqs)], dtype=torch.int32),
    )


def cases():
    """(name, ours, theirs, inputs): ``ours`` and ``theirs`` map the inputs to one tensor."""
    q, k, v = (torch.randn(1, 8, 2048, 128) for _ in range(3))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    padding = torch.ones(1, 1, 1, 2048, dtype=torch.bool)
    padding[..., 1748:] = False  # the last 300 keys are padding
    qs, ks, vs = (t.view(1, 2048, 8, 128).transpose(1, 2) for t in torch.randn(1, 2048, 3 * 1024).split(1024, dim=-1))
    acts = torch.randn(4, 512, 1024)
    x, w, bias = torch.randn(4096, 4096), torch.randn(4096), torch.randn(4096)
    gate, up = torch.randn(4096, 11008), torch.randn(4096, 11008)
    xm, w_gate, w_up = torch.randn(1024, 2048), torch.randn(5632, 2048) / 45, torch.randn(5632, 2048) / 45
    xq = torch.randn(1, 32, 4096, 128)
    angles = torch.arange(4096)[:, None] * (1.0 / 10000.0 ** (torch.arange(0, 128, 2) / 128))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    h, lm_head = torch.randn(2048, 1024), torch.randn(32768, 1024) / 32
    target = torch.randint(0, 32768, (2048,))
    tokens, experts = torch.randn(2048, 1024), torch.randn(8, 1024, 1408) / 32
    # A router's uneven split of 2048 token-slots over 8 experts, one of them idle.
    group_sizes = torch.tensor([412, 97, 0, 388, 260, 301, 178, 412])
    w_int8 = torch.randint(-128, 128, (4096, 4096), dtype=torch.int8)
    w_scale = torch.rand(4096) / 127
    x_int8, x_scale = torch.randint(-128, 128, (256, 4096), dtype=torch.int8), torch.rand(256) / 127
    decode = torch.randn(256, 4096)
    decode_batch = _paged_batch([(1, 1024 + 37 * i) for i in range(32)])
    mixed_batch = _paged_batch([(1, 900), (256, 256), (64, 1500), (1, 2000), (1, 40), (128, 700)])
    return [
        ("attention 1x8x2048x128 causal", lambda q, k, v: torchtpu.flash_attention(q, k, v, causal=True), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
        ("attention from a projection's strided view", lambda q, k, v: torchtpu.flash_attention(q, k, v, causal=True), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (qs, ks, vs)),
        ("attention 1x8x2048x128 key-padding mask", lambda q, k, v: torchtpu.flash_attention(q, k, v, attn_mask=padding), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=padding), (q, k, v)),
        ("attention 1x8x2048x128 causal dropout 0.1", lambda q, k, v: torchtpu.flash_attention(q, k, v, causal=True, dropout_p=0.1), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1), (q, k, v)),
        ("matmul 1024^3", torchtpu.matmul, torch.matmul, (a, b)),
        ("matmul [4, 512, 1024] @ [1024, 1024]", torchtpu.matmul, torch.matmul, (acts, b)),
        ("linear [4, 512, 1024] x W[1024, 1024].T", lambda x, w: torchtpu.matmul(x, w.T), F.linear, (acts, b)),
        ("rms_norm 4096x4096", lambda x, w: torchtpu.rms_norm(x, (4096,), w), lambda x, w: F.rms_norm(x, (4096,), w), (x, w)),
        ("layer_norm 4096x4096", lambda x, w, b: torchtpu.layer_norm(x, (4096,), w, b), lambda x, w, b: F.layer_norm(x, (4096,), w, b), (x, w, bias)),
        ("swiglu 4096x11008", torchtpu.swiglu, lambda g, u: F.silu(g) * u, (gate, up)),
        ("geglu 4096x11008", torchtpu.geglu, lambda g, u: F.gelu(g) * u, (gate, up)),
        ("glu_linear 1024x2048->5632 silu", torchtpu.glu_linear, lambda x, g, u: F.silu(F.linear(x, g)) * F.linear(x, u), (xm, w_gate, w_up)),
        ("rope 1x32x4096x128", lambda x: torch.ops.torchtpu.rope_forward(x, cos, sin), lambda x: x * cos + _rotate_half(x) * sin, (xq,)),
        ("linear_cross_entropy 2048x1024x32768", lambda h, w: torchtpu.linear_cross_entropy(h, w, target), lambda h, w: F.cross_entropy(h @ w.T, target), (h, lm_head)),
        ("gmm 2048x1024x1408 g8 vs matmul per group", lambda a, w: torchtpu.gmm(a, w, group_sizes), lambda a, w: _matmul_per_group(a, w, group_sizes), (tokens, experts)),
        ("gmm 2048x1024x1408 g8 vs padded bmm", lambda a, w: torchtpu.gmm(a, w, group_sizes), lambda a, w: _padded_bmm(a, w, group_sizes), (tokens, experts)),
        ("int8 weight-only linear 256x4096->4096", lambda x: torchtpu.quantized_linear(x, w_int8, w_scale), lambda x: _dequantize_then_linear(x, w_int8, w_scale), (decode,)),
        ("paged attention: 32 decodes, 1-2k cache", lambda: torchtpu.ragged_paged_attention(*decode_batch, sm_scale=0.088), lambda: _gather_then_sdpa(*decode_batch, 0.088), ()),
        ("paged attention: prefill+decode mix", lambda: torchtpu.ragged_paged_attention(*mixed_batch, sm_scale=0.088), lambda: _gather_then_sdpa(*mixed_batch, 0.088), ()),
        ("w8a8 linear 256x4096->4096", lambda: torchtpu.quantized_linear(x_int8, w_int8, w_scale, x_scale=x_scale), lambda: _dequantize_then_linear(x_int8, w_int8, w_scale, x_scale), ()),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'problem (f32)':<48} {'torchtpu ms':>12} {'pytorch ms':>12} {'ratio':>7}")
    for name, ours, theirs, inputs in cases():
        if args.only and args.only not in name:
            continue
        leaves = [t.detach().requires_grad_() for t in inputs]
        grad = torch.randn_like(theirs(*inputs))

        def forward(fn):
            def run():
                with torch.no_grad():
                    fn(*inputs)

            return run

        def train(fn):
            return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)

        trainable = bool(inputs) and "int8" not in name
        for how, wrap in (("forward", forward), ("fwd+bwd", train))[: 2 if trainable else 1]:
            mine, pytorch = median_ms([wrap(ours), wrap(theirs)], args.reps)
            print(f"{name + ' ' + how:<48} {mine:>12.1f} {pytorch:>12.1f} {mine / pytorch:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
