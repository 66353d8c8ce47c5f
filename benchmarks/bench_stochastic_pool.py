"""Stochastic pooling: fastnn's kernels vs
- the unfold-based reference (fastnn.reference),
- F.max_pool2d, the floor (a pooling that moves the same bytes and draws nothing),
- torch.compile of the reference (CPU training forward+backward by default; all with --fastnn-full),
- on the CPU, the tutorial's per-window Python loop, for the record.
On CUDA, activation mode is also timed as "fastnn[no-sync-check]" (FASTNN_STOCHASTIC_POOL_CHECK=nan):
without the one host sync per call that the negative-input check costs.

Default run: on CUDA (32, 256, 56, 56) fp32, k=2 s=2 and k=3 s=2, training and eval, forward and
forward+backward; on the CPU the same passes at (8, 128, 56, 56), plus a softmax-mode training
forward group with the tutorial loop at that same shape. --fastnn-full adds fp16/bf16,
channels_last and softmax mode on CUDA, and (8, 128, 56, 56) on CUDA too.
"""
import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import reference as R
from bench_utils import peak_memory_of, run_benchmark

OP = "stochastic_pool2d"
HAS_OP = fastnn._ext.EXT is not None and hasattr(torch.ops.fastnn, OP)
pytestmark = pytest.mark.skipif(not HAS_OP, reason=f"fastnn._C not usable: {fastnn._ext.EXT_REASON}")

KS = [(2, 2), (3, 2)]  # (kernel, stride)
PASSES = ["train fwd", "train fwd+bwd", "eval fwd", "eval fwd+bwd"]


def tutorial_stochastic_pool(x, k, s, training=True):
    """The tutorial's `AdvancedPooling(pool_type='stochastic')`, rewritten: a Python loop over the
    output positions that slices each window (for all N, C at once), takes its softmax and, in
    training, draws with torch.multinomial; in eval returns sum(softmax(w) * w)."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = x.new_empty(n, c, oh, ow)
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s:i * s + k, j * s:j * s + k].reshape(n * c, k * k)
            p = torch.softmax(win, dim=1)
            if training:
                idx = torch.multinomial(p, 1)
                out[:, :, i, j] = win.gather(1, idx).view(n, c)
            else:
                out[:, :, i, j] = (p * win).sum(1).view(n, c)
    return out


def _shapes(device, full):
    if str(device).startswith("cuda"):
        base = [((32, 256, 56, 56), torch.float32, "nchw", "activation")]
        if full:
            base += [((32, 256, 56, 56), torch.bfloat16, "nchw", "activation"),
                     ((32, 256, 56, 56), torch.float16, "nchw", "activation"),
                     ((32, 256, 56, 56), torch.float32, "channels_last", "activation"),
                     ((32, 256, 56, 56), torch.float32, "nchw", "softmax"),
                     ((8, 128, 56, 56), torch.float32, "nchw", "activation")]
        return base
    base = [((8, 128, 56, 56), torch.float32, "nchw", "activation")]
    if full:
        base += [((8, 128, 56, 56), torch.float32, "channels_last", "activation"),
                 ((8, 128, 56, 56), torch.float32, "nchw", "softmax")]
    return base


def _cases(device, full):
    out = []
    for shape, dtype, layout, mode in _shapes(device, full):
        for k, s in KS:
            for pass_ in PASSES:
                out.append((shape, dtype, layout, mode, k, s, pass_))
    return out


def _bytes(x, out_numel, pass_):
    """What the pass must move at least: input/output once per direction, 1-byte offsets."""
    el = x.element_size()
    xin, yout, off = x.numel() * el, out_numel * el, out_numel
    fwd = xin + yout + (off if pass_.startswith("train") else 0)
    if not pass_.endswith("bwd"):
        return fwd
    bwd = yout + off + xin if pass_.startswith("train") else yout + xin + xin  # grad_out (+offsets|+input) + grad_in
    return fwd + bwd


def _check(x, k, s, mode, pass_, dtype):
    """fastnn against the reference / the sampled elements, on the benchmark's own input."""
    training = pass_.startswith("train")
    if not training:
        xg = x.detach().clone().requires_grad_()
        xr = x.detach().float().requires_grad_()
        out = fastnn.functional.stochastic_pool2d(xg, k, s, mode=mode, training=False)
        ref = R.stochastic_pool2d(xr, (k, k), (s, s), (0, 0), False, mode, False)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        if pass_.endswith("bwd"):
            g = torch.randn_like(ref)
            gi, = torch.autograd.grad(out, xg, g.to(dtype))
            gr, = torch.autograd.grad(ref, xr, g)
            torch.testing.assert_close(gi.float(), gr, rtol=tol, atol=tol * 10)
        return
    torch.manual_seed(1)
    out, off = torch.ops.fastnn.stochastic_pool2d(x, [k, k], [s, s], [0, 0], False, mode, True)
    oh, ow = out.shape[2:]
    ih = (torch.arange(oh, device=x.device) * s).view(1, 1, oh, 1) + off.long() // k
    iw = (torch.arange(ow, device=x.device) * s).view(1, 1, 1, ow) + off.long() % k
    n_idx = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1).expand_as(ih)
    assert torch.equal(out, x[n_idx, c_idx, ih, iw]), "a training output is not its sampled element"
    if pass_.endswith("bwd"):
        xg = x.detach().clone().requires_grad_()
        torch.manual_seed(1)
        y = fastnn.functional.stochastic_pool2d(xg, k, s, mode=mode, training=True)
        g = torch.randn_like(y)
        gi, = torch.autograd.grad(y, xg, g)
        expect = torch.zeros_like(x).index_put_((n_idx, c_idx, ih, iw), g, accumulate=True)
        torch.testing.assert_close(gi, expect, rtol=1e-3, atol=1e-3)


def _make(shape, dtype, layout, mode, device):
    torch.manual_seed(0)
    x = torch.rand(shape, device=device, dtype=torch.float32)
    if mode == "softmax":
        x = 4 * x - 2
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _fn(impl, x, k, s, mode, pass_):
    training = pass_.startswith("train")
    bwd = pass_.endswith("bwd")
    if impl in ("fastnn", NOSYNC):
        def fwd(t):
            return fastnn.functional.stochastic_pool2d(t, k, s, mode=mode, training=training)
    elif impl == "reference":
        def fwd(t):
            return R.stochastic_pool2d(t, (k, k), (s, s), (0, 0), False, mode, training)
    elif impl == "compile":  # torch.compile (inductor) of the reference
        torch._dynamo.reset()  # a fresh cache: the same code object is compiled for every group

        def ref(t):
            return R.stochastic_pool2d(t, (k, k), (s, s), (0, 0), False, mode, training)
        fwd = torch.compile(ref)
    elif impl == "max_pool2d":
        def fwd(t):
            return F.max_pool2d(t, k, s)
    elif impl == "tutorial_loop":
        def fwd(t):
            return tutorial_stochastic_pool(t, k, s, training)
    else:
        raise ValueError(impl)
    if not bwd:
        return lambda: fwd(x)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(fwd(x.detach()))

    def fwd_bwd():
        return torch.autograd.grad(fwd(xg), xg, g)
    return fwd_bwd


NOSYNC = "fastnn[no-sync-check]"  # FASTNN_STOCHASTIC_POOL_CHECK=nan: no per-call host sync (CUDA)


def _impls(device, mode, pass_, shape, full):
    impls = ["fastnn", "reference", "max_pool2d"]
    # torch.compile of the reference: a few seconds of compiling per group, so by default only on
    # the CPU's training forward+backward groups (the CPU target), everywhere with --fastnn-full
    if full or (not str(device).startswith("cuda") and pass_ == "train fwd+bwd"):
        impls.append("compile")
    # activation mode on CUDA syncs once per call for its negative-input check: time it without too
    if str(device).startswith("cuda") and mode == "activation":
        impls.append(NOSYNC)
    # for the record: the tutorial loop (softmax mode), CPU training forward only
    if not str(device).startswith("cuda") and mode == "softmax" and pass_ == "train fwd":
        impls.append("tutorial_loop")
    return impls


def _ids(case):
    shape, dtype, layout, mode, k, s, pass_ = case
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{layout}-{mode}-k{k}s{s}-{pass_.replace(' ', '_')}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        full = (metafunc.config.getoption("--fastnn-full") or
                __import__("os").environ.get("FASTNN_BENCH_FULL") == "1")
        cases = _cases(device, full)
        if device == "cpu":  # the tutorial loop's group (softmax training forward, k=2 s=2)
            cases.append(((8, 128, 56, 56), torch.float32, "nchw", "softmax", 2, 2, "train fwd"))
        params = [(c, impl) for c in dict.fromkeys(cases) for impl in _impls(device, c[3], c[6], c[0], full)]
        metafunc.parametrize("case,impl", params, ids=[f"{_ids(c)}-{i}" for c, i in params])


_checked = set()


def test_stochastic_pool(benchmark, device, case, impl, monkeypatch):
    shape, dtype, layout, mode, k, s, pass_ = case
    x = _make(shape, dtype, layout, mode, device)
    key = (case, str(device))
    if key not in _checked:  # once per group, before any of its timings
        _check(x, k, s, mode, pass_, dtype)
        _checked.add(key)
    if impl == NOSYNC:
        monkeypatch.setenv("FASTNN_STOCHASTIC_POOL_CHECK", "nan")
    fn = _fn(impl, x, k, s, mode, pass_)
    oh, ow = (shape[2] - k) // s + 1, (shape[3] - k) // s + 1
    out_numel = shape[0] * shape[1] * oh * ow
    flops = out_numel * k * k * (3 if mode == "activation" else 5)
    label = pass_ if (mode == "activation" and layout == "nchw") else f"{pass_} {mode} {layout}"
    # the tutorial loop takes ~0.1-0.5 s a call here: 3 rounds, no warmup, keep the run short
    slow = dict(rounds=3, warmup=0) if impl == "tutorial_loop" else {}
    run_benchmark(benchmark, fn, device=device, op=OP, shape=(*shape, f"k{k}s{s}"), dtype=dtype, pass_=label,
                  impl=impl, bytes_moved=_bytes(x, out_numel, pass_), flops=flops,
                  peak_memory=peak_memory_of(fn, device), **slow)
