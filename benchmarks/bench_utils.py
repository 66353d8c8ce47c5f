"""Shared benchmark helpers (import as `from bench_utils import ...`).

Every benchmark: checks fastnn against the reference on the same inputs first (a fast
wrong kernel fails the run), then times one implementation, recording in extra_info the
bytes the op must move and its FLOPs so `python -m fastnn.bench report` can show GB/s,
TFLOP/s and % of peak.

extra_info schema (read by fastnn/bench/report.py): op, shape, dtype, pass_, impl ("fastnn"
or the reference's name), device, bytes, flops, optional peak_memory_bytes; on CUDA also
calls_per_sync (see run_benchmark).
"""
import importlib
import math
import time

import pytest
import torch

# CUDA: calls are queued back to back and synchronized once per batch this long (at least), so
# a timing is device time per call, with launch and synchronize costs amortized away.
_CUDA_BATCH_S = 1e-3
_CUDA_MAX_CALLS_PER_SYNC = 64


def sync_call(fn, device, every=1):
    """fn wrapped so a timing measures device time: synchronize after every `every`-th call."""
    if str(device).startswith("cuda"):
        count = [0]

        def run():
            out = fn()
            count[0] += 1
            if count[0] % every == 0:
                torch.cuda.synchronize()
            return out
        torch.cuda.synchronize()
        return run
    return fn


def _calls_per_sync(fn):
    """How many calls make one timed batch of >= _CUDA_BATCH_S (fn already warm or not)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    t = max(time.perf_counter() - t0, 1e-7)
    return int(min(_CUDA_MAX_CALLS_PER_SYNC, max(1, math.ceil(_CUDA_BATCH_S / t))))


def run_benchmark(benchmark, fn, *, device, op, shape, dtype, pass_, impl, bytes_moved=0, flops=0,
                  rounds=None, warmup=1, peak_memory=None, iterations=None):
    """Time `fn` with pytest-benchmark. `impl` is "fastnn" or the reference's name.

    On CUDA, `iterations` calls run back to back per timed round with one synchronize at the
    end (default: enough calls for ~1 ms, at most 64), and pytest-benchmark divides by them.
    Under --benchmark-disable, fn runs once, untimed."""
    benchmark.group = f"{op} {shape} {str(dtype).replace('torch.', '')} {pass_} {device}"
    benchmark.extra_info.update(dict(op=op, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                                     pass_=pass_, impl=impl, device=str(device), bytes=int(bytes_moved),
                                     flops=int(flops)))
    if peak_memory is not None:
        benchmark.extra_info["peak_memory_bytes"] = int(peak_memory)
    cuda = str(device).startswith("cuda")
    if rounds is None:
        rounds = 20 if cuda else 5
    if not cuda:
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if getattr(benchmark, "disabled", False):
        iterations = 1
    elif iterations is None:
        iterations = _calls_per_sync(fn)
    benchmark.extra_info["calls_per_sync"] = int(iterations)
    out = benchmark.pedantic(sync_call(fn, device, every=iterations), rounds=rounds, iterations=iterations,
                             warmup_rounds=warmup)
    torch.cuda.synchronize()
    return out


def peak_memory_of(fn, device):
    """Peak CUDA memory allocated during fn() above what was allocated before (None on CPU)."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def skip_unless_cuda(device, what):
    """Skip this benchmark cleanly when `what` (e.g. "sdpa_flash") needs a GPU and device is the CPU."""
    if not str(device).startswith("cuda"):
        pytest.skip(f"{what} needs CUDA; this run is on {device}")


def import_or_skip(module, what=None):
    """The module (e.g. "timm", "flash_attn"), or a clean skip saying which reference is missing."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or e.g. torchvision's operator errors on a mismatched torch
        pytest.skip(f"{what or module} unavailable: {module} does not import ({type(e).__name__}: {e})")
