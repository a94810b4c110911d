"""JAX Pallas on the interpreter and lowering benches' problems, for side-by-side numbers.

Not part of the test suite: it needs `jax[cpu]` (0.10.2 was measured), e.g. in a venv under
~/.cache. Run: python benches/peers/jax_pallas_interpret.py
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def matmul_kernel(x_ref, y_ref, z_ref, acc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        z_ref[...] = acc_ref[...].astype(z_ref.dtype)


def matmul(x, y, b=128, interpret=True):
    from jax.experimental.pallas import tpu as pltpu

    m, k = x.shape
    n = y.shape[1]
    return pl.pallas_call(
        matmul_kernel,
        grid=(m // b, n // b, k // b),
        in_specs=[pl.BlockSpec((b, b), lambda i, j, kk: (i, kk)), pl.BlockSpec((b, b), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((b, b), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        scratch_shapes=[pltpu.VMEM((b, b), jnp.float32)],
        interpret=interpret,
    )(x, y)


def flash_kernel(q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, sm_scale, bq, bk):
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(kj * bk <= qi * bq + bq - 1)
    def _():
        s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=jnp.float32) * sm_scale
        rows = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        cols = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        s = jnp.where(rows >= cols, s, -0.7 * float(np.finfo(np.float32).max))
        m_prev, l_prev = m_ref[:, 0:1], l_ref[:, 0:1]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_ref.shape)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = (acc_ref[...] / l_ref[:, 0:1]).astype(o_ref.dtype)


def flash(q, k, v, bq=128, bk=128, interpret=True):
    from jax.experimental.pallas import tpu as pltpu

    b, h, s, d = q.shape
    kern = functools.partial(flash_kernel, sm_scale=1.0 / np.sqrt(d), bq=bq, bk=bk)
    spec_q = pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, j: (bb, hh, i, 0))
    spec_k = pl.BlockSpec((None, None, bk, d), lambda bb, hh, i, j: (bb, hh, j, 0))
    return pl.pallas_call(
        kern,
        grid=(b, h, s // bq, s // bk),
        in_specs=[spec_q, spec_k, spec_k],
        out_specs=spec_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, 128), jnp.float32), pltpu.VMEM((bq, 128), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)],
        interpret=interpret,
    )(q, k, v)


def median_ms(f, *args, reps=10):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((512, 512), dtype=np.float32))
    y = jnp.asarray(rng.standard_normal((512, 512), dtype=np.float32))
    mm = jax.jit(matmul)
    np.testing.assert_allclose(mm(x, y), x @ y, rtol=1e-4, atol=1e-3)
    print(f"jax {jax.__version__} pallas interpret, matmul 512^3 f32 b128: {median_ms(mm, x, y):.2f} ms")
    print(f"jax {jax.__version__} XLA x @ y, 512^3 f32: {median_ms(jax.jit(jnp.matmul), x, y):.2f} ms")
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 1024, 128), dtype=np.float32)) for _ in range(3))
    fl = jax.jit(flash)
    print(f"jax {jax.__version__} pallas interpret, causal flash 1x4x1024x128 f32 b128: {median_ms(fl, q, k, v, reps=5):.2f} ms")

    # Lowering to TPU (trace + Mosaic + StableHLO), the lowering bench's problems.
    def lower_ms(f, *args, reps=10):
        times = []
        for _ in range(reps):
            jax.clear_caches()  # else jit returns the cached lowering after the first call
            t = time.perf_counter()
            jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
            times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

    xb = jnp.zeros((1024, 1024), jnp.bfloat16)
    mm_tpu = functools.partial(matmul, b=256, interpret=False)
    print(f"jax {jax.__version__} pallas lower to TPU, matmul bf16 1024 b256: {lower_ms(mm_tpu, xb, xb):.2f} ms")
    qf = jnp.zeros((1, 2, 512, 128), jnp.float32)
    fl_tpu = functools.partial(flash, interpret=False)
    print(f"jax {jax.__version__} pallas lower to TPU, causal flash 1x2x512x128 f32 b128: {lower_ms(fl_tpu, qf, qf, qf):.2f} ms")


if __name__ == "__main__":
    main()
