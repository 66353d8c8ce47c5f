"""Where a step's time goes: host (Python + dispatch + launches) or device (kernels), for the cases
whose GPU results are far from their targets (Conv-BN-ReLU training, DropBlock, stochastic pooling).

For each case, fastnn and its reference run the same step; per step this reports
  wall     the step with a synchronize after it (median),
  host     the time until the step's call returns, without a synchronize (median): what the
           CPU spends enqueueing it, plus any wait for the device inside the step,
  kernels  the device time of its kernels (torch.profiler),
  launches kernels launched per step, and
  syncs    host waits for the device per step (cuda*Synchronize and blocking cudaMemcpy calls).
A step with host > kernels and no syncs is host-bound: faster kernels will not help, fewer launches
and less Python will. With syncs, host includes device time and the verdict says "sync". The top
kernels and host ops of each fastnn step follow the table.

    python -m fastnn.bench profile [--device cuda|cpu] [--small] [--only NAME ...] [--out FILE]

--small runs tiny shapes (what CI does on the CPU, to keep this tool working); it says nothing
about speed. On the CPU "kernels" is the time of the profiled ATen/fastnn ops instead.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

Step = Callable[[], object]

# name -> (fastnn shape, small shape)
SHAPES = {
    "conv_bn_relu_train": ((32, 256, 14, 14), (2, 8, 5, 5)),
    "conv_bn_relu_train_56": ((32, 64, 56, 56), (2, 4, 6, 6)),
    "bn_relu_train": ((32, 64, 56, 56), (2, 4, 6, 6)),
    "drop_block_fwd": ((8, 256, 28, 28), (2, 4, 9, 9)),
    "drop_block_fwd_bwd": ((8, 256, 28, 28), (2, 4, 9, 9)),
    "drop_block_fwd_bwd_big": ((32, 256, 56, 56), (2, 4, 12, 12)),
    "stochastic_pool_train": ((32, 256, 56, 56), (2, 4, 8, 8)),
}


def _cases(device: str, small: bool) -> Dict[str, Tuple[Step, Dict[str, Step]]]:
    """name -> (fastnn step, {reference name: step}); every step is a closure over fresh inputs."""
    import torch
    import torch.nn as nn

    import fastnn.functional as F
    from fastnn import reference as R
    from fastnn.nn import ConvBNReLU2d

    torch.manual_seed(0)
    out = {}

    def shape(name):
        return SHAPES[name][1 if small else 0]

    def train_step(mod, x, g):
        def step():
            mod(x).backward(g)
            x.grad = None
        return step

    for name in ("conv_bn_relu_train", "conv_bn_relu_train_56"):
        n, c, h, w = shape(name)
        ref = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()).to(device)
        m = ConvBNReLU2d(c, c, 3, padding=1).to(device)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(n, c, h, w, device=device, requires_grad=True)
        g = torch.randn(n, c, h, w, device=device)
        out[name] = (train_step(m, x, g), {"eager": train_step(ref, x, g)})

    n, c, h, w = shape("bn_relu_train")
    bn = nn.BatchNorm2d(c).to(device)
    wt = bn.weight.detach().clone().requires_grad_()
    bs = bn.bias.detach().clone().requires_grad_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(n, c, h, w, device=device, requires_grad=True)
    g = torch.randn_like(x)

    class _Fused(nn.Module):
        def forward(self, t):
            return F.batch_norm_relu(t, rm, rv, wt, bs, True)

    out["bn_relu_train"] = (train_step(_Fused(), x, g), {"eager": train_step(nn.Sequential(bn, nn.ReLU()), x, g)})

    try:
        from timm.layers import drop_block_2d as timm_drop
    except ImportError:  # timm is optional: the floor x*mask still runs
        timm_drop = None
    for name, backward in (("drop_block_fwd", False), ("drop_block_fwd_bwd", True), ("drop_block_fwd_bwd_big", True)):
        shp = shape(name)
        block = 7 if not small else 3
        x = torch.randn(shp, device=device, requires_grad=backward)
        g = torch.randn(shp, device=device)
        mask = F.drop_block2d(torch.ones(shp, device=device), 0.1, block)

        def make(fn, x=x, g=g, backward=backward):
            if not backward:
                def step():
                    with torch.no_grad():
                        fn(x)
                return step

            def step_b():
                torch.autograd.grad(fn(x), x, g)
            return step_b

        refs = {"x*mask": make(lambda t, mask=mask: t * mask)}
        if timm_drop is not None:
            refs["timm"] = make(lambda t, block=block: timm_drop(t, 0.1, block))
        out[name] = (make(lambda t, block=block: F.drop_block2d(t, 0.1, block)), refs)

    n, c, h, w = shape("stochastic_pool_train")
    x = torch.rand(n, c, h, w, device=device)

    def pool(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    out["stochastic_pool_train"] = (
        pool(lambda: F.stochastic_pool2d(x, 2, 2, training=True)),
        {"reference": pool(lambda: R.stochastic_pool2d(x, (2, 2), (2, 2), (0, 0), training=True)),
         "max_pool2d": pool(lambda: torch.nn.functional.max_pool2d(x, 2, 2))})
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _median_ms(times: List[float]) -> float:
    return statistics.median(times) * 1e3


def measure(step: Step, device: str, reps: int = 20, warmup: int = 3) -> dict:
    """wall / host (ms, medians) and, from one profiled run of `reps` steps, kernels (ms) and launches per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    _sync(device)
    wall, host = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append(t1 - t0)
        wall.append(t2 - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            step()
        _sync(device)
    events = prof.key_averages()
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpy", "cudaMemcpy2D"))
    if device == "cuda":
        # user annotations (record_function ranges) also appear on the GPU timeline: not kernels
        kern = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)]
        kernel_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                        for e in kern)
        launches = sum(e.count for e in kern)
    else:  # the CPU has no separate device: the ops' own time stands in for "kernels"
        kern = [e for e in events if e.key.startswith(("aten::", "fastnn::", "mkldnn::"))]
        kernel_us = sum(e.self_cpu_time_total for e in kern)
        launches = 0
    return {"wall_ms": _median_ms(wall), "host_ms": _median_ms(host), "kernels_ms": kernel_us / 1e3 / reps,
            "launches": launches / reps, "syncs": syncs / reps, "profile": prof}


def _top(prof, device: str, n: int = 12) -> str:
    """The step's top ops by device time (CUDA) and by host time."""
    avg = prof.key_averages()
    parts = []
    if device == "cuda":
        for key in ("self_device_time_total", "self_cuda_time_total"):  # the name differs across torch versions
            try:
                parts.append(avg.table(sort_by=key, row_limit=n, max_name_column_width=60))
                break
            except (AttributeError, KeyError, ValueError):
                continue
    parts.append(avg.table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=60))
    return "\n".join(parts)


def run(device: str = "cuda", small: bool = False, only: Optional[List[str]] = None, reps: int = 20) -> Tuple[list, str]:
    """Rows (one per case and implementation) and the text report."""
    cases = _cases(device, small)
    unknown = sorted(set(only or ()) - set(cases))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {sorted(cases)}")
    rows, details = [], []
    for name, (fast, refs) in cases.items():
        if only and name not in only:
            continue
        shp = SHAPES[name][1 if small else 0]
        for impl, step in [("fastnn", fast)] + list(refs.items()):
            r = measure(step, device, reps=reps)
            # on the CPU the ops run on the host thread itself: there is no separate device to wait for
            if device != "cuda":
                bound = "n/a"
            elif r["syncs"] > 0:
                bound = "sync"
            else:
                bound = "host" if r["host_ms"] >= r["kernels_ms"] else "device"
            rows.append(dict(case=name, shape=str(shp), impl=impl, wall_ms=r["wall_ms"], host_ms=r["host_ms"],
                             kernels_ms=r["kernels_ms"], launches=r["launches"], syncs=r["syncs"], bound=bound))
            if impl == "fastnn":
                details.append(f"### {name} {shp} fastnn\n\n```\n{_top(r['profile'], device)}\n```\n")
    lines = ["| case | shape | impl | wall ms | host ms | kernels ms | launches/step | syncs/step | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['wall_ms']:.3f} | {r['host_ms']:.3f} | "
                     f"{r['kernels_ms']:.3f} | {r['launches']:.1f} | {r['syncs']:.1f} | {r['bound']} |")
    return rows, "\n".join(lines) + "\n\n" + "\n".join(details)
