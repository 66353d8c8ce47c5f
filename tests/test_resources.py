"""Resources: training loops keep memory flat, `import fastnn` is fast and creates no CUDA context.

The bounds here are the figures in docs/robustness.md (test_doc_figures keeps them equal)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

import fastnn
import fastnn.nn as fnn

ITERATIONS = 1000
WARMUP = 100
RSS_BOUND_MB = 8.0        # CPU: RSS growth allowed between iteration WARMUP and ITERATIONS
CUDA_BOUND_BYTES = 0      # CUDA: memory_allocated must come back to the same value
IMPORT_BOUND_S = 1.0      # import fastnn after torch, on the CPU
HAS_EXT = fastnn._ext.EXT is not None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# Inputs of ~100-300 KB: one leaked activation per step would add > 100 MB over the loop.
def _modules(device):
    return {
        "ConvBNReLU2d": (fnn.ConvBNReLU2d(8, 8, 3, padding=1), (4, 8, 24, 24)),
        "CBAM": (fnn.CBAM(32, 8, variant="timm"), (4, 32, 16, 16)),
        "StochasticPool2d": (fnn.StochasticPool2d(2), (4, 16, 24, 24)),
        "DropBlock2d": (fnn.DropBlock2d(0.2, 5), (4, 16, 24, 24)),
        "MultiheadAttention": (fnn.MultiheadAttention(64, 4, dropout=0.1, batch_first=True), (4, 64, 64)),
    }


def _train(name, m, shape, device, n):
    params = [p for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3) if params else None
    x = torch.randn(shape, device=device)
    if name == "StochasticPool2d":
        x = x.abs()
    x.requires_grad_(True)
    for _ in range(n):
        y = m(x, x, x, need_weights=False)[0] if name == "MultiheadAttention" else m(x)
        y.square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None


def _mem(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _rss_mb()


@pytest.fixture
def one_thread():
    # 1000 steps of small ops: OpenMP's fork/join per op dominates (and on a shared, loaded machine
    # two threads ran 30x slower); memory does not depend on the thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="no _C")),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["ConvBNReLU2d", "CBAM", "StochasticPool2d", "DropBlock2d", "MultiheadAttention"])
def test_training_memory_is_flat(name, device, one_thread):
    torch.manual_seed(0)
    m, shape = _modules(device)[name]
    m = m.to(device).train()
    _train(name, m, shape, device, WARMUP)
    before = _mem(device)
    _train(name, m, shape, device, ITERATIONS - WARMUP)
    after = _mem(device)
    if device == "cuda":
        assert after - before <= CUDA_BOUND_BYTES, f"{name}: CUDA memory grew by {after - before} bytes"
    else:
        assert after - before <= RSS_BOUND_MB, f"{name}: RSS grew by {after - before:.1f} MB over " \
                                               f"{ITERATIONS - WARMUP} iterations"


_IMPORT_CODE = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fastnn
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, torch.cuda.is_initialized(), 'triton' in sys.modules, 'torch._dynamo' in sys.modules)
"""


def _import_times(runs=3):
    env = dict(os.environ)
    # this process's import path: the subprocess imports the fastnn the tests import
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", _IMPORT_CODE], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        torch_s, fastnn_s, cuda_init, triton, dynamo = r.stdout.split()[-5:]
        out.append((float(torch_s), float(fastnn_s), cuda_init == "True", triton == "True", dynamo == "True"))
    return out


def test_import_time_and_no_cuda_context():
    """(time of `import torch; import fastnn`) - (time of `import torch`), in fresh processes (the
    fastest of three: the machine is shared); no CUDA context, no triton, no torch._dynamo."""
    runs = _import_times()
    best = min(r[1] for r in runs)
    assert best < IMPORT_BOUND_S, f"import fastnn took {best:.2f} s after torch (runs: {runs})"
    for _, _, cuda_init, triton, dynamo in runs:
        assert not cuda_init, "import fastnn created a CUDA context"
        assert not triton, "import fastnn imported triton (the Triton ops are registered on first use)"
        assert not dynamo, "import fastnn imported torch._dynamo"


def test_doc_figures():
    """docs/robustness.md states the bounds these tests enforce, and the fuzz example counts."""
    import fuzzing
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "robustness.md")) as f:
        doc = f.read()
    rows = [
        f"| fuzz examples per op, CPU (profile `ci`) | >= {fuzzing.MIN_EXAMPLES['ci']} |",
        f"| fuzz examples per op, CUDA (profile `gpu`) | >= {fuzzing.MIN_EXAMPLES['gpu']} |",
        f"| training iterations per module in the memory test | {ITERATIONS} |",
        f"| CPU RSS growth allowed (iterations {WARMUP} to {ITERATIONS}) | {RSS_BOUND_MB:g} MB |",
        f"| CUDA memory_allocated growth allowed | {CUDA_BOUND_BYTES} bytes |",
        f"| `import fastnn` after `import torch`, CPU | < {IMPORT_BOUND_S:g} s |",
    ]
    for row in rows:
        assert row in doc, f"docs/robustness.md lacks the row: {row}"
