"""Which attention weights torchtpu's dropout keeps, written independently of the kernels in
numpy from the documented generator (``torchtpu_dsl::random``): MurmurHash3's 32-bit
finalizer over a key from (seed, head) and a counter ``row * kv_len + col``."""

import math

import numpy as np
import torch


def _mix(x):
    x = x.astype(np.uint64) & 0xFFFFFFFF
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        x ^= x >> shift
        if multiplier is not None:
            x = (x * multiplier) & 0xFFFFFFFF
    return x


def keep_mask(seed: int, heads: int, q_len: int, kv_len: int, rate: float) -> torch.Tensor:
    """Boolean ``[heads, q_len, kv_len]``: head ``n`` is ``batch * heads_per_batch + head`` of
    the kernels' ``[batch, heads, ...]`` layout."""
    key = np.zeros(heads, dtype=np.uint64)
    key = _mix(key ^ np.uint64(seed & 0xFFFFFFFF))
    key = _mix(key ^ np.arange(heads, dtype=np.uint64))
    rows = np.arange(q_len, dtype=np.uint64)[:, None]
    cols = np.arange(kv_len, dtype=np.uint64)[None, :]
    counter = (rows * np.uint64(kv_len) + cols) & 0xFFFFFFFF
    bits = _mix(key[:, None, None] ^ _mix(counter)[None])
    # Halves round up, as Rust's f64::round does for positive numbers (Python's round() would
    # round them to even).
    threshold = math.floor(min(max(rate, 0.0), 1.0) * (1 << 24) + 0.5)
    return torch.from_numpy((bits >> 8).astype(np.int64) >= threshold)


def seed_after(manual_seed: int) -> int:
    """The seed ``torchtpu.flash_attention`` draws for dropout right after
    ``torch.manual_seed(manual_seed)``: its first draw from PyTorch's default generator."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64))
