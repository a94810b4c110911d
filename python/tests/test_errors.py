"""Bad input raises a clear Python error (never a crash), in eager mode and under fake tensors."""

import json

import pytest
import torch

import torchtpu


def qkv(b=1, h=4, hk=2, sq=16, sk=16, d=8, dtype=torch.float32):
    return torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hk, sk, d, dtype=dtype), torch.randn(b, hk, sk, d, dtype=dtype)


def test_attention_rejects_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"must be \[\.\.\., seq, head_dim\] with a batch dim"):
        torchtpu.flash_attention(q[0, 0], k, v)
    with pytest.raises(ValueError, match="do not broadcast"):
        torchtpu.flash_attention(*qkv(b=2)[:1], *qkv(b=3)[1:])
    with pytest.raises(ValueError, match="q's a multiple of k/v's"):
        torchtpu.flash_attention(*qkv(h=4, hk=3))
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        torchtpu.flash_attention(q, k, v, enable_gqa=False)
    with pytest.raises(ValueError, match=r"attn_mask \[3, 16\] does not broadcast to the attention scores \[1, 4, 16, 16\]"):
        torchtpu.flash_attention(q, k, v, attn_mask=torch.ones(3, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be boolean or floating point"):
        torchtpu.flash_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"dropout_p must be a probability in \[0, 1\]; got 1.5"):
        torchtpu.flash_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="causal must be False, True, 'top_left' or 'bottom_right'"):
        torchtpu.flash_attention(q, k, v, causal="lower_right")
    with pytest.raises(ValueError, match="k and v must both be"):
        torchtpu.flash_attention(q, k, v[:, :, :8])
    with pytest.raises(TypeError, match="torch.float64; torchtpu's kernels take torch.float32 or torch.bfloat16 or torch.float16"):
        torchtpu.flash_attention(*qkv(dtype=torch.float64))
    with pytest.raises(TypeError, match="must share a dtype"):
        torchtpu.flash_attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match=r"k is not contiguous.*\.contiguous\(\)"):  # the raw op; torchtpu.flash_attention copies
        torch.ops.torchtpu.flash_attention_forward(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, False, 1.0, None, None)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        torchtpu.flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\] = \[1, 16\]"):
        torchtpu.flash_attention(q, k, v, segment_ids=torch.zeros(1, 15, dtype=torch.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer tensor"):
        torchtpu.flash_attention(q, k, v, segment_ids=torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"kv_segment_ids must be \[batch, seq\] = \[1, 20\]"):
        torchtpu.flash_attention(*qkv(sk=20), segment_ids=torch.zeros(1, 16, dtype=torch.int32))


def test_matmul_rejects_bad_input():
    a, b = torch.randn(8, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match="a's last dimension must equal b's second-to-last"):
        torchtpu.matmul(a, b.T.contiguous())
    with pytest.raises(ValueError, match="matmul takes"):  # the raw op; torchtpu.matmul is torch.matmul's
        torch.ops.torchtpu.matmul(a[0], b)
    with pytest.raises(ValueError, match="do not broadcast"):
        torchtpu.matmul(torch.randn(2, 8, 4), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        torchtpu.matmul(torch.tensor(1.0), b)
    with pytest.raises(TypeError, match="torch.int32"):
        torchtpu.matmul(a.int(), b.int())
    with pytest.raises(ValueError, match="not contiguous"):
        torch.ops.torchtpu.matmul(a, torch.randn(3, 4).T)
    with pytest.raises(ValueError, match="one device"):
        torchtpu.matmul(a, b.to("meta"))


def test_errors_under_fake_tensors():
    # The fake implementations check shapes too, so torch.compile and torch.export fail early.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = qkv(h=4, hk=3)
        with pytest.raises(ValueError, match="multiple of k/v's"):
            torchtpu.flash_attention(q, k, v)
        with pytest.raises(ValueError, match="second-to-last"):
            torchtpu.matmul(torch.randn(8, 4), torch.randn(5, 3))


def test_native_module_checks_memory_itself():
    # The native functions are reachable directly: they re-check what makes raw memory sound.
    from torchtpu import _torchtpu

    a, b = torch.randn(8, 4), torch.randn(4, 3)
    problem = json.dumps({"batch": None, "m": 8, "n": 3, "k": 4, "dtype": "f32", "transpose_b": False})
    with pytest.raises(ValueError, match=r"operand 1 must be f32 \[4, 3\]; got f32 \[3, 4\]"):
        _torchtpu.op_run("matmul", problem, [a, b.T.contiguous()])
    with pytest.raises(ValueError, match="not contiguous"):
        _torchtpu.op_run("matmul", problem, [a, torch.randn(3, 4).T])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _torchtpu.op_run("matmul", problem, [a, [1, 2]])
    with pytest.raises(ValueError, match="no op `nope`"):
        _torchtpu.op_run("nope", problem, [a, b])
    with pytest.raises(ValueError, match="not JSON"):
        _torchtpu.op_run("matmul", "{", [a, b])
    (out,) = (torch.from_dlpack(c) for c in _torchtpu.op_run("matmul", problem, [a, b]))
    torch.testing.assert_close(out, a @ b)
    q = torch.randn(1, 2, 8, 4)
    out = torchtpu.flash_attention(q, q, q)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"lse must be float32 \[1, 2, 8\]"):
        torch.ops.torchtpu.flash_attention_backward(q, q, q, out, out, lse, False, 0.5, None, None)


def test_outputs_are_fresh_writable_tensors():
    # Outputs are tensors over the memory the kernel wrote: owned by torch from then on.
    a, b = torch.randn(8, 4), torch.randn(4, 3)
    first, second = torchtpu.matmul(a, b), torchtpu.matmul(a, b)
    assert first.data_ptr() != second.data_ptr()
    first.add_(1)
    torch.testing.assert_close(first - 1, second)
    del second
    torch.testing.assert_close(first - 1, a @ b)
