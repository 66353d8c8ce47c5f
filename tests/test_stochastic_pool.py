"""Stochastic pooling: kernels against the reference, a naive loop and nn.MaxPool2d; sampling
statistics (chi-square); gradients; layouts; randomness; bad inputs; opcheck; torch.compile."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import reference as R
from fastnn.ops.stochastic_pool import stochastic_pool2d
from helpers import DEVICES, LOWP, assert_lowp_close, noncontig

HAS_OP = fastnn._ext.EXT is not None and hasattr(torch.ops.fastnn, "stochastic_pool2d")
needs_op = pytest.mark.skipif(not HAS_OP, reason=f"fastnn._C not usable: {fastnn._ext.EXT_REASON}")
MODES = ["activation", "softmax"]

# (shape, kernel, stride, padding, ceil_mode): odd sizes, stride != kernel, padding, ceil_mode,
# 2x2 / 3x3 (specialised kernels) and other windows (generic kernels).
CONFIGS = [
    ((2, 3, 8, 8), 2, 2, 0, False),
    ((2, 5, 9, 7), 3, 2, 1, False),
    ((1, 4, 7, 9), 3, 2, 1, True),
    ((3, 2, 11, 6), (3, 2), (1, 2), (1, 0), False),
    ((2, 3, 5, 5), 4, 3, 2, True),
    ((1, 3, 13, 10), (5, 4), 2, 2, True),
    ((2, 2, 6, 7), 2, 1, 1, True),
    ((2, 3, 7, 9), 2, 2, 0, False),  # disjoint windows leaving the last row/column uncovered
    ((1, 4, 9, 10), (2, 3), (3, 4), (1, 1), False),  # stride > kernel, last windows reach the end
]
CONFIG_IDS = [f"{s}-k{k}-s{st}-p{p}-{'ceil' if c else 'floor'}" for s, k, st, p, c in CONFIGS]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def kernel_backend(device):
    return "cuda" if device == "cuda" else "cpu"


def make_input(shape, mode, device, dtype=torch.float32):
    x = torch.rand(shape, device=device, dtype=torch.float32)
    if mode == "softmax":
        x = 4 * x - 2  # negative values are fine in softmax mode
    return x.to(dtype)


def naive_eval(x, k, s, p, ceil_mode, mode):
    """Eval output by slicing each window of the unpadded input (float64), sizes from F.max_pool2d."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    oh, ow = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil_mode).shape[2:]
    x = x.double()
    out = torch.empty(*x.shape[:2], oh, ow, dtype=torch.float64, device=x.device)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh - ph, j * sw - pw
            win = x[:, :, max(h0, 0):h0 + kh, max(w0, 0):w0 + kw].flatten(2)
            if mode == "activation":
                s1 = win.sum(-1)
                out[:, :, i, j] = torch.where(s1 > 0, (win * win).sum(-1) / s1.clamp_min(1e-300), 0.0)
            else:
                out[:, :, i, j] = (torch.softmax(win, -1) * win).sum(-1)
    return out


def positions(offsets, k, s, p):
    """Input coordinates (ih, iw) of each sampled offset."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    oh, ow = offsets.shape[2:]
    o = offsets.long()
    base_h = (torch.arange(oh, device=o.device) * sh - ph).view(1, 1, oh, 1)
    base_w = (torch.arange(ow, device=o.device) * sw - pw).view(1, 1, 1, ow)
    return base_h + o // kw, base_w + o % kw


def op_call(x, k, s, p, ceil_mode, mode, training, generator=None):
    return torch.ops.fastnn.stochastic_pool2d(x, list(_pair(k)), list(_pair(s)), list(_pair(p)), ceil_mode, mode,
                                              training, generator)


def chi2_pvalue(counts, probs):
    """P(chi-square >= observed) for observed counts vs expected probabilities (all > 0)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    exp = torch.as_tensor(probs, dtype=torch.float64) * counts.sum()
    stat = ((counts - exp) ** 2 / exp).sum()
    dof = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


# ------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_op), "reference"])
def test_output_size_and_errors_match_maxpool(backend):
    x = torch.rand(1, 1, 9, 9)
    for h, k, s, p, ceil_mode in itertools.product(range(1, 10, 2), range(1, 5), range(1, 4), range(3),
                                                   [False, True]):
        xi = x[:, :, :h, :h + 1]
        try:
            ref = F.max_pool2d(xi, k, s, p, ceil_mode=ceil_mode)
        except RuntimeError:
            with pytest.raises(ValueError):
                stochastic_pool2d(xi, k, s, p, ceil_mode, training=False, backend=backend)
            continue
        out = stochastic_pool2d(xi, k, s, p, ceil_mode, training=False, backend=backend)
        assert out.shape == ref.shape, (h, k, s, p, ceil_mode)


# ------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_reference_eval_matches_naive_loop(cfg, mode):
    shape, k, s, p, ceil_mode = cfg
    x = make_input(shape, mode, "cpu", torch.float64)
    out = R.stochastic_pool2d(x, _pair(k), _pair(s), _pair(p), ceil_mode, mode, training=False)
    torch.testing.assert_close(out, naive_eval(x, k, s, p, ceil_mode, mode), rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_eval_forward_backward_matches_reference(cfg, mode, device):
    shape, k, s, p, ceil_mode = cfg
    x = make_input(shape, mode, device).requires_grad_()
    xr = x.detach().double().requires_grad_()
    out = stochastic_pool2d(x, k, s, p, ceil_mode, mode, training=False, backend=kernel_backend(device))
    ref = R.stochastic_pool2d(xr, _pair(k), _pair(s), _pair(p), ceil_mode, mode, training=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), naive_eval(x.detach(), k, s, p, ceil_mode, mode), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@needs_op
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2], CONFIGS[4], CONFIGS[6]], ids=lambda c: str(c[1:]))
def test_gradcheck_eval(cfg, mode):
    shape, k, s, p, ceil_mode = cfg
    x = (make_input((1, 2) + shape[2:], mode, "cpu", torch.float64) + 0.05).requires_grad_()
    fn = lambda t: stochastic_pool2d(t, k, s, p, ceil_mode, mode, training=False, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    # higher-order gradients (create_graph=True): were silently zero before the backward had a derivative
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@needs_op
@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_eval_activation_extreme_magnitudes(scale):
    # sum a^2 overflows (1e20) or underflows (1e-30) in float32: the kernels and the reference scale it by
    # the window's max, so output and gradient keep float32 accuracy (were inf / 0)
    x = (torch.rand(2, 3, 6, 6) + 0.1) * scale
    x[0, 0, :2, :2] = torch.tensor([[1.0, 1.0], [0.0, 0.0]]) * scale
    x64 = x.double().requires_grad_()
    want = naive_eval(x64.detach(), 2, 2, 0, False, "activation")
    for backend in ("cpu", "reference"):
        xi = x.clone().requires_grad_()
        out = stochastic_pool2d(xi, 2, 2, 0, False, "activation", training=False, backend=backend)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0, msg=backend)
        out.backward(torch.ones_like(out))
        ref64 = R.stochastic_pool2d(x64, (2, 2), (2, 2), (0, 0), False, "activation", training=False)
        (g64,) = torch.autograd.grad(ref64.sum(), x64)
        torch.testing.assert_close(xi.grad.double(), g64, rtol=1e-4, atol=1e-6, msg=backend)
        assert xi.grad[0, 0, 0, 0].item() == pytest.approx(0.5, rel=1e-5)


@needs_op
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_double_backward_train(mode, layout):
    # y = x[sampled]: dx = grad_out scattered to the samples, linear in grad_out and constant in x, so
    # d<dx, w>/d grad_out = w at the sampled elements (with w = x: the output itself) and d dx/dx = 0
    x = make_input((2, 3, 9, 7), mode, "cpu", torch.float64) + 0.05
    x = x + torch.arange(x.numel(), dtype=x.dtype).view(x.shape) * 1e-3  # distinct values
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = stochastic_pool2d(x, 3, 2, 1, True, mode, training=True, backend="cpu")
    v = torch.randn_like(y, requires_grad=True)
    (dx,) = torch.autograd.grad(y, x, v, create_graph=True)
    (dv,) = torch.autograd.grad((dx * x.detach()).sum(), v, retain_graph=True)
    torch.testing.assert_close(dv, y.detach())
    assert torch.autograd.grad((dx * x.detach()).sum(), x, allow_unused=True)[0] is None


@needs_op
def test_backward_op_refuses_double_backward():
    x = make_input((1, 2, 6, 6), "activation", "cpu").requires_grad_()
    out, offsets = torch.ops.fastnn.stochastic_pool2d(x.detach(), [2, 2], [2, 2], [0, 0], False, "activation", True)
    g = torch.randn_like(out, requires_grad=True)
    dx = torch.ops.fastnn.stochastic_pool2d_backward(g, x, offsets, [2, 2], [2, 2], [0, 0], False, "activation", True)
    with pytest.raises(RuntimeError, match="derivative for fastnn::.* is not implemented"):
        dx.sum().backward()


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("mode", MODES)
def test_eval_low_precision(mode, dtype, device):
    x32 = make_input((4, 16, 15, 15), mode, device)
    x = x32.to(dtype).requires_grad_()
    out = stochastic_pool2d(x, 3, 2, 1, True, mode, training=False, backend=kernel_backend(device))
    assert out.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    ref32 = R.stochastic_pool2d(x32, (3, 3), (2, 2), (1, 1), True, mode, training=False)
    ref_lowp = R.stochastic_pool2d(x.detach(), (3, 3), (2, 2), (1, 1), True, mode, training=False)
    assert_lowp_close(out, ref32, ref_lowp)
    g = torch.randn_like(out)
    out.backward(g)
    ref32.backward(g.float())
    # torch's own low-precision error: the fp32 gradient rounded to the dtype.
    assert_lowp_close(x.grad, x32.grad, x32.grad.to(dtype), factor=2.0, atol=1e-3, what="grad")


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_layouts_eval(mode, device):
    x = make_input((2, 6, 9, 11), mode, device)
    be = kernel_backend(device)
    base = stochastic_pool2d(x, 3, 2, 1, False, mode, training=False, backend=be)
    cl = stochastic_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 2, 1, False, mode, training=False,
                           backend=be)
    nc = stochastic_pool2d(noncontig(x), 3, 2, 1, False, mode, training=False, backend=be)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert base.is_contiguous() and nc.is_contiguous()
    torch.testing.assert_close(cl, base, rtol=0, atol=0)
    torch.testing.assert_close(nc, base, rtol=0, atol=0)
    # gradients, channels_last and non-contiguous
    for make in (lambda t: t.contiguous(memory_format=torch.channels_last), noncontig):
        xa = x.clone().requires_grad_()
        xb = make(x.clone()).requires_grad_()
        g = torch.randn_like(base)
        stochastic_pool2d(xa, 3, 2, 1, False, mode, training=False, backend=be).backward(g)
        stochastic_pool2d(xb, 3, 2, 1, False, mode, training=False, backend=be).backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ training
@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_train_samples_and_gradients(cfg, mode, device):
    """Each output is its sampled element (inside the window, never padding); the gradient lands
    on the sampled elements only (summed where windows overlap)."""
    shape, k, s, p, ceil_mode = cfg
    x = make_input(shape, mode, device)
    if mode == "activation":
        x = torch.where(torch.rand_like(x) < 0.3, torch.zeros_like(x), x)  # zeros are never chosen...
        x[0, 0] = 0  # ...and all-zero windows give 0
    out, offsets = op_call(x, k, s, p, ceil_mode, mode, True)
    assert offsets.dtype == torch.uint8 and offsets.shape == out.shape
    ih, iw = positions(offsets, k, s, p)
    h, w = shape[2:]
    assert bool(((ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)).all()), "a padded position was sampled"
    n_idx = torch.arange(shape[0], device=device).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(shape[1], device=device).view(1, -1, 1, 1).expand_as(ih)
    picked = x[n_idx, c_idx, ih, iw]
    assert torch.equal(out, picked)
    if mode == "activation":
        # a zero is sampled only when its whole window is zero (then output 0)
        windows_sum = F.avg_pool2d(x, k, s, p, ceil_mode=ceil_mode, divisor_override=1)
        assert bool(((out > 0) | (windows_sum == 0)).all())
        assert bool((out[0, 0] == 0).all())
    xg = x.clone().requires_grad_()
    torch.manual_seed(5)
    out2 = stochastic_pool2d(xg, k, s, p, ceil_mode, mode, training=True, backend=kernel_backend(device))
    torch.manual_seed(5)
    _, off2 = op_call(x, k, s, p, ceil_mode, mode, True)
    g = torch.randn_like(out2)
    out2.backward(g)
    ih, iw = positions(off2, k, s, p)
    expect = torch.zeros_like(x).index_put_((n_idx, c_idx, ih, iw), g, accumulate=True)
    torch.testing.assert_close(xg.grad, expect, rtol=1e-6, atol=1e-6)
    assert bool((xg.grad[expect == 0] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_op), "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", [((2, 3, 7, 9), 2, 2, 1, True), ((1, 4, 9, 8), 3, 3, 1, True),
                                 ((2, 2, 6, 8), (3, 2), (3, 2), 0, False)], ids=str)
def test_train_equals_max_pool_when_one_element_dominates(cfg, mode, backend, device):
    """Plain PyTorch check of training: with one nonzero element per (non-overlapping) window
    (activation) or one element 200 above the rest (softmax), sampling is deterministic and
    forward and backward must equal nn.MaxPool2d's."""
    shape, k, s, p, ceil_mode = cfg
    be = kernel_backend(device) if backend == "kernel" else "reference"
    v = torch.rand(shape, device=device) + 0.5
    _, idx = F.max_pool2d(v, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    x = torch.zeros_like(v).flatten(2)
    x.scatter_(2, idx.flatten(2), v.flatten(2).gather(2, idx.flatten(2)))
    x = x.view(shape)
    if mode == "softmax":
        x = torch.where(x > 0, x, torch.full_like(x, -200.0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = stochastic_pool2d(xa, k, s, p, ceil_mode, mode, training=True, backend=be)
    ref = F.max_pool2d(xb, k, s, p, ceil_mode=ceil_mode)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(xa.grad, xb.grad)


def _selection_counts(backend, x, k, s, p, mode, calls):
    """Counts of the sampled window offset, pooled over channels (all windows identical, values
    distinct, so the value identifies the offset)."""
    (kh, kw), (ph, pw) = _pair(k), _pair(p)
    cols = F.unfold(F.pad(x[:1, :1], (pw, pw, ph, ph), value=float("nan")), (kh, kw), stride=_pair(s))
    cols = cols.view(1, 1, kh * kw, -1)  # padding reads NaN: it matches no output
    counts = torch.zeros(kh * kw, dtype=torch.float64)
    for _ in range(calls):
        out = stochastic_pool2d(x, k, s, p, False, mode, training=True, backend=backend)
        match = out.flatten(2)[:, :, None, :] == cols  # (N, C, kh*kw, L)
        assert bool((match.sum(2) == 1).all()), "a sample is not an element of its window"
        counts += match.sum((0, 1, 3)).double().cpu()
    assert counts.sum() == out.numel() * calls
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_op), "reference"])
@pytest.mark.parametrize("case", ["act2x2", "act3x3pad", "act2x3", "soft3x3pad", "soft2x2"])
def test_selection_frequencies_chi_square(case, backend, device):
    """Empirical selection frequencies match p_i (chi-square, p-value > 1e-4 with a fixed seed);
    zero-probability entries (zeros in activation mode, padding) are never selected."""
    be = kernel_backend(device) if backend == "kernel" else "reference"
    if case == "act2x2":
        mode, k, s, p, win = "activation", 2, 2, 0, [0.5, 1.0, 2.0, 4.5]
    elif case == "act3x3pad":  # 2x2 input, 3x3 window at (-1, -1): offsets 4, 5, 7, 8 in bounds
        mode, k, s, p, win = "activation", 3, 2, 1, [0.25, 0.0, 1.0, 2.75]
    elif case == "act2x3":
        mode, k, s, p, win = "activation", (2, 3), (2, 3), 0, [1.0, 0.0, 3.0, 0.5, 2.0, 1.5]
    elif case == "soft3x3pad":
        mode, k, s, p, win = "softmax", 3, 2, 1, [-1.0, 0.5, 1.0, 0.0]
    else:
        mode, k, s, p, win = "softmax", 2, 2, 0, [-2.0, 0.25, 1.0, 0.75]
    kh, kw = _pair(k)
    h, w = (2, 2) if p else (kh, kw)
    n_ch = 20000
    x = torch.tensor(win, device=device).view(1, 1, h, w).expand(1, n_ch, h, w).contiguous()
    counts = _selection_counts(be, x, k, s, p, mode, calls=3)
    # expected p over the window offsets
    ph, pw = _pair(p)
    a = torch.full((kh + 2 * ph, kw + 2 * pw), float("nan"), dtype=torch.float64)
    a[ph:ph + h, pw:pw + w] = torch.tensor(win, dtype=torch.float64).view(h, w)
    a = a[:kh, :kw].flatten()
    valid = ~torch.isnan(a)
    if mode == "activation":
        prob = torch.where(valid, a, torch.zeros_like(a))
        prob = prob / prob.sum()
    else:
        prob = torch.zeros_like(a)
        prob[valid] = torch.softmax(a[valid], 0)
    assert bool((counts[prob == 0] == 0).all()), f"zero-probability offsets were sampled: {counts}, p={prob}"
    pos = prob > 0
    pval = chi2_pvalue(counts[pos], prob[pos])
    assert pval > 1e-4, f"counts {counts.tolist()} vs p {prob.tolist()}: chi-square p-value {pval:.2e}"


@needs_op
def test_chi_square_detects_a_wrong_distribution():
    """The statistic used above can fail: uniform counts against non-uniform p are rejected."""
    assert chi2_pvalue([15000, 15000, 15000, 15000], [0.0625, 0.125, 0.25, 0.5625]) < 1e-100
    assert chi2_pvalue([3760, 7510, 14950, 33780], [0.0625, 0.125, 0.25, 0.5625]) > 1e-4


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_windows(device):
    x = torch.zeros(2, 3, 6, 6, device=device)
    x[:, :, 0, 0] = torch.rand(2, 3, device=device) + 0.1  # only window (0, 0) is not all zero
    for training in (True, False):
        xg = x.clone().requires_grad_()
        out = stochastic_pool2d(xg, 3, 2, 1, True, "activation", training=training, backend=kernel_backend(device))
        ref = R.stochastic_pool2d(x, (3, 3), (2, 2), (1, 1), True, "activation", training=False)
        zero = ref == 0
        assert int(zero.sum()) == zero.numel() - 6
        assert bool((out[zero] == 0).all()) and not torch.isnan(out).any()
        out.backward(torch.ones_like(out))
        assert torch.isfinite(xg.grad).all()
        if not training:
            # eval: all-zero windows pass no gradient; window (0, 0) covers rows/cols 0..1
            assert bool((xg.grad[:, :, 2:] == 0).all()) and bool((xg.grad[:, :, :, 2:] == 0).all())
            assert bool((xg.grad[:, :, :2, :2] != 0).all())


# ------------------------------------------------------------------------------------ randomness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_op), "reference"])
def test_seed_and_generator_reproducible(backend, device):
    be = kernel_backend(device) if backend == "kernel" else "reference"
    x = torch.rand(4, 8, 16, 16, device=device) + 0.01

    def run(**kw):
        return stochastic_pool2d(x, 2, training=True, backend=be, **kw)

    torch.manual_seed(123)
    a = run()
    b = run()
    torch.manual_seed(123)
    assert torch.equal(run(), a)
    assert not torch.equal(a, b), "consecutive calls drew the same samples"
    torch.manual_seed(124)
    assert not torch.equal(run(), a)
    g1 = torch.Generator(device=device).manual_seed(7)
    g2 = torch.Generator(device=device).manual_seed(7)
    torch.manual_seed(0)
    before = torch.rand(1, device=device)
    torch.manual_seed(0)
    ga = run(generator=g1)
    after = torch.rand(1, device=device)
    assert torch.equal(before, after), "generator= must not consume the default generator"
    assert torch.equal(run(generator=g2), ga)
    assert not torch.equal(run(generator=g1), ga)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eager_fast_path_equals_registered_op(training, layout, device, monkeypatch):
    """Eager calls run the kernels through _StochasticPoolFn (below the autograd key); torch.compile and
    torch.func run the torch.library op. Same generator state -> the same output and gradient."""
    from fastnn.ops import stochastic_pool as ops
    x0 = torch.rand(2, 5, 9, 7, device=device) + 0.01
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 5, 4, 3, device=device)
    got = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ops, "_eager_ok", lambda t: False)
        x = x0.clone().requires_grad_()
        gen = torch.Generator(device=device).manual_seed(3)
        y = stochastic_pool2d(x, 3, 2, 0, training=training, generator=gen, backend=kernel_backend(device))
        assert (type(y.grad_fn).__name__ == "_StochasticPoolFnBackward") == fast
        (gx,) = torch.autograd.grad(y, x, g)
        with torch.no_grad():
            y_ng = stochastic_pool2d(x0, 3, 2, 0, training=training, generator=gen.manual_seed(3),
                                     backend=kernel_backend(device))
        got[fast] = (y.detach(), gx, y_ng)
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)
    y, gx, y_ng = got[True]
    assert torch.equal(y, y_ng) and y.is_contiguous(memory_format=torch.channels_last) == (layout != "contiguous")
    if not training:  # eval is deterministic: against the reference, value and gradient
        xr = x0.double().requires_grad_()
        ref = R.stochastic_pool2d(xr, (3, 3), (2, 2), (0, 0), training=False)
        (gr,) = torch.autograd.grad(ref, xr, g.double())
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(gx.double(), gr, rtol=1e-4, atol=1e-6)
    else:  # each window's gradient lands on one element of it (overlapping windows may share one)
        assert torch.allclose(gx.sum().double(), g.sum().double(), rtol=1e-5, atol=1e-5)
        assert 0 < int((gx != 0).sum()) <= g.numel()


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_samples_independent_of_layout(mode, device):
    """Samples are keyed by the logical NCHW index: NCHW, channels_last and strided inputs draw
    the same elements with the same seed."""
    x = make_input((2, 5, 9, 10), mode, device)
    outs = []
    for t in (x, x.contiguous(memory_format=torch.channels_last), noncontig(x)):
        torch.manual_seed(3)
        outs.append(op_call(t, 3, 2, 1, False, mode, True))
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)
    assert outs[1][1].is_contiguous(memory_format=torch.channels_last)
    for out, off in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(off, outs[0][1])
    # training backward in channels_last
    xa = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(3)
    out = stochastic_pool2d(xa, 3, 2, 1, False, mode, training=True, backend=kernel_backend(device))
    g = torch.randn_like(out)
    out.backward(g)
    ih, iw = positions(outs[0][1], 3, 2, 1)
    n_idx = torch.arange(2, device=device).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(5, device=device).view(1, -1, 1, 1).expand_as(ih)
    expect = torch.zeros_like(x).index_put_((n_idx, c_idx, ih, iw), g, accumulate=True)
    torch.testing.assert_close(xa.grad, expect, rtol=1e-6, atol=1e-6)
    assert xa.grad.is_contiguous(memory_format=torch.channels_last)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
def test_train_low_precision(dtype, device):
    x = torch.rand(3, 7, 12, 13, device=device).to(dtype)
    out, off = op_call(x, 3, 2, 1, True, "activation", True)
    ih, iw = positions(off, 3, 2, 1)
    n_idx = torch.arange(3, device=device).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(7, device=device).view(1, -1, 1, 1).expand_as(ih)
    assert out.dtype == dtype and torch.equal(out, x[n_idx, c_idx, ih, iw])
    g = torch.randn(out.shape, device=device).to(dtype)
    gi = torch.ops.fastnn.stochastic_pool2d_backward(g, x, off, [3, 3], [2, 2], [1, 1], True, "activation", True)
    expect = torch.zeros_like(x, dtype=torch.float32).index_put_((n_idx, c_idx, ih, iw), g.float(), accumulate=True)
    assert_lowp_close(gi, expect, expect.to(dtype), what="grad")


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_times_channels(device):
    """N*C beyond 65535 (grid limits) with a generic window; eval against the reference."""
    x = torch.rand(3, 30000, 4, 5, device=device)
    out = stochastic_pool2d(x, (2, 3), (2, 2), (1, 1), False, training=False, backend=kernel_backend(device))
    ref = R.stochastic_pool2d(x, (2, 3), (2, 2), (1, 1), False, "activation", False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    tr, off = op_call(x, (2, 3), (2, 2), (1, 1), False, "activation", True)
    ih, iw = positions(off, (2, 3), 2, 1)
    n_idx = torch.arange(3, device=device).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(30000, device=device).view(1, -1, 1, 1).expand_as(ih)
    assert torch.equal(tr, x[n_idx, c_idx, ih, iw])


@pytest.mark.cuda
def test_cuda_more_than_2_31_elements():
    """64-bit indexing path: 2^31 + 2^20 elements in fp16, k=1 so the output is the input."""
    c = (2 ** 31 + 2 ** 20) // (4 * 4)
    x = torch.rand(1, c, 4, 4, device="cuda", dtype=torch.float16)
    for training in (True, False):
        out, off = op_call(x, 1, 1, 0, False, "softmax", training)
        assert torch.equal(out, x)
        del out, off
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_op), "reference"])
@pytest.mark.parametrize("training", [True, False])
def test_negative_input_in_activation_mode_raises(training, backend, device):
    be = kernel_backend(device) if backend == "kernel" else "reference"
    x = torch.rand(2, 3, 8, 8, device=device)
    x[1, 2, 5, 6] = -1e-3
    with pytest.raises(ValueError, match=r"(?s)ReLU.*mode='softmax'"):
        stochastic_pool2d(x, 2, training=training, backend=be)
    with pytest.raises(ValueError, match="ReLU"):
        fastnn.nn.StochasticPool2d(3, 2, 1).train(training).to(device)(x.contiguous(memory_format=torch.channels_last))
    # softmax mode takes negative inputs
    assert torch.isfinite(stochastic_pool2d(x, 2, mode="softmax", training=training, backend=be)).all()


@pytest.mark.cuda
def test_negative_input_cuda_without_sync_gives_nan(monkeypatch):
    """FASTNN_STOCHASTIC_POOL_CHECK=nan: no host sync, no error, but the windows with a negative
    value output NaN (never a silently wrong number)."""
    monkeypatch.setenv("FASTNN_STOCHASTIC_POOL_CHECK", "nan")
    x = torch.rand(2, 3, 8, 8, device="cuda")
    x[1, 2, 5, 6] = -1e-3
    for training in (True, False):
        out = stochastic_pool2d(x, 2, training=training, backend="cuda")
        nan = torch.isnan(out)
        assert bool(nan[1, 2, 2, 3]) and int(nan.sum()) == 1


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_negative_input_raw_op(device):
    """Calling the op directly (C++ callers) raises the same ValueError."""
    x = -torch.rand(1, 1, 4, 4, device=device)
    with pytest.raises(ValueError, match="ReLU"):
        op_call(x, 2, 2, 0, False, "activation", True)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_op), "reference"])
def test_bad_arguments(backend):
    x = torch.rand(2, 3, 8, 8)

    def call(inp=x, *a, **kw):
        return stochastic_pool2d(inp, *a, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"4-D.*unsqueeze\(0\)"):
        call(torch.rand(3, 8, 8), 2)
    with pytest.raises(ValueError, match="4-D"):
        call(torch.rand(1, 2, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        call(x, 9)
    with pytest.raises(ValueError, match="larger than the padded input"):
        call(torch.rand(1, 1, 3, 3), 6, 1, 1)
    with pytest.raises(ValueError, match="stride must be positive"):
        call(x, 2, 0)
    with pytest.raises(ValueError, match="stride must be positive"):
        call(x, 2, (1, 0))
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        call(x, 0)
    with pytest.raises(ValueError, match="at most half"):
        call(x, 2, 2, 2)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        call(x, 2, 2, -1)
    with pytest.raises(ValueError, match="at most 256"):
        call(torch.rand(1, 1, 20, 20), 17)
    with pytest.raises(ValueError, match="mode must be"):
        call(x, 2, mode="max")
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        call(x, 2.0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        call(x, (2, 2, 2))
    with pytest.raises(TypeError, match="float32"):
        call(torch.randint(0, 5, (2, 3, 8, 8)), 2)
    with pytest.raises(TypeError, match="generator"):
        call(x, 2, generator=3)
    with pytest.raises(ValueError, match="stride must be positive"):
        fastnn.nn.StochasticPool2d(2, 0)
    with pytest.raises(ValueError, match="mode"):
        fastnn.nn.StochasticPool2d(2, mode="avg")


@pytest.mark.cuda
def test_generator_on_wrong_device():
    with pytest.raises(ValueError, match="torch.Generator\\(device=input.device\\)"):
        stochastic_pool2d(torch.rand(1, 1, 4, 4, device="cuda"), 2, generator=torch.Generator())


@needs_op
def test_raw_op_checks_arguments():
    """The C++ boundary repeats the checks (ValueError/TypeError, never a crash)."""
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.fastnn.stochastic_pool2d(torch.rand(2, 6, 6), [2, 2], [2, 2], [0, 0], False, "activation", True)
    with pytest.raises(ValueError, match="stride must be positive"):
        torch.ops.fastnn.stochastic_pool2d(x, [2, 2], [0, 2], [0, 0], False, "activation", True)
    with pytest.raises(ValueError, match="larger than the padded input"):
        torch.ops.fastnn.stochastic_pool2d(x, [7, 7], [1, 1], [0, 0], False, "activation", True)
    with pytest.raises(ValueError, match="at most 256"):
        torch.ops.fastnn.stochastic_pool2d(torch.rand(1, 1, 20, 20), [16, 17], [1, 1], [0, 0], False, "softmax",
                                           True)
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.fastnn.stochastic_pool2d(x, [2, 2], [2, 2], [0, 0], False, "max", True)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.fastnn.stochastic_pool2d(x.int(), [2, 2], [2, 2], [0, 0], False, "activation", True)
    out, off = torch.ops.fastnn.stochastic_pool2d(x, [2, 2], [2, 2], [0, 0], False, "activation", True)
    g = torch.ones_like(out)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.fastnn.stochastic_pool2d_backward(g, x, off.long(), [2, 2], [2, 2], [0, 0], False, "activation",
                                                    True)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        torch.ops.fastnn.stochastic_pool2d_backward(g[:, :1], x, off, [2, 2], [2, 2], [0, 0], False, "activation",
                                                    True)


# ------------------------------------------------------------------------------------ torch.library / compile
@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training, mode, device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make_input((2, 3, 7, 6), mode, device, dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=layout).requires_grad_()
        args = (xi, [3, 3], [2, 2], [1, 1], True, mode, training, None)
        torch.library.opcheck(torch.ops.fastnn.stochastic_pool2d.default, args)
        out, off = torch.ops.fastnn.stochastic_pool2d(*args)
        bargs = (torch.randn_like(out), xi.detach(), off, [3, 3], [2, 2], [1, 1], True, mode, training)
        torch.library.opcheck(torch.ops.fastnn.stochastic_pool2d_backward.default, bargs)


@needs_op
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    pool = fastnn.nn.StochasticPool2d(3, 2, 1, mode=mode)

    def f(x):
        return pool(torch.relu(x) if mode == "activation" else x) * 2

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    x = torch.randn(2, 4, 11, 10, requires_grad=True)
    for training in (True, False):
        pool.train(training)
        torch.manual_seed(11)
        a = cf(x)
        torch.manual_seed(11)
        b = f(x)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        ga, = torch.autograd.grad(a.sum(), x)
        gb, = torch.autograd.grad(b.sum(), x)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    assert fastnn.backends.last_choice("stochastic_pool2d")[0] == "cpu"


def test_reference_compiles_fullgraph():
    """The pure-PyTorch fallback also compiles in one graph (negative inputs give NaN there)."""
    torch._dynamo.reset()
    f = torch.compile(lambda t: stochastic_pool2d(t, 3, 2, 1, True, training=False, backend="reference"),
                      fullgraph=True, backend="aot_eager")
    x = torch.rand(2, 3, 9, 8)
    torch.testing.assert_close(f(x), naive_eval(x, 3, 2, 1, True, "activation").float(), rtol=1e-5, atol=1e-6)
    x[0, 1, 3, 3] = -1.0  # in the windows (1..2, 1..2)
    out = f(x)
    assert bool(torch.isnan(out[0, 1, 1:3, 1:3]).all()) and int(torch.isnan(out).sum()) == 4


# ------------------------------------------------------------------------------------ module / backends
@needs_op
def test_module_and_backend_choice():
    pool = fastnn.nn.StochasticPool2d(2)
    assert "kernel_size=2" in repr(pool) and "mode='activation'" in repr(pool)
    assert list(pool.state_dict()) == []
    x = torch.rand(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the reference
        pool.train()(x)
    assert fastnn.backends.last_choice("stochastic_pool2d")[0] == "cpu"
    ev = pool.eval()(x)
    torch.testing.assert_close(ev, R.stochastic_pool2d(x, (2, 2), (2, 2), (0, 0), False, "activation", False))
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), fastnn.nn.StochasticPool2d(2))
    y = seq(torch.randn(2, 3, 8, 8))
    y.sum().backward()
    assert y.shape == (2, 4, 4, 4) and seq[0].weight.grad is not None
    with fastnn.use_backend("reference"):
        pool.train()(x)
    assert fastnn.backends.last_choice("stochastic_pool2d")[0] == "reference"


# ------------------------------------------------------------------------------------ CUDA code on the CPU
# The CUDA kernels' per-thread bodies (csrc/stochastic_pool/cuda/stochastic_pool_cuda_kernels.cuh)
# are host-compilable: tests/stochastic_pool_cuda_emu.cpp runs them for every thread index, with
# the GPU variant of the sampling code, so their indexing, layouts, sampling and backward paths
# are checked here without a GPU (float32; the GPU's fast-math exp is not emulated).
_EMU = {}


def _emu_lib():
    if "lib" in _EMU:
        return _EMU["lib"]
    import ctypes
    import os
    import shutil
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "g++").split()[-1]
    if shutil.which(cxx) is None:
        _EMU["lib"] = None
        _EMU["why"] = f"no host compiler ({cxx})"
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    incs = ["-I" + os.path.join(root, "csrc"), "-I" + os.path.join(os.path.dirname(torch.__file__), "include")]
    # IntegerDivider.cuh includes cuda_runtime.h: the toolkit's, or the one in the nvidia wheels
    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += ["/usr/local/cuda/include"] + sorted(__import__("glob").glob("/usr/local/cuda-*/include"))
    cands += [os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", d, "include")
              for d in ("cu13", "cuda_runtime", "cu12")]
    cuda_inc = [d for d in cands if os.path.isfile(os.path.join(d, "cuda_runtime.h"))]
    if not cuda_inc:
        _EMU["lib"] = None
        _EMU["why"] = "cuda_runtime.h not found (no CUDA toolkit or nvidia wheels)"
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="fastnn_sp_emu_"), "sp_emu.so")
    src = os.path.join(root, "tests", "stochastic_pool_cuda_emu.cpp")
    err = ""
    for std in ("-std=c++17", "-std=c++20"):
        r = subprocess.run([cxx, std, "-O1", "-shared", "-fPIC", *incs, "-I" + cuda_inc[0], src, "-o", out],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
        err = r.stderr[-2000:]
    else:
        raise AssertionError(f"building the CUDA-kernel emulation failed:\n{err}")
    lib = ctypes.CDLL(out)
    vp, u64, ci = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
    lib.sp_emu_forward.argtypes = [vp, vp, vp, vp, ci, ci, u64, u64, ci]
    lib.sp_emu_forward.restype = ci
    lib.sp_emu_backward.argtypes = [vp, vp, vp, vp, vp, ci, ci, ci]
    _EMU["lib"] = lib
    return lib


def _layout_of(x):
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def _geom(x, k, s, p, oh, ow, ys, os_, gs):
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    vals = [*x.shape, oh, ow, kh, kw, sh, sw, ph, pw, *x.stride(), *ys, *os_, *gs,
            int(_layout_of(x) == torch.channels_last)]
    return torch.tensor(vals, dtype=torch.int64)


def emu_forward(x, k, s, p, ceil_mode, mode, training, seed=0, offset=0, force64=False):
    lib = _emu_lib()
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    oh = R.stochastic_pool_output_size(h, kh, sh, ph, ceil_mode)
    ow = R.stochastic_pool_output_size(w, kw, sw, pw, ceil_mode)
    fmt = _layout_of(x)
    out = torch.empty((n, c, oh, ow), memory_format=fmt).fill_(float("nan"))
    off = torch.empty((n, c, oh, ow), dtype=torch.uint8, memory_format=fmt).fill_(255)
    geom = _geom(x, k, s, p, oh, ow, out.stride(), off.stride(), (0, 0, 0, 0))
    neg = lib.sp_emu_forward(x.data_ptr(), out.data_ptr(), off.data_ptr(), geom.data_ptr(),
                             MODES.index(mode), int(training), seed, offset, int(force64))
    return out, (off if training else None), bool(neg)


def emu_backward(g, x, off, k, s, p, mode, training, force64=False):
    lib = _emu_lib()
    gi = torch.empty(x.shape, memory_format=_layout_of(x)).fill_(float("nan"))
    oh, ow = g.shape[2:]
    geom = _geom(x, k, s, p, oh, ow, gi.stride(), off.stride() if off is not None else (0,) * 4, g.stride())
    lib.sp_emu_backward(g.data_ptr(), x.data_ptr(), off.data_ptr() if off is not None else None, gi.data_ptr(),
                        geom.data_ptr(), MODES.index(mode), int(training), int(force64))
    return gi


def _philox_uniforms(seed, offset, idx):
    """Python Philox4x32-10 (as stochastic_pool_math.h): the uniform of logical output index idx."""
    m32 = 0xFFFFFFFF
    ctr = offset // 4
    c = [torch.full_like(idx, ctr & m32), torch.full_like(idx, ctr >> 32), (idx >> 2) & m32, (idx >> 34) & m32]
    k0, k1 = seed & m32, seed >> 32
    for _ in range(10):
        p0 = c[0] * 0xD2511F53
        p1 = c[2] * 0xCD9E8D57
        hi0, lo0, hi1, lo1 = (p0 >> 32) & m32, p0 & m32, (p1 >> 32) & m32, p1 & m32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    word = torch.stack(c, -1).gather(-1, (idx & 3).unsqueeze(-1)).squeeze(-1)
    return (word >> 8).float() * (1.0 / 16777216.0)


def _expected_offsets(x, k, s, p, ceil_mode, mode, seed, offset):
    """Inverse-CDF draw in float32 with sequential sums, as the kernels (activation: exact)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    n, c, h, w = x.shape
    cols, mask, oh, ow = R._stochastic_pool_windows(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode)
    cols = cols.float()
    if mode == "softmax":
        a = cols.masked_fill(~mask, float("-inf"))
        wts = torch.exp(a - a.amax(2, keepdim=True))
    else:
        wts = cols
    idx = torch.arange(n * c * oh * ow).view(n, c, 1, oh * ow)
    u = _philox_uniforms(seed, offset, idx)
    cum = torch.zeros_like(wts[:, :, :1])
    cums = []
    for i in range(kh * kw):
        cum = cum + wts[:, :, i:i + 1]
        cums.append(cum)
    cums = torch.cat(cums, 2)
    t = u * cums[:, :, -1:]
    below = (cums <= t).sum(2, keepdim=True)
    return below.view(n, c, oh, ow), (cums - t).abs().amin(2).view(n, c, oh, ow) / cums[:, :, -1].view(n, c, oh, ow)


def _emu_or_skip():
    if _emu_lib() is None:
        pytest.skip(f"CUDA-kernel emulation unavailable: {_EMU['why']}")


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_cuda_kernels_emulated_on_cpu(cfg, mode, layout):
    _emu_or_skip()
    shape, k, s, p, ceil_mode = cfg
    x = make_input(shape, mode, "cpu")
    if mode == "activation":
        x = torch.where(torch.rand_like(x) < 0.25, torch.zeros_like(x), x)
        x[0, 0] = 0  # all-zero windows
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":
        x = noncontig(x)
    force64 = layout == "noncontig"  # also run the 64-bit index path
    kk, ss, pp = list(_pair(k)), list(_pair(s)), list(_pair(p))
    # eval forward and backward against the CPU kernels
    ev, _, neg = emu_forward(x, k, s, p, ceil_mode, mode, False, force64=force64)
    ref, _ = torch.ops.fastnn.stochastic_pool2d(x, kk, ss, pp, ceil_mode, mode, False)
    assert not neg and ev.stride() == ref.stride()
    torch.testing.assert_close(ev, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(ref.shape)
    g = g.transpose(2, 3).contiguous().transpose(2, 3)  # a strided grad_output
    gi = emu_backward(g, x, None, k, s, p, mode, False, force64)
    gref = torch.ops.fastnn.stochastic_pool2d_backward(g, x, torch.empty(0, dtype=torch.uint8), kk, ss, pp, ceil_mode,
                                                       mode, False)
    assert gi.stride() == gref.stride()
    torch.testing.assert_close(gi, gref, rtol=1e-5, atol=1e-6)
    # training forward: the Philox draws and the inverse CDF, against the Python expectation
    seed, offset = 0x1234_5678_9ABC_DEF1, 8
    tr, off, neg = emu_forward(x, k, s, p, ceil_mode, mode, True, seed, offset, force64)
    assert not neg
    expect, margin = _expected_offsets(x, k, s, p, ceil_mode, mode, seed, offset)
    ih, iw = positions(off, k, s, p)
    h, w = shape[2:]
    assert bool(((ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)).all())
    n_idx = torch.arange(shape[0]).view(-1, 1, 1, 1).expand_as(ih)
    c_idx = torch.arange(shape[1]).view(1, -1, 1, 1).expand_as(ih)
    assert torch.equal(tr, x[n_idx, c_idx, ih, iw])
    nonzero = tr != 0 if mode == "activation" else torch.ones_like(tr, dtype=torch.bool)
    differ = (off.long() != expect) & nonzero
    if mode == "activation":
        assert not differ.any(), "sampled offsets differ from the Philox/inverse-CDF expectation"
    else:  # exp may differ by an ulp between libm and torch: only near-ties may disagree
        assert bool((margin[differ] < 1e-5).all())
    # training backward: disjoint (per output) or gather (per input) kernel vs the CPU kernels
    gi = emu_backward(g, x, off, k, s, p, mode, True, force64)
    gref = torch.ops.fastnn.stochastic_pool2d_backward(g, x, off, kk, ss, pp, ceil_mode, mode, True)
    torch.testing.assert_close(gi, gref, rtol=1e-6, atol=1e-6)


@needs_op
def test_cuda_kernels_emulated_negative_flag():
    _emu_or_skip()
    x = torch.rand(1, 2, 5, 5)
    x[0, 1, 4, 4] = -0.5
    out, _, neg = emu_forward(x, 2, 2, 1, True, "activation", False)
    assert neg and torch.isnan(out[0, 1, 2, 2]) and not torch.isnan(out[0, 0]).any()
    assert not emu_forward(x, 2, 2, 1, True, "softmax", True)[2]
