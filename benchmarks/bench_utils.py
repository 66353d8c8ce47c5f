"""Shared benchmark helpers (import as `from bench_utils import ...`).

Every benchmark: checks fastnn against the reference on the same inputs first (a fast
wrong kernel fails the run), then times one implementation, recording in extra_info the
bytes the op must move and its FLOPs so `python -m fastnn.bench report` can show GB/s,
TFLOP/s and % of peak.
"""
import torch


def sync_call(fn, device):
    """fn wrapped so a timing measures device time: synchronize after the call."""
    if str(device).startswith("cuda"):
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        torch.cuda.synchronize()
        return run
    return fn


def run_benchmark(benchmark, fn, *, device, op, shape, dtype, pass_, impl, bytes_moved=0, flops=0,
                  rounds=None, warmup=1, peak_memory=None):
    """Time `fn` with pytest-benchmark. `impl` is "fastnn" or the reference's name."""
    benchmark.group = f"{op} {shape} {str(dtype).replace('torch.', '')} {pass_} {device}"
    benchmark.extra_info.update(dict(op=op, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                                     pass_=pass_, impl=impl, device=str(device), bytes=int(bytes_moved),
                                     flops=int(flops)))
    if peak_memory is not None:
        benchmark.extra_info["peak_memory_bytes"] = int(peak_memory)
    run = sync_call(fn, device)
    if rounds is None:
        rounds = 20 if str(device).startswith("cuda") else 5
    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)


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
