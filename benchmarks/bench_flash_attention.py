"""FlashAttention benchmarks: fastnn's Triton kernels vs each torch SDPA backend (flash, efficient,
cuDNN) and flash-attn when importable.

Shapes: B*S = 16k tokens, H*D = 2048 (H = 2048 / D), seqlen 512..16k. FLOPs: forward 4*B*H*Sq*Sk*D,
halved when causal; backward 2.5x the forward, so fwd+bwd = 3.5x. extra_info["tflops"] holds the
median's TFLOP/s. Default run on a GPU: bf16, head dim 128, seqlen 4k and 16k, causal and not, fwd
and fwd+bwd; `--fastnn-full` (or FASTNN_BENCH_FULL=1) adds fp16, head dim 64 and every seqlen.
On the CPU: one tiny smoke case (fastnn runs torch's SDPA there).

    python benchmarks/tune_flash_attention.py --report .benchmarks/...json   # the TFLOP/s table
"""
import pytest
import torch

from bench_utils import run_benchmark
from fastnn import reference
from fastnn.functional import flash_attn_func

TOKENS, HIDDEN = 16384, 2048
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
DEFAULT = {("bfloat16", 128, 4096), ("bfloat16", 128, 16384)}
IMPLS = ["fastnn", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn"]


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def _attention_fn(impl, causal, device):
    """fn(q, k, v) on (B, S, H, D) tensors -> (B, S, H, D). On the CPU "sdpa_*" is torch's default SDPA."""
    if impl == "fastnn":
        return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    if impl == "flash_attn":
        fa = pytest.importorskip("flash_attn")
        return lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal)
    import contextlib
    from torch.nn.attention import sdpa_kernel
    ctx = (lambda: contextlib.nullcontext()) if device == "cpu" else (lambda: sdpa_kernel(_sdpa_backend(impl)))

    def run(q, k, v):
        with ctx():
            return reference.torch_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        is_causal=causal).transpose(1, 2)
    return run


def _flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d
    return f // 2 if causal else f


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash_attention(benchmark, device, full_sweep, dtype, head_dim, seqlen, causal, pass_, impl):
    if device == "cpu":
        # a smoke case only: fastnn runs torch's SDPA on CPU tensors
        if (dtype, head_dim, seqlen) != ("bfloat16", 64, 512) or impl not in ("fastnn", "sdpa_efficient"):
            pytest.skip("CPU: one smoke case")
        b, s, h, d, dt = 1, 128, 2, 64, torch.float32
    else:
        if not full_sweep and (dtype, head_dim, seqlen) not in DEFAULT:
            pytest.skip("in the full sweep only (--fastnn-full)")
        b, s, h, d, dt = TOKENS // seqlen, seqlen, HIDDEN // head_dim, head_dim, getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device=device, dtype=dt, generator=g) for _ in range(4))
    fn = _attention_fn(impl, causal, device)
    try:
        out = fn(q, k, v)
    except RuntimeError as e:  # an SDPA backend that does not take this case
        pytest.skip(f"{impl}: {str(e).splitlines()[0][:120]}")
    if impl == "fastnn":  # a fast wrong kernel must fail the run
        with torch.no_grad():
            want = reference.torch_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        is_causal=causal).transpose(1, 2)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    flops = _flops(b, h, s, d, causal)
    el = q.element_size()
    n = b * s * h * d
    if pass_ == "fwd":
        call = lambda: fn(q, k, v)  # noqa: E731
        bytes_moved = 4 * n * el
    else:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def call():
            o = fn(*leaves)
            return torch.autograd.grad(o, leaves, do)
        flops = flops * 7 // 2
        bytes_moved = 12 * n * el
    shape = (b, s, h, d)
    run_benchmark(benchmark, call, device=device, op=f"flash_attention{'_causal' if causal else ''}", shape=shape,
                  dtype=dt, pass_=pass_, impl=impl, bytes_moved=bytes_moved, flops=flops,
                  warmup=2 if device != "cpu" else 1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["tflops"] = flops / stats.stats.median / 1e12
