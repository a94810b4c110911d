"""The ops under torch.compile(fullgraph=True), static and dynamic, and torch.export programs
that load in a fresh process (through torch's backend autoload, without `import torchtpu`)."""

import os
import subprocess
import sys
import textwrap

import torch

import torchtpu


class Block(torch.nn.Module):
    """Attention followed by a projection, both through our ops."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, q, k, v):
        o = torchtpu.flash_attention(q, k, v, causal=True)
        b, h, s, d = o.shape
        return torchtpu.matmul(o.reshape(b * h, s, d), self.w.expand(b * h, d, d).contiguous())


def inputs(gen, s, h=4, hk=2, d=16):
    return torch.randn(1, h, s, d, generator=gen), torch.randn(1, hk, s, d, generator=gen), torch.randn(1, hk, s, d, generator=gen)


def test_compile_fullgraph_static(rng):
    block = Block(16)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    q, k, v = (t.requires_grad_() for t in inputs(rng, 40))
    out = compiled(q, k, v)
    torch.testing.assert_close(out, block(q, k, v))
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    block(q, k, v).sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_dynamic_compiles_once(rng):
    torch._dynamo.reset()
    block = Block(16)
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counting_backend)
    for s in (24, 57, 130):
        args = inputs(rng, s)
        torch.testing.assert_close(compiled(*args), block(*args))
    assert len(frames) == 1, f"recompiled for new sequence lengths: {len(frames)} graphs"
    targets = {str(n.target) for n in frames[0].graph.nodes if n.op == "call_function"}
    assert any("torchtpu" in t for t in targets), targets


def test_export_saves_and_loads_in_a_fresh_process(rng, tmp_path):
    block = Block(16)
    args = inputs(rng, 48)
    seq = torch.export.Dim("seq", min=2, max=4096)
    program = torch.export.export(block, args, dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("torchtpu.") for o in ops), ops
    path = tmp_path / "block.pt2"
    torch.export.save(program, path)
    other = inputs(rng, 75)
    torch.save((other, block(*other)), tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        program = torch.export.load({str(path)!r})
        assert "torchtpu" in sys.modules, "torch did not autoload torchtpu"
        args, want = torch.load({str(tmp_path / 'io.pt')!r})
        torch.testing.assert_close(program.module()(*args), want)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
