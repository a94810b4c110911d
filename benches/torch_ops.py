"""Our PyTorch ops against PyTorch's own CPU kernels, side by side in one run.

    ~/.cache/torchtpu/venv/bin/python benches/torch_ops.py [--reps N]

Measures torch.ops.torchtpu.flash_attention against scaled_dot_product_attention (1x8x2048x128
causal f32, forward and forward+backward) and torch.ops.torchtpu.matmul against torch.matmul
(1024^3 f32, forward and forward+backward). Each pair alternates run by run so both see the
same machine state; reports medians and the ratio ours / PyTorch's.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'problem':<44} {'torchtpu ms':>12} {'pytorch ms':>12} {'ratio':>7}")

    q, k, v = (torch.randn(1, 8, 2048, 128, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 8, 2048, 128)

    def ours_fwd():
        with torch.no_grad():
            torchtpu.flash_attention(q, k, v, causal=True)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours_train():
        torch.autograd.grad(torchtpu.flash_attention(q, k, v, causal=True), (q, k, v), grad)

    def sdpa_train():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)

    a, b = torch.randn(1024, 1024, requires_grad=True), torch.randn(1024, 1024, requires_grad=True)
    g = torch.randn(1024, 1024)

    def ours_mm():
        with torch.no_grad():
            torchtpu.matmul(a, b)

    def torch_mm():
        with torch.no_grad():
            torch.matmul(a, b)

    def ours_mm_train():
        torch.autograd.grad(torchtpu.matmul(a, b), (a, b), g)

    def torch_mm_train():
        torch.autograd.grad(torch.matmul(a, b), (a, b), g)

    for name, ours, theirs in [
        ("attention 1x8x2048x128 causal f32 forward", ours_fwd, sdpa_fwd),
        ("attention 1x8x2048x128 causal f32 fwd+bwd", ours_train, sdpa_train),
        ("matmul 1024^3 f32 forward", ours_mm, torch_mm),
        ("matmul 1024^3 f32 fwd+bwd", ours_mm_train, torch_mm_train),
    ]:
        mine, pytorch = median_ms([ours, theirs], args.reps)
        print(f"{name:<44} {mine:>12.1f} {pytorch:>12.1f} {mine / pytorch:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
