"""fastnn Conv-BN-ReLU against PyTorch's Conv2d -> BatchNorm2d -> ReLU and fastnn.reference."""
import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastnn
from fastnn import reference
from fastnn.nn import ConvBN2d, ConvBNReLU2d, convert_sync_batchnorm, remap_sequential_state_dict
from fastnn.ops import conv_bn_relu as cbr_ops
from helpers import assert_lowp_close, noncontig

pytestmark = pytest.mark.skipif(not cbr_ops.HAVE_OPS, reason="fastnn extension not built")

CL = torch.channels_last
OPS = torch.ops.fastnn


def make_pair(cin=6, cout=8, k=3, stride=1, padding=1, dilation=1, groups=1, bias=False, relu=True, device="cpu",
              dtype=torch.float32, randomize=True, **bn_kw):
    """A reference nn.Sequential and a fastnn block holding the same (randomized) state."""
    layers = [nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, **_conv_kw(bn_kw)),
              nn.BatchNorm2d(cout, **bn_kw)]
    if relu:
        layers.append(nn.ReLU())
    ref = nn.Sequential(*layers).to(device, dtype)
    if randomize:
        with torch.no_grad():
            bn = ref[1]
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if bn.running_mean is not None:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    cls = ConvBNReLU2d if relu else ConvBN2d
    m = cls(cin, cout, k, stride, padding, dilation, groups, bias, padding_mode=ref[0].padding_mode,
            **{k_: v for k_, v in bn_kw.items()}).to(device, dtype)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _conv_kw(bn_kw):
    kw = {}
    if "padding_mode" in bn_kw:
        kw["padding_mode"] = bn_kw.pop("padding_mode")
    return kw


def close(a, b, what, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def train_steps(ref, m, shape, steps=3, channels_last=False, device="cpu", dtype=torch.float32, tol=None):
    rtol, atol = tol or ((1e-5, 1e-5) if dtype == torch.float32 else (1e-10, 1e-10))
    ref.train()
    m.train()
    for step in range(steps):
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=CL)
        xr = x.clone().requires_grad_()
        xm = x.clone().requires_grad_()
        yr, ym = ref(xr), m(xm)
        assert ym.dtype == yr.dtype and ym.shape == yr.shape
        assert ym.is_contiguous(memory_format=CL) == yr.is_contiguous(memory_format=CL)
        g = torch.randn_like(yr)
        yr.backward(g)
        ym.backward(g)
        close(ym, yr, f"step {step} output", rtol, atol)
        close(xm.grad, xr.grad, f"step {step} input grad", rtol, atol)
        for (n, pr), pm in zip(ref.named_parameters(), m.parameters()):
            close(pm.grad, pr.grad, f"step {step} grad of {n}", rtol * 10, atol * 10)
        for (n, br), bm in zip(ref.named_buffers(), m.buffers()):
            close(bm, br, f"step {step} buffer {n}", rtol, atol)
        ref.zero_grad()
        m.zero_grad()


# ---------------------------------------------------------------- training vs nn.Sequential

TRAIN_CASES = {
    "3x3": dict(),
    "stride2_odd": dict(stride=2, shape=(3, 6, 11, 9)),
    "1x1": dict(k=1, padding=0),
    "dilation2": dict(dilation=2, padding=2),
    "groups": dict(cin=6, cout=9, groups=3),
    "conv_bias": dict(bias=True),
    "affine_false": dict(affine=False),
    "momentum_none": dict(momentum=None),
    "momentum_0.3_eps": dict(momentum=0.3, eps=1e-3),
    "reflect": dict(padding_mode="reflect"),
    "no_relu": dict(relu=False),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_matches_sequential(case, channels_last):
    kw = dict(TRAIN_CASES[case])
    shape = kw.pop("shape", (2, kw.get("cin", 6), 7, 5))
    ref, m = make_pair(**kw)
    train_steps(ref, m, shape, channels_last=channels_last)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "cpu"


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_float64_tight(channels_last):
    ref, m = make_pair(dtype=torch.float64)
    train_steps(ref, m, (3, 6, 9, 8), channels_last=channels_last, dtype=torch.float64)


def test_train_noncontiguous_input():
    ref, m = make_pair()
    x = noncontig(torch.randn(3, 6, 9, 7))
    xr, xm = x.detach().clone().requires_grad_(), noncontig(x.detach()).requires_grad_()
    yr, ym = ref(xr), m(xm)
    close(ym, yr, "output")
    g = noncontig(torch.randn_like(yr))  # a non-contiguous incoming gradient too
    yr.backward(g)
    ym.backward(g)
    close(xm.grad, xr.grad, "input grad")
    close(m.bn.weight.grad, ref[1].weight.grad, "bn weight grad", 1e-4, 1e-4)


def test_track_running_stats_false():
    ref, m = make_pair(track_running_stats=False)
    assert m.bn.running_mean is None
    train_steps(ref, m, (2, 6, 7, 5), steps=2)
    ref.eval()
    m.eval()  # no running statistics: eval normalizes with the batch statistics, as PyTorch
    x = torch.randn(2, 6, 7, 5)
    close(m(x), ref(x), "eval with batch statistics")


def test_track_running_stats_toggled_after_init():
    ref, m = make_pair()
    ref[1].track_running_stats = False
    m.bn.track_running_stats = False
    train_steps(ref, m, (2, 6, 7, 5), steps=2)  # batch statistics, buffers untouched
    ref.eval()
    m.eval()
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        close(m(x), ref(x), "eval uses the (unchanged) running statistics")


def test_one_value_per_channel_raises_like_pytorch():
    ref, m = make_pair(k=1, padding=0)
    x = torch.randn(1, 6, 1, 1)
    with pytest.raises(ValueError) as er:
        ref(x)
    with pytest.raises(ValueError) as em:
        m(x)
    assert str(em.value) == str(er.value)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastnn.functional.batch_norm_relu(torch.randn(1, 4), None, None, training=True)
    m.eval()
    assert m(x).shape == (1, 8, 1, 1)  # fine in eval


def test_empty_batch_train_like_pytorch():
    ref, m = make_pair()
    x = torch.randn(0, 6, 7, 5)
    yr, ym = ref(x), m(x)
    assert ym.shape == yr.shape
    for (n, br), bm in zip(ref.named_buffers(), m.buffers()):
        close(bm, br, f"buffer {n} after an empty batch")


def test_eval_after_training_several_steps():
    ref, m = make_pair()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_m = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 6, 8, 8)
        for mod, opt in ((ref, opt_r), (m, opt_m)):
            mod.train()
            opt.zero_grad()
            mod(x).square().mean().backward()
            opt.step()
        ref.eval()
        m.eval()
        xe = torch.randn(3, 6, 8, 8)
        with torch.no_grad():  # the cached fold must follow the optimizer step and the new running stats
            close(m(xe), ref(xe), "eval after an optimizer step", 1e-4, 1e-5)
    close(m.bn.running_var, ref[1].running_var, "running_var")
    assert int(m.bn.num_batches_tracked) == int(ref[1].num_batches_tracked) == 3


# ---------------------------------------------------------------- eval

EVAL_CASES = {
    "3x3": dict(),
    "stride2": dict(stride=2),
    "1x1": dict(k=1, padding=0),
    "dilation2": dict(dilation=2, padding=2),
    "groups": dict(cin=6, cout=9, groups=3),
    "conv_bias": dict(bias=True),
    "affine_false": dict(affine=False),
    "same": dict(padding="same"),
    "reflect": dict(padding_mode="reflect"),
    "no_relu": dict(relu=False),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_eval_matches_sequential(case, layout):
    ref, m = make_pair(**EVAL_CASES[case])
    ref.eval()
    m.eval()
    x = torch.randn(3, 6, 11, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "noncontig":
        x = noncontig(x)
    with torch.no_grad():
        yr, ym = ref(x), m(x)
    close(ym, yr, "eval output", 1e-4, 1e-5)
    assert ym.is_contiguous(memory_format=CL) == yr.is_contiguous(memory_format=CL)
    assert ym.is_contiguous() == yr.is_contiguous()


def test_eval_float64_and_inference_mode():
    ref, m = make_pair(dtype=torch.float64, bias=True)
    ref.eval()
    m.eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.inference_mode():
        close(m(x), ref(x), "eval float64", 1e-12, 1e-12)


def test_eval_empty_batch():
    ref, m = make_pair()
    ref.eval()
    m.eval()
    x = torch.randn(0, 6, 7, 5)
    with torch.no_grad():
        assert m(x).shape == ref(x).shape == (0, 8, 7, 5)
    x = torch.randn(0, 6, 7, 5, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.shape == x.shape


def test_eval_gradients_flow_through_the_fold():
    """eval() with autograd (e.g. fine-tuning with frozen statistics): gradients of input and parameters."""
    ref, m = make_pair(bias=True, dtype=torch.float64)
    ref.eval()
    m.eval()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    ref(xr).backward(g)
    m(xm).backward(g)
    close(xm.grad, xr.grad, "input grad", 1e-10, 1e-10)
    for (n, pr), pm in zip(ref.named_parameters(), m.parameters()):
        close(pm.grad, pr.grad, f"grad of {n}", 1e-10, 1e-10)


def test_fold_cache_follows_changes():
    ref, m = make_pair(bias=True)
    ref.eval()
    m.eval()
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        close(m(x), ref(x), "first eval")
        w_before = m._fold[0]
        close(m(x), ref(x), "cached eval")
        assert m._fold[0] is w_before  # cached, not refolded
        for t_ref, t_m in ((ref[1].running_var, m.bn.running_var), (ref[1].weight, m.bn.weight),
                           (ref[0].bias, m.conv.bias), (ref[1].running_mean, m.bn.running_mean)):
            t_ref.mul_(1.5)
            t_m.mul_(1.5)
            close(m(x), ref(x), "after an in-place change")
    other_ref, _ = make_pair(bias=True)
    ref.load_state_dict(other_ref.state_dict())
    m.load_state_dict(other_ref.state_dict())
    with torch.no_grad():
        close(m(x), ref(x), "after load_state_dict")
    m.double()
    ref.double()
    with torch.no_grad():
        close(m(x.double()), ref(x.double()), "after .double()", 1e-10, 1e-10)


# ---------------------------------------------------------------- modules: state dict, from_modules, errors

def test_state_dict_maps_key_for_key():
    seq = nn.Sequential(nn.Conv2d(4, 5, 3, bias=True), nn.BatchNorm2d(5), nn.ReLU())
    m = ConvBNReLU2d(4, 5, 3, bias=True)
    mapped = remap_sequential_state_dict(seq.state_dict())
    assert list(mapped) == list(m.state_dict())
    m.load_state_dict(seq.state_dict())  # the Sequential's own keys load directly
    for (k, v), (k2, v2) in zip(seq.state_dict().items(), m.state_dict().items()):
        assert torch.equal(v, v2), (k, k2)
    outer = nn.Sequential(nn.Identity(), m)  # nested: keys under a prefix
    sd = {"1." + k: v for k, v in seq.state_dict().items()}
    outer.load_state_dict(sd)
    assert set(remap_sequential_state_dict(sd, prefix="1.")) == set(outer.state_dict())


def test_from_modules_shares_parameters_and_buffers():
    conv, bn, relu = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
    ref = copy.deepcopy(nn.Sequential(conv, bn, relu))
    m = ConvBNReLU2d.from_modules(conv, bn, relu)
    assert m.conv.weight is conv.weight and m.bn.running_var is bn.running_var
    x = torch.randn(2, 4, 5, 5)
    close(m(x), ref(x), "from_modules output")
    close(bn.running_mean, ref[1].running_mean, "running_mean updated in the shared buffer")
    assert ConvBN2d.from_modules(conv, bn).conv is conv
    with pytest.raises(ValueError, match="no ReLU"):
        ConvBN2d.from_modules(conv, bn, relu)
    with pytest.raises(ValueError, match="out_channels"):
        ConvBNReLU2d.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        ConvBNReLU2d.from_modules(nn.Linear(3, 3), bn)


def test_bad_inputs_raise_clear_errors():
    m = ConvBNReLU2d(4, 6, 3)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(4, 5, 5))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        m([1.0])
    with pytest.raises(TypeError, match="float32"):
        fastnn.functional.batch_norm_relu(torch.ones(2, 3, 4, dtype=torch.int32), None, None, training=True)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        fastnn.functional.batch_norm_relu(torch.randn(2, 3, 4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="needed when training=False"):
        fastnn.functional.batch_norm_relu(torch.randn(2, 3, 4), None, None, training=False)
    with pytest.raises(ValueError, match="both"):
        fastnn.functional.batch_norm_relu(torch.randn(2, 3, 4), torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="input must have the input's shape|grad_out must have"):
        OPS.bn_relu_backward(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(4), torch.ones(4), None, None,
                             1e-5, True)
    with pytest.raises(TypeError, match="mean must be Float"):
        OPS.bn_relu_apply(torch.randn(2, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, 1e-5,
                          True)


def test_reference_backend_and_selection():
    ref, m = make_pair()
    x = torch.randn(2, 6, 7, 5)
    with fastnn.use_backend(conv_bn_relu="reference"):
        y = m(x)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "reference"
    close(y, ref(x), "reference backend")
    m.backend = "reference"
    close(m(x), ref(x), "module backend='reference'")


@pytest.mark.parametrize("training", [True, False])
def test_functional_conv_bn_relu(training):
    w = torch.randn(8, 6, 3, 3) * 0.2
    cb, bw, bb = torch.randn(8), torch.rand(8) + 0.5, torch.randn(8)
    rm, rv = torch.randn(8) * 0.1, torch.rand(8) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    x = torch.randn(3, 6, 9, 8)
    y = fastnn.functional.conv_bn_relu(x, w, cb, bw, bb, rm, rv, training, 0.2, 1e-4, stride=2, padding=1)
    want = reference.conv_bn_relu(x, w, cb, bw, bb, rm2, rv2, training, 0.2, 1e-4, stride=2, padding=1)
    close(y, want, "functional conv_bn_relu", 1e-4, 1e-5)
    close(rm, rm2, "running_mean")
    close(rv, rv2, "running_var")
    with torch.no_grad():
        out = fastnn.functional.conv2d_bias_relu(x, w, cb, 1, 1)
    close(out, F.relu(F.conv2d(x, w, cb, 1, 1)), "conv2d_bias_relu", 1e-4, 1e-5)


# ---------------------------------------------------------------- the ops against fastnn.reference

def _op_inputs(shape, layout, dtype=torch.float32, affine=True, seed_shift=0.0):
    x = torch.randn(shape, dtype=dtype) * 2 + seed_shift
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "noncontig":
        x = noncontig(x)
    C = shape[1]
    w = torch.rand(C, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(C, dtype=dtype) * 0.5 if affine else None
    return x, w, b


OP_SHAPES = [(3, 5, 7, 9), (2, 16, 4, 4), (4, 3, 1, 1), (5, 7), (2, 4, 3, 5, 2), (1, 33, 65, 3)]


@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_ops_float64_against_reference(shape, layout, relu, isa, monkeypatch):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    if isa == "generic":  # the baseline (SSE2) copy of the CPU kernels instead of the AVX2 one
        monkeypatch.setenv("FASTNN_CPU_ISA", "generic")
    dt = torch.float64
    x, w, b = _op_inputs(shape, layout, dt, affine=(shape[1] != 7), seed_shift=3.0)
    eps = 1e-5
    mean, var = OPS.bn_relu_stats(x)
    rmean, rvar = reference.bn_relu_stats(x)
    close(mean, rmean, "mean", 1e-12, 1e-12)
    close(var, rvar, "var", 1e-12, 1e-12)
    y, m2, v2 = OPS.bn_relu_train(x, w, b, eps, relu)
    assert torch.equal(m2, mean) and torch.equal(v2, var)
    close(y, reference.bn_relu_apply(x, rmean, rvar, w, b, eps, relu), "train output", 1e-12, 1e-12)
    assert y.is_contiguous(memory_format=CL) if layout == "channels_last" else y.is_contiguous()
    close(OPS.bn_relu_apply(x, mean, var, w, b, eps, relu), y, "apply", 0, 0)
    g = torch.randn(shape, dtype=dt)
    dx, gw, gb = OPS.bn_relu_backward(g, x, mean, var, w, b, eps, relu)
    rdx, rgw, rgb = reference.bn_relu_backward(g, x, mean, var, w, b, eps, relu)
    close(dx, rdx, "dx", 1e-10, 1e-10)
    close(gw, rgw, "grad_weight", 1e-10, 1e-10)
    close(gb, rgb, "grad_bias", 1e-10, 1e-10)
    s1, s2 = OPS.bn_relu_backward_reduce(g, x, mean, var, w, b, eps, relu)
    close(s1, rgb, "sum_dz", 1e-10, 1e-10)
    count = x.numel() // shape[1]
    dx2 = OPS.bn_relu_backward_elemt(g, x, mean, var, w, b, s1, s2, float(count), eps, relu)
    close(dx2, dx, "elemt", 1e-12, 1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ops_float32_large_mean(layout):
    """Statistics stay accurate when the mean is far larger than the spread (shifted sums, double adds)."""
    x = torch.randn(8, 16, 12, 12) * 0.01 + 1000.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    mean, var = OPS.bn_relu_stats(x)
    rmean, rvar = reference.bn_relu_stats(x)
    close(mean, rmean, "mean", 1e-7, 1e-5)
    close(var, rvar, "var", 1e-3, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_ops_low_precision_cpu(dtype, layout, isa, monkeypatch):
    """fp16/bf16 activations with float32 statistics: at most 2x PyTorch's own same-dtype error."""
    if isa == "generic":
        monkeypatch.setenv("FASTNN_CPU_ISA", "generic")
    x32, w, b = _op_inputs((4, 24, 9, 11), layout, seed_shift=1.0)
    g32 = torch.randn_like(x32)
    x, g = x32.to(dtype), g32.to(dtype)
    xr = x.float().requires_grad_()  # fp32 reference on the same (rounded) input
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = F.relu(F.batch_norm(xr, None, None, wr, br, True))
    yr.backward(g.float())
    xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yl = F.relu(F.batch_norm(xl, None, None, wl, bl, True))  # PyTorch in the same dtype
    yl.backward(g)
    y, mean, var = OPS.bn_relu_train(x, w, b, 1e-5, True)
    assert y.dtype == dtype and mean.dtype == torch.float32
    dx, gw, gb = OPS.bn_relu_backward(g, x, mean, var, w, b, 1e-5, True)
    assert_lowp_close(y, yr, yl, what="output")
    assert_lowp_close(dx, xr.grad, xl.grad, what="grad_input")
    assert_lowp_close(gw, wr.grad, wl.grad, what="grad_weight")
    assert_lowp_close(gb, br.grad, bl.grad, what="grad_bias")


def test_gradcheck_float64():
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.randn(4, dtype=torch.float64) * 0.3).requires_grad_()
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def train(x, w, b):
        return fastnn.functional.batch_norm_relu(x, None, None, w, b, training=True)

    def evalf(x, w, b):
        return fastnn.functional.batch_norm_relu(x, rm, rv, w, b, training=False)

    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradcheck(evalf, (x, w, b))
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(train, (xc, w, b))
    assert torch.autograd.gradcheck(lambda x: fastnn.functional.batch_norm_relu(x, None, None, None, None, True,
                                                                                relu=False), (x,))


def test_gradcheck_module_float64():
    m = ConvBNReLU2d(3, 4, 3, padding=1, bias=True).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


def test_gradgradcheck_float64():
    # higher-order gradients (create_graph=True) go through a differentiable recompute of the backward
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.randn(4, dtype=torch.float64) * 0.3).requires_grad_()
    rm, rv = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for training in (True, False):
        def f(x, w, b):
            return fastnn.functional.batch_norm_relu(x, None if training else rm, None if training else rv, w, b,
                                                     training=training)
        assert torch.autograd.gradgradcheck(f, (x, w, b))
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: fastnn.functional.batch_norm_relu(x, None, None, w, b, True), (xc,))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_penalty_matches_sequential(mode):
    # loss = sum(y * r) + |d loss / dx|^2: second-order terms reach every parameter (training was silently
    # wrong when the fused backward ran under create_graph without a derivative; eval, a differentiable fold
    # then F.conv2d, was right before and is kept as a guard)
    ref, m = make_pair(bias=True, dtype=torch.float64)
    ref.train(mode == "train")
    m.train(mode == "train")
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64)
    r = torch.randn(3, 8, 7, 5, dtype=torch.float64)
    grads = []
    for mod in (ref, m):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        (gx,) = torch.autograd.grad((y * r).sum(), xi, create_graph=True)
        loss = (y * r).sum() + gx.pow(2).sum()
        grads.append(torch.autograd.grad(loss, [xi] + list(mod.parameters())))
    for a, b, n in zip(grads[1], grads[0], ["x"] + [n for n, _ in ref.named_parameters()]):
        close(a, b, f"grad of {n}", 1e-9, 1e-9)


def test_backward_ops_refuse_double_backward():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, mean, var = OPS.bn_relu_train(x.detach(), None, None, 1e-5, True)
    g = torch.randn_like(x, requires_grad=True)
    dx, _, _ = OPS.bn_relu_backward(g, x, mean, var, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="derivative for fastnn::.* is not implemented"):
        dx.sum().backward()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_func_grad_and_vmap(mode):
    # torch.func transforms run the reference (plain PyTorch), which they understand (training raised before;
    # eval, plain PyTorch ops already, is a guard)
    ref, m = make_pair(track_running_stats=False) if mode == "train" else make_pair()
    ref.train(mode == "train")
    m.train(mode == "train")
    x = torch.randn(4, 6, 5, 5)

    def loss(mod, params, x):
        return torch.func.functional_call(mod, params, (x,)).pow(2).sum()

    pr = {k: v.detach() for k, v in ref.named_parameters()}
    pm = {k: v.detach() for k, v in m.named_parameters()}
    gr = torch.func.grad(lambda p: loss(ref, p, x))(pr)
    gm = torch.func.grad(lambda p: loss(m, p, x))(pm)
    for (k, a), b in zip(gr.items(), gm.values()):
        close(b, a, f"func.grad {k}", 1e-4, 1e-4)
    vr = torch.func.vmap(lambda xi: ref(xi), in_dims=1, out_dims=1)(x.unsqueeze(1).expand(4, 2, 6, 5, 5))
    vm = torch.func.vmap(lambda xi: m(xi), in_dims=1, out_dims=1)(x.unsqueeze(1).expand(4, 2, 6, 5, 5))
    close(vm, vr, "vmap")


def test_eval_fold_cache_with_a_parametrized_weight():
    # weight_norm recomputes conv.weight on every access: a fresh tensor, version 0, often at the address
    # the last one was freed from. The cache must not take it for the weight it folded.
    ref, m = make_pair()
    torch.nn.utils.parametrizations.weight_norm(ref[0])
    torch.nn.utils.parametrizations.weight_norm(m.conv)
    m.conv.load_state_dict(ref[0].state_dict())
    ref.eval()
    m.eval()
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        for i in range(10):
            close(m(x), ref(x), f"eval {i}")
            ref[0].parametrizations.weight.original0.mul_(1.05)
            m.conv.parametrizations.weight.original0.mul_(1.05)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_submodule_hooks_run(mode):
    # torch.nn.utils.prune recomputes conv.weight in a forward pre-hook on the conv; hooks on bn must fire too
    import torch.nn.utils.prune as prune
    ref, m = make_pair()
    prune.l1_unstructured(ref[0], "weight", amount=0.5)
    prune.l1_unstructured(m.conv, "weight", amount=0.5)
    calls = []
    m.bn.register_forward_hook(lambda mod, i, o: calls.append("bn"))
    xt = torch.randn(4, 6, 7, 5)
    for mod in (ref, m):
        opt = torch.optim.SGD(mod.parameters(), lr=0.5)
        mod.train()
        mod(xt).pow(2).sum().backward()
        opt.step()
    ref.train(mode == "train")
    m.train(mode == "train")
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        close(m(x), ref(x), "after a pruned step")
    assert calls and set(calls) == {"bn"}



@pytest.mark.parametrize("sync_stats", [False, True])
def test_global_hooks_see_the_submodules(sync_stats):
    # a global forward hook (profilers, FlopCounterMode's module tracker) must see conv and bn as in eager;
    # the block says once that it runs unfused. One process: sync_stats is plain BN and must not raise.
    ref, m = make_pair()
    m.sync_stats = sync_stats
    seen = []
    fastnn.backends._warned.clear()
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__))
    try:
        x = torch.randn(2, 6, 7, 5)
        with pytest.warns(RuntimeWarning, match="global module hooks"):
            y = m(x)
        close(y, ref(x), "output")
    finally:
        h.remove()
    assert seen.count("Conv2d") == 2 and seen.count("BatchNorm2d") == 2

def test_dtype_mismatch_raises_in_eval_like_pytorch():
    ref, m = make_pair()
    ref.eval()
    m.eval()
    for dt in (torch.float64, torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(torch.randn(2, 6, 5, 5, dtype=dt))
        with pytest.raises(RuntimeError):
            m(torch.randn(2, 6, 5, 5, dtype=dt))
    xi = torch.randint(-3, 4, (2, 4, 5, 5))
    with pytest.raises(RuntimeError):
        fastnn.functional.conv_bn_relu(xi, torch.randn(6, 4, 3, 3), None, None, None, torch.zeros(6), torch.ones(6))
    with pytest.raises(RuntimeError):
        cbr_ops.conv2d_bias_relu(xi, torch.randn(6, 4, 3, 3), torch.zeros(6))


def _opcheck_samples():
    out = []
    for layout in ("contiguous", "channels_last"):
        for dt in (torch.float32, torch.float64):
            x, w, b = _op_inputs((2, 5, 4, 3), layout, dt)
            out.append((x, w, b))
    x, _, _ = _op_inputs((3, 4, 6), "contiguous", torch.float32, affine=False)
    out.append((x, None, None))
    return out


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    x, w, b = _opcheck_samples()[i]
    mean, var = OPS.bn_relu_stats(x)
    g = torch.randn_like(x)
    s1, s2 = OPS.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5, True)
    torch.library.opcheck(OPS.bn_relu_stats.default, (x,))
    torch.library.opcheck(OPS.bn_relu_backward.default, (g, x, mean, var, w, b, 1e-5, True))
    torch.library.opcheck(OPS.bn_relu_backward_reduce.default, (g, x, mean, var, w, b, 1e-5, True))
    torch.library.opcheck(OPS.bn_relu_backward_elemt.default, (g, x, mean, var, w, b, s1, s2, 30.0, 1e-5, True))
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_() if w is not None else None
    bg = b.clone().requires_grad_() if b is not None else None
    torch.library.opcheck(OPS.bn_relu_train.default, (xg, wg, bg, 1e-5, True))
    torch.library.opcheck(OPS.bn_relu_apply.default, (xg, mean, var, wg, bg, 1e-5, False))
    C = x.shape[1]
    nbt = torch.tensor(3) if i % 2 else None
    torch.library.opcheck(OPS.bn_relu_update_running.default,
                          (torch.randn(C, dtype=x.dtype), torch.rand(C, dtype=x.dtype) + 0.5, nbt, mean, var,
                           float(x.numel() // C), 0.1))


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("with_counter", [False, True])
def test_update_running_op(running_dtype, with_counter):
    """BatchNorm's bookkeeping in one op: r <- (1 - m) r + m * batch, unbiased running_var, counter + 1."""
    C, count, m = 6, 35.0, 0.3
    mean, var = torch.randn(C), torch.rand(C) + 0.1
    rm, rv = torch.randn(C, dtype=running_dtype), torch.rand(C, dtype=running_dtype) + 0.5
    want_m = ((1 - m) * rm.double() + m * mean.double()).to(running_dtype)
    want_v = ((1 - m) * rv.double() + m * var.double() * count / (count - 1)).to(running_dtype)
    nbt = torch.tensor(4) if with_counter else None
    versions = rm._version, rv._version
    OPS.bn_relu_update_running(rm, rv, nbt, mean, var, count, m)
    tol = 1e-3 if running_dtype == torch.float16 else 1e-6
    close(rm, want_m, "running_mean", tol, tol)
    close(rv, want_v, "running_var", tol, tol)
    assert rm._version > versions[0] and rv._version > versions[1]  # the fold cache watches these
    if with_counter:
        assert int(nbt) == 5
    with pytest.raises(ValueError, match="count"):
        OPS.bn_relu_update_running(rm, rv, None, mean, var, 1.0, m)
    with pytest.raises(ValueError, match="running_var must have shape"):
        OPS.bn_relu_update_running(rm, torch.ones(C + 1), None, mean, var, count, m)


@pytest.mark.parametrize("grad", [True, False])
def test_eager_fast_path_matches_batchnorm(grad):
    """The eager path (autograd.Function, ops below the autograd key, one C++ op for the running statistics
    and num_batches_tracked): same outputs, buffers and counter as nn.BatchNorm2d, with and without autograd."""
    ref, m = make_pair(cin=4, cout=5, momentum=0.2)
    for step in range(3):
        x = torch.randn(3, 4, 6, 5)
        with torch.set_grad_enabled(grad):
            yr, ym = ref(x), m(x)
        close(ym, yr, f"step {step} output")
        if grad:
            assert "_BNReLUTrain" in type(ym.grad_fn).__name__
        for (n, br), bm in zip(ref.named_buffers(), m.buffers()):
            close(bm, br, f"step {step} buffer {n}")
    assert int(m.bn.num_batches_tracked) == 3
    # the functional API, without a counter
    x = torch.randn(4, 5, 3, 3)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    with torch.set_grad_enabled(grad):
        y = fastnn.functional.batch_norm_relu(x, rm, rv, training=True, momentum=0.4)
    close(y, F.relu(F.batch_norm(x, rm2, rv2, training=True, momentum=0.4)), "functional output")
    close(rm, rm2, "functional running_mean")
    close(rv, rv2, "functional running_var")


def test_auto_backend_cache_follows_requests(monkeypatch):
    """The cached automatic choice never hides use_backend / FASTNN_BACKEND / backend= requests."""
    ref, m = make_pair()
    x = torch.randn(2, 6, 7, 5)
    m(x)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "cpu"
    with fastnn.use_backend("reference"):
        m(x)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "reference"
    m(x)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "cpu"
    monkeypatch.setenv("FASTNN_BACKEND", "conv_bn_relu=reference")
    m(x)
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "reference"
    monkeypatch.delenv("FASTNN_BACKEND")
    with pytest.raises(RuntimeError, match="cannot run"):
        fastnn.functional.batch_norm_relu(x, None, None, training=True, backend="cuda")


# ---------------------------------------------------------------- low precision, autocast

@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_cpu_two_x_rule(channels_last):
    ref32, _ = make_pair(cin=8, cout=16)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    m = ConvBNReLU2d(8, 16, 3, padding=1).to(torch.bfloat16)
    m.load_state_dict(ref16.state_dict())
    x = torch.randn(4, 8, 10, 10)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    g = torch.randn(4, 16, 10, 10)
    x32, x16, xm = x.clone().requires_grad_(), x.bfloat16().requires_grad_(), x.bfloat16().requires_grad_()
    y32, y16, ym = ref32(x32), ref16(x16), m(xm)
    assert ym.dtype == torch.bfloat16
    y32.backward(g)
    y16.backward(g.bfloat16())
    ym.backward(g.bfloat16())
    assert_lowp_close(ym, y32, y16, what="bf16 output")
    assert_lowp_close(xm.grad, x32.grad, x16.grad, what="bf16 input grad")
    for (n, p32), p16, pm in zip(ref32.named_parameters(), ref16.parameters(), m.parameters()):
        assert_lowp_close(pm.grad, p32.grad, p16.grad, what=f"bf16 grad of {n}")
    for (n, b32), b16, bm in zip(ref32.named_buffers(), ref16.buffers(), m.buffers()):
        if b32.is_floating_point():
            assert_lowp_close(bm, b32, b16, what=f"bf16 buffer {n}")


@pytest.mark.parametrize("train", [True, False])
def test_autocast_cpu_bfloat16(train):
    ref, m = make_pair(cin=8, cout=16)
    ref.train(train)
    m.train(train)
    ref_amp = copy.deepcopy(ref)
    x = torch.randn(4, 8, 10, 10)
    y32 = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yamp = ref_amp(x)
        ym = m(x)
    assert ym.dtype == yamp.dtype
    assert_lowp_close(ym, y32, yamp, what="autocast output")
    if train:
        for (n, b32), ba, bm in zip(ref.named_buffers(), ref_amp.buffers(), m.buffers()):
            if b32.is_floating_point():
                assert_lowp_close(bm, b32, ba, what=f"autocast buffer {n}")


# ---------------------------------------------------------------- memory, compile

def _saved_activation_bytes(module, x):
    """Bytes of the distinct tensors autograd saves for backward, other than the input and parameters."""
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.numel() > 64:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    return sum(seen.values()), y


def test_saves_fewer_activations_than_eager():
    ref, m = make_pair(cin=8, cout=16)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    eager, _ = _saved_activation_bytes(ref, x)
    ours, _ = _saved_activation_bytes(m, x)
    act = 4 * 16 * 10 * 10 * 4
    assert eager == 2 * act  # conv output (for BN) and ReLU output
    assert ours == act  # conv output only
    assert ours <= 0.6 * eager


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    ref, m = make_pair()
    ref.train(mode == "train")
    m.train(mode == "train")
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 7, 5)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, ym = ref(xr), cm(xm)
    close(ym, yr, "compiled output")
    yr.sum().backward()
    ym.sum().backward()
    close(xm.grad, xr.grad, "compiled input grad")
    for (n, br), bm in zip(ref.named_buffers(), m.buffers()):
        close(bm, br, f"compiled buffer {n}")


def test_torch_compile_inductor_train():
    torch._dynamo.reset()
    ref, m = make_pair()
    cm = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 6, 7, 5)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    cm(xm).square().sum().backward()
    close(xm.grad, xr.grad, "inductor input grad")


# ---------------------------------------------------------------- distributed (gloo, 2 processes, CPU)

def _dist_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        ref, m = make_pair(cin=4, cout=6, bias=True)
        m = convert_sync_batchnorm(m)
        assert m.sync_stats
        ddp = DDP(m)
        batch = [3, 2][rank]  # uneven batches: statistics must weight by count
        errs = {}
        for step in range(2):
            torch.manual_seed(100 + step)
            full = torch.randn(sum([3, 2]), 4, 7, 5)
            gfull = torch.randn(sum([3, 2]), 6, 7, 5)
            lo = 0 if rank == 0 else 3
            x = full[lo:lo + batch].clone().contiguous(memory_format=CL if step else torch.contiguous_format)
            x.requires_grad_()
            y = ddp(x)
            y.backward(gfull[lo:lo + batch])
            # nn.SyncBatchNorm refuses CPU tensors; its definition is BatchNorm over the global batch,
            # with each rank's weight gradient the local one (DDP then averages over ranks).
            xf = full.clone().requires_grad_()
            ref.train()
            yf = ref(xf)
            yf.backward(gfull)
            errs[f"out{step}"] = (y - yf[lo:lo + batch]).abs().max().item()
            errs[f"dx{step}"] = (x.grad - xf.grad[lo:lo + batch]).abs().max().item()
            for (n, pr), pm in zip(ref.named_parameters(), m.parameters()):
                errs[f"grad {n} {step}"] = (pm.grad - pr.grad / world).abs().max().item()
            for (n, br), bm in zip(ref.named_buffers(), m.buffers()):
                errs[f"buf {n} {step}"] = (bm.double() - br.double()).abs().max().item()
            ref.zero_grad()
            m.zero_grad()
        torch.save(errs, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sync_stats_gloo_two_processes():
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as d:
        init_file, result = os.path.join(d, "init"), os.path.join(d, "res")
        mp.spawn(_dist_worker, args=(2, init_file, result), nprocs=2, join=True)
        for rank in range(2):
            errs = torch.load(f"{result}.{rank}")
            bad = {k: v for k, v in errs.items() if not v <= 2e-5}
            assert not bad, f"rank {rank}: {bad}"


def test_sync_stats_without_process_group_is_plain_bn():
    ref, m = make_pair()
    m.sync_stats = True  # world size 1 (not initialized): no sync, as nn.SyncBatchNorm
    train_steps(ref, m, (2, 6, 7, 5), steps=1)


def test_convert_sync_batchnorm_tree():
    model = nn.Sequential(ConvBNReLU2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    out = convert_sync_batchnorm(model)
    assert out is model and model[0].sync_stats and isinstance(model[0].bn, nn.BatchNorm2d)
    assert isinstance(model[1][1], nn.SyncBatchNorm)


# ---------------------------------------------------------------- CUDA (run with `pytest -m cuda` on a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("case", ["3x3", "stride2_odd", "groups", "affine_false", "momentum_none", "no_relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_train_matches_sequential(case, channels_last):
    kw = dict(TRAIN_CASES[case])
    shape = kw.pop("shape", (4, kw.get("cin", 6), 9, 7))
    ref, m = make_pair(device="cuda", **kw)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        train_steps(ref, m, shape, channels_last=channels_last, device="cuda", tol=(1e-4, 1e-5))
    assert fastnn.backends.last_choice("conv_bn_relu")[0] == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_eval_matches_sequential(channels_last, bias):
    ref, m = make_pair(device="cuda", bias=bias, cin=16, cout=32)
    ref.eval()
    m.eval()
    x = torch.randn(4, 16, 14, 14, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=CL)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yr, ym = ref(x), m(x)
        close(ym, yr, "cuda eval", 1e-4, 1e-4)
        assert ym.is_contiguous(memory_format=CL) == yr.is_contiguous(memory_format=CL)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (8, 64, 16, 16), (2, 24, 5, 5), (4, 3, 1, 1), (5, 7), (16, 256, 7, 7)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_cuda_ops_against_reference(shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        x, w, b = _op_inputs(shape, layout, dt, seed_shift=2.0)
        x, w, b, g = x.cuda(), w.cuda(), b.cuda(), torch.randn(shape, dtype=dt, device="cuda")
        mean, var = OPS.bn_relu_stats(x)
        rmean, rvar = reference.bn_relu_stats(x)
        close(mean, rmean, "cuda mean", tol, tol)
        close(var, rvar, "cuda var", tol, tol)
        y, _, _ = OPS.bn_relu_train(x, w, b, 1e-5, True)
        close(y, reference.bn_relu_apply(x, rmean, rvar, w, b, 1e-5, True), "cuda train output", tol, tol)
        dx, gw, gb = OPS.bn_relu_backward(g, x, mean, var, w, b, 1e-5, True)
        rdx, rgw, rgb = reference.bn_relu_backward(g, x, mean, var, w, b, 1e-5, True)
        close(dx, rdx, "cuda dx", tol * 10, tol * 10)
        close(gw, rgw.to(gw.dtype), "cuda grad_weight", tol * 10, tol * 10)
        close(gb, rgb.to(gb.dtype), "cuda grad_bias", tol * 10, tol * 10)
        s1, s2 = OPS.bn_relu_backward_reduce(g, x, mean, var, w, b, 1e-5, True)
        dx2 = OPS.bn_relu_backward_elemt(g, x, mean, var, w, b, s1, s2, float(x.numel() // shape[1]), 1e-5, True)
        close(dx2, dx, "cuda elemt", tol, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_low_precision_two_x_rule(dtype, channels_last):
    ref32, _ = make_pair(cin=16, cout=32, device="cuda")
    reflp = copy.deepcopy(ref32).to(dtype)
    m = ConvBNReLU2d(16, 32, 3, padding=1).to("cuda", dtype)
    m.load_state_dict(reflp.state_dict())
    x = torch.randn(8, 16, 12, 12, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=CL)
    g = torch.randn(8, 32, 12, 12, device="cuda")
    x32, xl, xm = x.clone().requires_grad_(), x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y32, yl, ym = ref32(x32), reflp(xl), m(xm)
        y32.backward(g)
        yl.backward(g.to(dtype))
        ym.backward(g.to(dtype))
    assert_lowp_close(ym, y32, yl, what="output")
    assert_lowp_close(xm.grad, x32.grad, xl.grad, what="input grad")
    for (n, b32), bl, bm in zip(ref32.named_buffers(), reflp.buffers(), m.buffers()):
        if b32.is_floating_point():
            assert_lowp_close(bm, b32, bl, what=f"buffer {n}")
    m.eval()
    reflp.eval()
    ref32.eval()
    with torch.no_grad():
        assert_lowp_close(m(x.to(dtype)), ref32(x), reflp(x.to(dtype)), what="eval output")


@pytest.mark.cuda
def test_cuda_autocast_and_memory():
    ref, m = make_pair(cin=32, cout=64, device="cuda")
    x = torch.randn(16, 32, 28, 28, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        ya, ym = copy.deepcopy(ref)(x), m(x)
    assert ym.dtype == ya.dtype == torch.float16
    eager, _ = _saved_activation_bytes(ref, x)
    ours, _ = _saved_activation_bytes(m, x)
    assert ours <= 0.6 * eager
