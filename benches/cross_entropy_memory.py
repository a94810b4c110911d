"""Peak memory of the fused linear cross-entropy beside PyTorch's unfused one, one process each.

    ~/.cache/torchtpu/venv/bin/python benches/cross_entropy_memory.py [--tokens 8192] [--hidden 1024] [--vocab 128256] [--backward]

Each variant runs in a fresh interpreter on the same f32 inputs (h [tokens, hidden], W [vocab,
hidden], targets): torchtpu.linear_cross_entropy(h, W, t) and F.cross_entropy(h @ W.T, t), the
forward (and with --backward, the gradients of h and W). Reports the process's peak RSS, the
peak beyond what the process held once its inputs existed (the op's own memory, gradients
included), the time, and the loss (both must
agree).
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
import torchtpu

tokens, hidden, vocab, backward, fused = json.loads(sys.argv[1])
gen = torch.Generator().manual_seed(0)
h = torch.randn(tokens, hidden, generator=gen).requires_grad_(backward)
w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_(backward)
t = torch.randint(0, vocab, (tokens,), generator=gen)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
loss = torchtpu.linear_cross_entropy(h, w, t) if fused else F.cross_entropy(h @ w.T, t)
if backward:
    loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "base": base, "seconds": seconds, "loss": float(loss)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    print(f"{args.tokens} tokens x {args.hidden} hidden x {args.vocab} vocab, f32, {'forward+backward' if args.backward else 'forward'}; logits alone: {args.tokens * args.vocab * 4 / 2**30:.2f} GiB")
    print(f"{'variant':<34} {'peak RSS GiB':>13} {'above inputs GiB':>17} {'seconds':>8} {'loss':>10}")
    for name, fused in (("torchtpu.linear_cross_entropy", True), ("F.cross_entropy(h @ W.T, t)", False)):
        spec = json.dumps([args.tokens, args.hidden, args.vocab, args.backward, fused])
        done = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:<34} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        above = (r["peak"] - r["base"]) / 2**30
        print(f"{name:<34} {r['peak'] / 2**30:>13.2f} {above:>17.2f} {r['seconds']:>8.1f} {r['loss']:>10.5f}", flush=True)


if __name__ == "__main__":
    main()
