"""Conv-BN-ReLU benchmarks: fastnn's ConvBNReLU2d against eager nn.Sequential(Conv2d, BatchNorm2d, ReLU)
and torch.compile of that Sequential, for a training step (forward + backward) and an eval forward.

Cases (3x3 conv C -> C, stride 1, padding 1):
  CUDA default: ResNet-50 stage shapes N=32, (C, HxW) = (64, 56), (256, 14), float32; the full sweep
      (--fastnn-full / FASTNN_BENCH_FULL=1) adds (128, 28), (512, 7), bfloat16 and channels_last.
  CPU default: (8, 128, 28, 28), the issue's whole-module case; the full sweep adds the N=32 stage shapes.
Plus the fused BatchNorm+ReLU alone (training forward + backward) against nn.BatchNorm2d + nn.ReLU:
(32, 128, 28, 28) on the CPU, (32, 64, 56, 56) on CUDA; the full sweep adds the other stage shapes and
channels_last. The torch.compile peers compile once per case (inductor's cache makes reruns faster).

extra_info: bytes (activation traffic of the BN+ReLU part: eager's minimum), flops (of the conv),
saved_activation_bytes (what autograd keeps for backward besides the input and the parameters) and,
on CUDA, peak_memory_bytes (bench_utils.peak_memory_of of one training step).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from bench_utils import peak_memory_of, run_benchmark
from fastnn.functional import batch_norm_relu
from fastnn.nn import ConvBNReLU2d

IMPLS = ["fastnn", "eager", "compile"]
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def _cases(device, full):
    if device == "cuda":
        shapes = [(32, c, hw) for c, hw in STAGES]
        default = {(32, 64, 56), (32, 256, 14)}
        dtypes = ["float32", "bfloat16"]
    else:
        shapes = [(8, 128, 28)] + [(32, c, hw) for c, hw in STAGES]
        default = {(8, 128, 28)}
        dtypes = ["float32"]
    out = []
    for s in shapes:
        for dt in dtypes:
            for cl in (False, True):
                on = s in default and dt == "float32" and not cl
                if on or full:
                    out.append((s, dt, cl))
    return out


def _ids(case):
    (n, c, hw), dt, cl = case
    return f"{n}x{c}x{hw}x{hw}-{dt}{'-cl' if cl else ''}"


ALL_CASES = sorted({c for d in ("cpu", "cuda") for c in _cases(d, True)}, key=_ids)


def _build(n, c, hw, dtype, cl, device):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
        ref[1].running_var.uniform_(0.5, 2.0)
    ref = ref.to(device)
    m = ConvBNReLU2d(c, c, 3, padding=1).to(device)
    m.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if cl else torch.contiguous_format
    ref = ref.to(memory_format=fmt)
    m = m.to(memory_format=fmt)
    x = torch.randn(n, c, hw, hw, device=device).to(memory_format=fmt)
    g = torch.randn(n, c, hw, hw, device=device).to(memory_format=fmt)
    return ref, m, x, g


def _amp(device, dtype):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, dtype))


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _saved_bytes(module, x):
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip and t.numel() > 1024:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 convolutions and matmuls (restored after). On Ampere and newer, cuDNN convolutions default
    to TF32 (10-bit mantissa inputs); folding BN into the conv weight changes what gets rounded, so fastnn's
    eval and eager differ by ~1e-4 under TF32 though both are right. The check compares in full fp32 with
    the tight tolerance; the timed runs keep the user's defaults (TF32 on, for both sides)."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def _check(m, ref, x, g, device, dtype):
    """fastnn against eager on the same inputs (a fast wrong kernel fails the run); restores state."""
    with _no_tf32():
        _check_fp32(m, ref, x, g, device, dtype)


def _check_fp32(m, ref, x, g, device, dtype):
    m_state, ref_state = copy.deepcopy(m.state_dict()), copy.deepcopy(ref.state_dict())
    tol = 1e-4 if dtype == "float32" else 2e-2
    with _amp(device, dtype):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = m(xa), ref(xb)
    assert _rel_err(ya, yb) < tol, f"train output rel err {_rel_err(ya, yb):.2e}"
    ya.backward(g.to(ya.dtype))
    yb.backward(g.to(yb.dtype))
    # relative norms: a ReLU mask that flips where the pre-activation rounds to ~0 is not an error
    assert _rel_err(xa.grad, xb.grad) < tol * 10, f"input grad rel err {_rel_err(xa.grad, xb.grad):.2e}"
    assert _rel_err(m.conv.weight.grad, ref[0].weight.grad) < tol * 10
    m.eval()
    ref.eval()
    with torch.no_grad(), _amp(device, dtype):
        ye, yr = m(x), ref(x)
    assert _rel_err(ye, yr) < tol, f"eval output rel err {_rel_err(ye, yr):.2e}"
    m.train()
    ref.train()
    m.zero_grad()
    ref.zero_grad()
    m.load_state_dict(m_state)
    ref.load_state_dict(ref_state)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["train", "eval"])
@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_conv_bn_relu(benchmark, device, full_sweep, case, pass_, impl):
    if case not in _cases(device, full_sweep):
        pytest.skip("not in this device's default cases (--fastnn-full runs them all)")
    (n, c, hw), dtype, cl = case
    ref, m, x, g = _build(n, c, hw, dtype, cl, device)
    if impl == "fastnn":
        _check(m, ref, x, g, device, dtype)
    mod = {"fastnn": m, "eager": ref, "compile": None}[impl]
    if impl == "compile":
        mod = torch.compile(copy.deepcopy(ref))
    mod.train(pass_ == "train")
    xin = x.clone().requires_grad_(pass_ == "train")
    amp = _amp(device, dtype)

    if pass_ == "train":
        def fn():
            with amp:
                y = mod(xin)
            y.backward(g.to(y.dtype))
            xin.grad = None
    else:
        def fn():
            with torch.no_grad(), amp:
                return mod(xin)

    peak = peak_memory_of(fn, device)
    benchmark.extra_info["saved_activation_bytes"] = _saved_bytes(mod, xin) if pass_ == "train" else 0
    elem = 2 if dtype != "float32" else 4
    act = n * c * hw * hw * elem
    run_benchmark(benchmark, fn, device=device, op="conv_bn_relu", shape=(n, c, hw, hw, "cl" if cl else "nchw"),
                  dtype=getattr(torch, dtype), pass_=pass_, impl=impl,
                  bytes_moved=act * (8 if pass_ == "train" else 2),
                  flops=2 * n * c * c * 9 * hw * hw * (3 if pass_ == "train" else 1), peak_memory=peak, warmup=2,
                  rounds=None if device == "cuda" else 8)


def _bn_relu_cases(device, full):
    if device == "cuda":
        return [(32, c, hw) for c, hw in STAGES] if full else [(32, 64, 56)]
    return [(32, 128, 28)] + ([(32, 64, 56)] if full else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", sorted({s for d in ("cpu", "cuda") for s in _bn_relu_cases(d, True)}), ids=str)
def test_bn_relu_train(benchmark, device, full_sweep, shape, layout, impl):
    """The fused BatchNorm+ReLU alone, training forward + backward."""
    if shape not in _bn_relu_cases(device, full_sweep):
        pytest.skip("not in this device's default cases")
    if layout == "cl" and not full_sweep:
        pytest.skip("channels_last in the full sweep only")
    n, c, hw = shape
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device=device).to(memory_format=fmt)
    g = torch.randn_like(x)
    bn = nn.BatchNorm2d(c).to(device)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    eager = nn.Sequential(bn, nn.ReLU())
    if impl == "fastnn":
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = batch_norm_relu(xa, rm.clone(), rv.clone(), w, b, True)
        yb = eager(xb)
        assert _rel_err(ya, yb) < 1e-5
        ya.backward(g)
        yb.backward(g)
        assert _rel_err(xa.grad, xb.grad) < 1e-4
        w.grad = b.grad = None

        def step(xin):
            return batch_norm_relu(xin, rm, rv, w, b, True)
    elif impl == "eager":
        step = eager
    else:
        step = torch.compile(eager)
    xin = x.clone().requires_grad_()

    def fn():
        y = step(xin)
        y.backward(g)
        xin.grad = None

    run_benchmark(benchmark, fn, device=device, op="bn_relu", shape=(n, c, hw, hw, layout), dtype=torch.float32,
                  pass_="fwd+bwd", impl=impl, bytes_moved=x.numel() * 4 * 8, flops=0,
                  peak_memory=peak_memory_of(fn, device), warmup=2, rounds=None if device == "cuda" else 10)


@pytest.mark.parametrize("epilogue", ["fused", "aten"])
def test_eval_epilogue(benchmark, device, epilogue, monkeypatch):
    """How the folded conv + bias + ReLU runs in eval: the backend's fused conv+ReLU (oneDNN's ReLU post-op on
    the CPU, cuDNN's conv-bias-activation on CUDA), or F.conv2d and an in-place ReLU. fastnn.ops.conv_bn_relu's
    CPU_EVAL_IMPL / CUDA_EVAL_IMPL (env FASTNN_CBR_CPU_EVAL / FASTNN_CBR_CUDA_EVAL) pick one; this shows which
    is faster on the machine."""
    from fastnn.ops import conv_bn_relu as ops
    cuda = str(device).startswith("cuda")
    impl = epilogue if epilogue == "aten" else ("cudnn" if cuda else "mkldnn")
    monkeypatch.setattr(ops, "CUDA_EVAL_IMPL" if cuda else "CPU_EVAL_IMPL", impl)
    n, c, hw = (32, 64, 56) if cuda else (8, 128, 28)
    ref, m, x, g = _build(n, c, hw, "float32", False, device)
    ref.eval()
    m.eval()
    with torch.no_grad(), _no_tf32():
        err = _rel_err(m(x), ref(x))
    assert err < (1e-4 if cuda else 1e-5), f"eval output rel err {err:.2e}"

    def fn():
        with torch.no_grad():
            return m(x)

    run_benchmark(benchmark, fn, device=device, op="conv_bn_relu eval epilogue", shape=(n, c, hw, hw, "nchw"),
                  dtype=torch.float32, pass_="eval", impl=f"fastnn-{impl}", bytes_moved=x.numel() * 8,
                  flops=2 * n * c * c * 9 * hw * hw, warmup=2, rounds=None if cuda else 8)
