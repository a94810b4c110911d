"""How the ops behave as a library: the GIL is released while kernels run, and a forked
child process can use them."""

import multiprocessing
import threading

import torch

import torchtpu


def test_gil_is_released_while_a_kernel_runs():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torchtpu.matmul(a, b)  # compile outside the measured window
    inside = threading.Event()
    done = threading.Event()

    def work():
        inside.set()
        for _ in range(5):
            torchtpu.matmul(a, b)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    inside.wait()
    steps = 0
    while not done.is_set():
        steps += 1
    t.join()
    # Holding the GIL through five ~10 ms kernels would leave this loop a handful of turns
    # (one per switch interval at most); released, it spins freely meanwhile.
    assert steps > 10_000, steps


def _child(queue, a, b, qkv, want_mm, want_attn):
    # PJRT does not survive fork: the child runs the same kernels on the interpreter. (It
    # leaves torch's own parallel kernels alone: their thread pool does not survive fork.)
    got_mm = torchtpu.matmul(a, b)
    got_attn = torchtpu.flash_attention(*qkv, causal=True)
    queue.put(torch.allclose(got_mm, want_mm, atol=1e-5) and torch.allclose(got_attn, want_attn, atol=1e-5))


def test_ops_work_in_a_forked_child():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    qkv = tuple(torch.randn(1, 2, 40, 16) for _ in range(3))
    want_attn = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
    torchtpu.matmul(a, b)  # the parent's client and compiled kernels exist before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue, a, b, qkv, a @ b, want_attn))
    p.start()
    p.join(timeout=120)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0
    assert queue.get(timeout=5) is True
