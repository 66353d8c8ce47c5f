"""CBAM: fastnn.nn.CBAM against the tutorial module in eager PyTorch and under torch.compile.

Shapes: ResNet-50's stages at N=32 on CUDA (C=256 at 56x56, 512 at 28x28, 1024 at 14x14,
2048 at 7x7); (8, 256, 28, 28) on the CPU. Passes: "fwd" (inference, no autograd) and "fwd+bwd"
(a training step's forward and backward of the block).

Bytes counted (S = x's size in bytes): the forward reads x three times and writes out once (4 S);
the backward reads x twice and grad_out twice and writes grad_x once (5 S, the tutorial's tie rule;
timm's rule reads x once more). The gates, pooled maps and MLP/conv weights are under 1% and not
counted. The "copy" rows time x.clone() (2 S) in the same run: the bandwidth ceiling.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

import fastnn
from bench_utils import peak_memory_of, run_benchmark

OP = "cbam"
CUDA_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
CPU_SHAPES = [(8, 256, 28, 28)]
CPU_FULL = [(8, 512, 14, 14), (8, 1024, 7, 7), (8, 64, 56, 56)]


class _ChannelAttention(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(c // r, c, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))


class _SpatialAttention(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)))


class TutorialCBAM(nn.Module):
    """The formulation users copy from tutorials (the issue's reference)."""

    def __init__(self, c):
        super().__init__()
        self.channel_attention = _ChannelAttention(c)
        self.spatial_attention = _SpatialAttention()

    def forward(self, x):
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


def _cases(device, full):
    if str(device).startswith("cuda"):
        dts = [torch.float32, torch.bfloat16]
        return [(s, dt, "nchw") for s in CUDA_SHAPES for dt in dts] + (
            [(s, torch.bfloat16, "channels_last") for s in CUDA_SHAPES] if full else [])
    cases = [(s, torch.float32, "nchw") for s in CPU_SHAPES]
    if full:
        cases += [(s, torch.float32, "channels_last") for s in CPU_SHAPES]
        cases += [(s, torch.float32, "nchw") for s in CPU_FULL]
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        full = metafunc.config.getoption("--fastnn-full") or os.environ.get("FASTNN_BENCH_FULL") == "1"
        cases = _cases(dev, full)
        metafunc.parametrize("case", cases, ids=[f"{s[1]}x{s[2]}-{str(d)[6:]}-{lay}" for s, d, lay in cases])


_COMPILED = {}


def _setup(case, device, impl):
    shape, dtype, layout = case
    torch.manual_seed(0)
    ref = TutorialCBAM(shape[1]).to(device=device, dtype=dtype)
    fast = fastnn.nn.CBAM.from_module(ref)
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    gout = torch.randn_like(x)
    if impl == "fastnn":
        mod = fast
    elif impl == "eager":
        mod = ref
    else:  # one compiled module per (shape, dtype, layout): dynamo would recompile per shape anyway
        key = case
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(copy.deepcopy(ref))
        mod = _COMPILED[key]
    return ref, fast, mod, x, gout


class _NoTF32:
    """fp32 comparisons on CUDA without TF32 (restored after): cuDNN runs the reference's convolutions
    (the 1x1 MLP convs, the spatial conv) in TF32 by default on Ampere and later, ~1e-3 relative off
    fp32, while fastnn's kernels compute in fp32."""

    def __enter__(self):
        self.old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.old


def _check(ref, fast, x, gout, dtype):
    """fastnn against the tutorial module on these inputs, forward and grad x, before any timing.
    float32: close to the reference (both in fp32, see _NoTF32). Low precision: the error against the
    float32 reference at most twice the reference's own low-precision error (the tests' rule), plus a
    small floor."""
    with _NoTF32():
        _check_fp32_exact(ref, fast, x, gout, dtype)


def _check_fp32_exact(ref, fast, x, gout, dtype):
    def run(mod, xin, g):
        xin = xin.detach().clone().requires_grad_()
        out = mod(xin)
        out.backward(g)
        mod.zero_grad(set_to_none=True)
        return out.detach().double(), xin.grad.double()

    o_fast, g_fast = run(fast, x, gout)
    if dtype == torch.float32:
        o_ref, g_ref = run(ref, x, gout)
        torch.testing.assert_close(o_fast, o_ref, rtol=1e-4, atol=1e-5)
        # grad x: the gate differs from the reference's in the last bit (other summation order), so
        # where two channels' x*g are within ~1 ulp the max over C may pick the other one and its
        # gradient lands one channel over (2 elements). At ~1e-6 per pixel that happens a few times
        # per 1e5 pixels; allow up to 1e-6 of the elements, everything else to fp32 accuracy.
        bad = ((g_fast - g_ref).abs() > 1e-5 + 1e-4 * g_ref.abs()).sum().item()
        assert bad <= max(8, g_ref.numel() // 1_000_000), f"grad x: {bad} elements differ from the reference"
        return
    o_low, g_low = run(ref, x, gout)
    o32, g32 = run(copy.deepcopy(ref).float(), x.float(), gout.float())
    for what, got, low, want in (("output", o_fast, o_low, o32), ("grad x", g_fast, g_low, g32)):
        err, base = (got - want).abs().max().item(), (low - want).abs().max().item()
        assert err <= 2 * base + 1e-2, f"{what}: fastnn error {err:.3g} > 2 x the reference's {base:.3g}"


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fastnn", "eager", "compile", "copy"])
def test_cbam(benchmark, device, full_sweep, case, pass_, impl):
    shape, dtype, layout = case
    cuda = str(device).startswith("cuda")
    if impl == "compile" and not full_sweep and (not cuda or (shape, dtype) != (CUDA_SHAPES[0], torch.float32)):
        # each compile takes tens of seconds: the default run compiles one CUDA case, the CPU none
        pytest.skip("torch.compile of the reference: only with --fastnn-full for this case (compile time)")
    if impl == "copy" and pass_ != "fwd":
        pytest.skip("the copy ceiling is recorded once per shape")
    ref, fast, mod, x, gout = _setup(case, device, impl)
    _check(ref, fast, x, gout, dtype)
    S = x.numel() * x.element_size()
    if impl == "copy":
        out = torch.empty_like(x)
        fn, nbytes = (lambda: out.copy_(x)), 2 * S
    elif pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return mod(x)
        nbytes = 4 * S
    else:
        xg = x.detach().clone().requires_grad_()

        def fn():
            xg.grad = None
            out = mod(xg)
            out.backward(gout)
            return out
        nbytes = 9 * S
    flops = x.numel() * (7 if pass_ == "fwd" else 21)
    fn()  # warm up (and compile) outside the timing
    run_benchmark(benchmark, fn, device=device, op=OP, shape=tuple(shape) + ((layout,) if layout != "nchw" else ()),
                  dtype=dtype, pass_=pass_, impl=impl, bytes_moved=nbytes, flops=flops if impl != "copy" else 0,
                  peak_memory=peak_memory_of(fn, device))
