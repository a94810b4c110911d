"""What a user passes the ops either works as PyTorch's own functions do or raises a clear
Python error: empty shapes, NaN, ids past int32, import order, and (with hypothesis) drawn
shapes, dtypes, strides, NaN/inf, segment ids and scales against an f64 reference."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchtpu


@pytest.mark.parametrize("first", ["torchtpu", "torch"])
def test_import_works_in_a_fresh_process_in_either_order(first):
    other = "torch" if first == "torchtpu" else "torchtpu"
    code = f"import {first}; import {other}; import torchtpu; print(torchtpu.matmul(torch.ones(2, 3), torch.ones(3, 4)).sum().item())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "24.0"


EMPTY_ATTENTION = [(0, 2, 2, 8, 8, 16), (1, 0, 0, 8, 8, 16), (1, 2, 1, 0, 8, 16), (1, 2, 1, 8, 0, 16), (2, 2, 2, 8, 5, 0)]


@pytest.mark.parametrize("b,h,hk,sq,sk,d", EMPTY_ATTENTION)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_attention_matches_sdpa_forward_and_backward(b, h, hk, sq, sk, d, causal):
    q = torch.randn(b, h, sq, d, requires_grad=True)
    k = torch.randn(b, hk, sk, d, requires_grad=True)
    v = torch.randn(b, hk, sk, d, requires_grad=True)
    out = torchtpu.flash_attention(q, k, v, causal=causal)
    assert out.shape == (b, h, sq, d) and bool((out == 0).all())
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and bool((t.grad == 0).all())
    torch._dynamo.reset()  # each parametrization is a fresh function to compile
    compiled = torch.compile(lambda q, k, v: torchtpu.flash_attention(q, k, v, causal=causal), fullgraph=True)
    assert compiled(q.detach(), k.detach(), v.detach()).shape == (b, h, sq, d)


@pytest.mark.parametrize("a_shape,b_shape", [((0, 4), (4, 3)), ((5, 0), (0, 3)), ((5, 4), (4, 0)), ((0, 5, 4), (0, 4, 3)), ((2, 5, 0), (2, 0, 3))])
def test_empty_matmul_matches_torch(a_shape, b_shape):
    a, b = torch.randn(a_shape, requires_grad=True), torch.randn(b_shape, requires_grad=True)
    out = torchtpu.matmul(a, b)
    torch.testing.assert_close(out, a.detach() @ b.detach())
    out.sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    torch._dynamo.reset()
    assert torch.compile(torchtpu.matmul, fullgraph=True)(a.detach(), b.detach()).shape == out.shape


def test_nan_reaches_the_output_where_sdpa_puts_it():
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    qn = q.clone()
    qn[0, 0, 5, 0] = float("nan")
    ours, theirs = torchtpu.flash_attention(qn, k, v), F.scaled_dot_product_attention(qn, k, v)
    assert torch.equal(ours.isnan(), theirs.isnan())
    kn = k.clone()
    kn[0, 1, 7, 3] = float("nan")
    ours, theirs = torchtpu.flash_attention(q, kn, v, causal=True), F.scaled_dot_product_attention(q, kn, v, is_causal=True)
    assert torch.equal(ours.isnan(), theirs.isnan())
    for scale in (float("nan"), float("inf")):
        assert bool(torchtpu.flash_attention(q, k, v, sm_scale=scale).isnan().any())


def test_int64_segment_ids_outside_int32_are_refused_not_wrapped():
    q = torch.randn(1, 2, 8, 16)
    ids = torch.zeros(1, 8, dtype=torch.int64)
    ids[0, 4:] = 2**32  # wraps to 0 as int32: one segment instead of two
    with pytest.raises(ValueError, match="outside the int32 range"):
        torchtpu.flash_attention(q, q, q, segment_ids=ids)
    ids[0, 4:] = 7
    mask = ids[0, :, None] == ids[0, None, :]
    torch.testing.assert_close(torchtpu.flash_attention(q, q, q, segment_ids=ids), F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


def test_bad_input_to_the_native_module_is_a_python_error():
    from torchtpu import _torchtpu

    problem = {"batch": 1, "heads": 2, "kv_heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "f32", "causal": False, "segments": False, "sm_scale": 0.5}
    q, seg = torch.randn(1, 2, 8, 16), torch.zeros(1, 8, 128, dtype=torch.int32)
    run = lambda p, *operands: _torchtpu.op_run("flash_attention", json.dumps(p), list(operands))  # noqa: E731
    with pytest.raises(TypeError, match="f32 or bf16"):
        run({**problem, "dtype": "i32"}, q.int(), q.int(), q.int(), seg, seg)
    with pytest.raises(ValueError, match="grouped-query"):
        run({**problem, "heads": 3}, torch.randn(1, 3, 8, 16), q, q, seg, seg)
    bias, seed = torch.zeros(1, 1, 8, 128), torch.zeros(8, 128, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"operand 3 must be i32 \[1, 8, 128\]"):
        run(problem, q, q, q, q, seg, bias, seed)
    with pytest.raises(ValueError, match=r"operand 6 must be i32 \[8, 128\]"):
        run(problem, q, q, q, seg, seg, bias, bias)
    with pytest.raises(ValueError, match="dropout_p must be a probability"):
        run({**problem, "dropout_p": 2.0}, q, q, q, seg, seg, bias, seed)
    with pytest.raises(ValueError, match="the bias's batch and heads must each be 1 or the problem's"):
        run({**problem, "bias": {"batch": 1, "heads": 3}}, q, q, q, seg, seg, bias, seed)
    with pytest.raises(ValueError, match="takes 7 operands"):
        run(problem, q, q, q)
    with pytest.raises(ValueError, match="not a flash_attention problem"):
        run({"batch": -1}, q)
    with pytest.raises(ValueError, match="unknown TPU chip"):
        _torchtpu.op_tpu_module("flash_attention", json.dumps(problem), "v99")


def _reference_attention(q, k, v, causal, scale, ids_q, ids_k):
    """SDPA in f64 with an explicit boolean mask (top-left causal, as ours)."""
    h, hk = q.shape[1], k.shape[1]
    k64 = k.double().repeat_interleave(h // hk, dim=1) if hk else k.double()
    v64 = v.double().repeat_interleave(h // hk, dim=1) if hk else v.double()
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(q.shape[0], 1, sq, sk, dtype=torch.bool)
    if causal:
        mask &= torch.ones(sq, sk, dtype=torch.bool).tril()
    if ids_q is not None:
        mask &= (ids_q[:, None, :, None] == ids_k[:, None, None, :])
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # A row that sees no key gives 0 (as SDPA); NaN or inf that reaches a row makes it NaN.
    weights = torch.where(mask.any(-1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
    return weights @ v64


dims = st.sampled_from([0, 1, 2, 3, 8, 17, 40])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(
    b=st.integers(0, 2), hk=st.integers(0, 2), group=st.integers(1, 2), sq=dims, sk=dims, d=st.sampled_from([0, 1, 8, 16, 33]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    causal=st.booleans(), segments=st.sampled_from([None, torch.int32, torch.int64, "huge"]),
    transposed=st.booleans(), poison=st.sampled_from([None, float("nan"), float("inf")]),
    scale=st.sampled_from([None, 0.5, 2.0]), seed=st.integers(0, 2**31),
)
def test_attention_property(b, hk, group, sq, sk, d, dtype, causal, segments, transposed, poison, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    h = hk * group
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, sk, d, generator=gen).to(dtype)
    if transposed:  # a projection's output viewed as [b, h, s, d]: non-contiguous
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if poison is not None and q.numel():
        q[0, 0, 0, 0] = poison
    ids_q = ids_k = None
    if segments is not None:
        id_dtype = torch.int64 if segments == "huge" else segments
        ids_q, ids_k = (torch.arange(n).div(5, rounding_mode="floor").expand(b, n).to(id_dtype) for n in (sq, sk))
        if segments == "huge":
            ids_q = ids_q + 2**40
            ids_k = ids_k + 2**40
    invalid = dtype == torch.float64 or (segments == "huge" and (ids_q.numel() or ids_k.numel()))
    try:
        out = torchtpu.flash_attention(q, k, v, causal=causal, sm_scale=scale, segment_ids=ids_q, kv_segment_ids=ids_k)
    except (TypeError, ValueError) as e:
        assert invalid, f"valid input refused: {e}"
        return
    assert not invalid, "invalid input accepted"
    eff_scale = scale if scale is not None else (1.0 / d**0.5 if d else 1.0)
    want = _reference_attention(q, k, v, causal, eff_scale, ids_q, ids_k)
    assert out.shape == want.shape
    assert torch.equal(out.isnan(), want.isnan())
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3}.get(dtype, 1e-4)
    torch.testing.assert_close(out.double().nan_to_num(), want.nan_to_num(), atol=tol, rtol=tol)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=dims, n=dims, k=dims, batch=st.sampled_from([None, 0, 1, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32]),
    transposed_b=st.booleans(), poison=st.sampled_from([None, float("nan"), float("-inf")]), seed=st.integers(0, 2**31),
)
def test_matmul_property(m, n, k, batch, dtype, transposed_b, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    a = torch.randn(*lead, m, k, generator=gen)
    b = torch.randn(*lead, k, n, generator=gen)
    if poison is not None and a.numel():
        a[(0,) * a.dim()] = poison
    a, b = (a.to(dtype), b.to(dtype)) if dtype != torch.int32 else (a.int(), b.int())
    if transposed_b:
        b = b.mT.contiguous().mT
    invalid = dtype == torch.int32  # f16 is computed in f32; strided operands are copied
    try:
        out = torchtpu.matmul(a, b)
    except (TypeError, ValueError) as e:
        assert invalid, f"valid input refused: {e}"
        return
    assert not invalid, "invalid input accepted"
    want = a.double() @ b.double()
    assert torch.equal(out.isnan(), want.isnan())
    tol = {torch.bfloat16: 3e-2, torch.float16: 2e-3}.get(dtype, 1e-4) * max(k, 1) ** 0.5
    torch.testing.assert_close(out.double().nan_to_num(), want.nan_to_num(), atol=tol, rtol=tol)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    b=st.integers(0, 2), h=st.integers(1, 3), sq=dims, sk=dims, d=st.sampled_from([1, 8, 16]),
    q_rank=st.sampled_from([3, 4]), kv_rank=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    causal=st.sampled_from([False, True, "top_left", "bottom_right"] * 3 + ["lower_right", 1]),
    mask_kind=st.sampled_from([None, "bool", "float"] * 3 + ["int", "misshapen"]), mask_dims=st.lists(st.booleans(), min_size=4, max_size=4),
    mask_rank=st.integers(1, 4), dropout_p=st.sampled_from([0.0] * 9 + [-0.1, 1.5, float("nan")]), seed=st.integers(0, 2**31),
)
def test_sdpa_signature_property(b, h, sq, sk, d, q_rank, kv_rank, dtype, causal, mask_kind, mask_dims, mask_rank, dropout_p, seed):
    """SDPA's arguments — ranks that differ, masks of every broadcast (and shapes that do not
    broadcast), both causal alignments, bad dropout rates and causal values — give SDPA's
    result in f64, or a ValueError/TypeError for what SDPA would refuse too."""
    gen = torch.Generator().manual_seed(seed)
    shape = lambda rank, s: (b, h, s, d) if rank == 4 else (b * h, s, d)  # noqa: E731
    if q_rank != kv_rank:
        shape = lambda rank, s: (b, h, s, d) if rank == 4 else (h, s, d)  # noqa: E731  (3-D broadcasts over the batch)
    q, k, v = (torch.randn(*shape(r, s), generator=gen).to(dtype) for r, s in ((q_rank, sq), (kv_rank, sk), (kv_rank, sk)))
    scores = torch.broadcast_shapes(q.shape[:-1] + (1,), k.shape[:-2] + (1, sk))
    full = scores[-4:] if len(scores) >= 4 else scores
    mask_shape = tuple(n if keep else 1 for n, keep in zip((1,) * (4 - len(full)) + tuple(full), mask_dims))[4 - mask_rank :]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(mask_shape, generator=gen) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(mask_shape, generator=gen).masked_fill(torch.rand(mask_shape, generator=gen) < 0.2, float("-inf")).to(dtype)
    elif mask_kind == "int":
        mask = torch.ones(mask_shape, dtype=torch.int32)
    elif mask_kind == "misshapen":
        mask = torch.ones(sq + 2, sk, dtype=torch.bool)
    invalid = causal not in (False, True, "top_left", "bottom_right") or mask_kind in ("int", "misshapen") or not 0.0 <= dropout_p <= 1.0
    try:
        out = torchtpu.flash_attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p)
    except (TypeError, ValueError) as e:
        assert invalid, f"valid input refused: {e}"
        return
    assert not invalid, "invalid input accepted"
    q64, k64, v64 = (t.double() for t in (q, k, v))
    bias = torch.zeros(sq, sk, dtype=torch.float64)
    if causal:
        offset = sk - sq if causal == "bottom_right" else 0
        bias = bias.masked_fill(torch.ones(sq, sk, dtype=torch.bool).tril(offset).logical_not(), float("-inf"))
    if mask is not None:
        bias = bias + (mask.double() if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf")))
    # SDPA written out (F.scaled_dot_product_attention keeps q's shape for empty broadcasts,
    # where matmul's broadcasting, and ours, give the broadcast one); a row that sees no key is 0.
    s = q64 @ k64.transpose(-1, -2) / d**0.5 + bias
    hidden = torch.isneginf(s).all(-1, keepdim=True)
    want = torch.where(hidden, 0.0, torch.softmax(s.masked_fill(hidden, 0.0), -1)) @ v64
    # A mask's extra leading dims of size 1 do not grow the output (SDPA's rule).
    want = want.reshape(want.shape[want.dim() - max(q.dim(), k.dim()) :])
    assert out.shape == want.shape and out.dtype == dtype
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3}.get(dtype, 1e-4)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
