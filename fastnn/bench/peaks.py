"""Measures a device's ceilings, for the report's "% of peak".

- copy: a device-to-device tensor copy; bandwidth counts bytes read + bytes written.
- matmul: an n x n x n matmul, 2 n^3 FLOPs. On CUDA in bf16, fp16, fp32 (full precision) and
  tf32; on the CPU in fp32.

Each figure is the best of `reps` timed repetitions after warm-up (a ceiling, not a typical
value); the median is recorded beside it. CUDA times come from CUDA events around each call.
"""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

# defaults per device type: big enough to reach the ceiling, small enough to take seconds
DEFAULTS = {
    "cuda": dict(size_mb=1024, n=8192, reps=20, warmup=5),
    "cpu": dict(size_mb=256, n=2048, reps=5, warmup=2),
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_cuda(fn: Callable[[], object], reps: int, warmup: int) -> List[float]:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in evs]


def _time_cpu(fn: Callable[[], object], reps: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _rate(work: float, times: List[float]) -> Dict[str, float]:
    return {"best": work / min(times), "median": work / statistics.median(times)}


def measure_device(device_type: str, size_mb: Optional[float] = None, n: Optional[int] = None,
                   reps: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    import torch

    if device_type not in DEFAULTS:
        raise ValueError(f"device={device_type!r}: use 'cpu' or 'cuda'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU; use --device cpu")
    d = DEFAULTS[device_type]
    size_mb = d["size_mb"] if size_mb is None else size_mb
    n = d["n"] if n is None else int(n)
    reps = d["reps"] if reps is None else int(reps)
    warmup = d["warmup"] if warmup is None else int(warmup)
    if size_mb <= 0 or n <= 0 or reps <= 0 or warmup < 0:
        raise ValueError("size_mb, n and reps must be positive, warmup >= 0")
    timer = _time_cuda if device_type == "cuda" else _time_cpu
    dev = torch.device(device_type)

    out: dict = {"device_type": device_type}
    if device_type == "cuda":
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        out["name"] = torch.cuda.get_device_name(i)
        out["capability"] = f"{cap[0]}.{cap[1]}"
    else:
        out["name"] = _cpu_name()
        out["threads"] = torch.get_num_threads()

    nbytes = int(size_mb * 2**20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    r = _rate(2.0 * nbytes, timer(lambda: dst.copy_(src), reps, warmup))
    out["copy_bytes"] = nbytes
    out["copy_gbps"] = r["best"] / 1e9
    out["copy_gbps_median"] = r["median"] / 1e9
    del src, dst

    flops = 2.0 * n ** 3
    kinds = ["bfloat16", "float16", "float32", "tf32"] if device_type == "cuda" else ["float32"]
    mm, mm_med = {}, {}
    prev = torch.get_float32_matmul_precision()
    try:
        for kind in kinds:
            dtype = torch.float32 if kind == "tf32" else getattr(torch, kind)
            # "highest": fp32 really is fp32; "high": cuBLAS may use TF32
            torch.set_float32_matmul_precision("high" if kind == "tf32" else "highest")
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            c = torch.empty(n, n, device=dev, dtype=dtype)
            r = _rate(flops, timer(lambda: torch.mm(a, b, out=c), reps, warmup))
            mm[kind] = r["best"] / 1e12
            mm_med[kind] = r["median"] / 1e12
            del a, b, c
    finally:
        torch.set_float32_matmul_precision(prev)
    out["matmul_n"] = n
    out["matmul_tflops"] = mm
    out["matmul_tflops_median"] = mm_med
    out["reps"] = reps
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_peaks(device: str = "auto", **kw) -> dict:
    """device: "auto" (cuda when present, else cpu), "cpu", "cuda" or "all"."""
    import torch

    if device == "auto":
        types = ["cuda" if torch.cuda.is_available() else "cpu"]
    elif device == "all":
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [device]
    return {
        "version": 1,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "devices": {t: measure_device(t, **kw) for t in types},
    }


def format_peaks(peaks: dict) -> str:
    lines = []
    for t, d in peaks["devices"].items():
        mm = ", ".join(f"{k} {v:.4g}" for k, v in d["matmul_tflops"].items())
        lines.append(f"{t} ({d['name']}): copy {d['copy_gbps']:.4g} GB/s (read+write, {d['copy_bytes'] / 2**20:.0f} MiB); "
                     f"matmul {d['matmul_n']}^3 TFLOP/s: {mm}")
    return "\n".join(lines)
