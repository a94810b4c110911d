"""torchtpu.drop_in(): a transformer block written in plain PyTorch runs on our kernels with
outputs and gradients equal to plain PyTorch's; what our kernels cannot serve falls through."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchtpu


class Block(nn.Module):
    """A Llama-style block in plain PyTorch: RMS norm, attention from fused projections, a
    SwiGLU MLP; nothing in it knows torchtpu."""

    def __init__(self, dim=64, heads=4, hidden=172):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=True)
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        self.norm1, self.norm2 = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim)), nn.Parameter(torch.ones(dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        b, s, d = x.shape
        h = F.rms_norm(x, (d,), self.norm1, 1e-6)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        h = F.rms_norm(x, (d,), self.norm2, 1e-6)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.ln(x) @ torch.ones(d, 3)


def test_a_plain_pytorch_block_runs_on_our_kernels_with_torchs_results():
    torch.manual_seed(0)
    block = Block()
    ours = copy.deepcopy(block)
    x = torch.randn(2, 37, 64, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    want = block(x)
    with torchtpu.drop_in() as routed:
        got = ours(x_ours)
        got.backward(torch.ones_like(got))
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(block.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    # Every hot op of the block went to our kernels.
    assert routed.hits["scaled_dot_product_attention"] == 1
    assert routed.hits["linear"] == 5
    assert routed.hits["rms_norm"] == 2 and routed.hits["layer_norm"] == 1
    assert routed.hits["matmul"] >= 1


def test_what_our_kernels_cannot_serve_falls_through():
    q = torch.randn(1, 2, 8, 16)
    with torchtpu.drop_in() as routed:
        f64_attention = F.scaled_dot_product_attention(q.double(), q.double(), q.double())
        f64 = torch.randn(3, 4, dtype=torch.float64) @ torch.randn(4, 2, dtype=torch.float64)
        both = None
        try:
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
        except RuntimeError as e:  # SDPA refuses a mask with is_causal: its own error
            both = str(e)
        with_bad_shapes = None
        try:
            torch.matmul(torch.randn(3, 4), torch.randn(5, 2))
        except RuntimeError as e:  # PyTorch's own error, as without the routing
            with_bad_shapes = str(e)
    assert f64_attention.dtype == f64.dtype == torch.float64
    assert with_bad_shapes and "shapes cannot be multiplied" in with_bad_shapes
    assert routed.hits == {} or sum(routed.hits.values()) == 0
    assert routed.fallbacks["scaled_dot_product_attention: dtype"] == 1 and routed.fallbacks["matmul: dtype"] == 1
    assert both and "is_causal" in both and routed.fallbacks["scaled_dot_product_attention: attn_mask and is_causal"] == 1


def test_routing_under_torch_compile():
    torch.manual_seed(1)
    block = Block()
    x = torch.randn(1, 16, 64)
    want = block(x)
    with torchtpu.drop_in() as routed:
        got = torch.compile(block, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert routed.hits["scaled_dot_product_attention"] >= 1
