"""CBAM: fastnn's fused op and modules against the tutorial module, timm's CbamModule, a paper-style
module and fastnn.reference, forward and backward."""
import copy
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastnn
from fastnn import backends, reference
from fastnn.nn import CBAM, ChannelAttention, SpatialAttention
from fastnn.ops import cbam as cbam_ops
from helpers import DEVICES, HAS_CUDA, LOWP, assert_lowp_close, noncontig

try:
    from timm.layers.cbam import CbamModule
except Exception:  # timm missing or not importable beside this torch
    CbamModule = None

needs_timm = pytest.mark.skipif(CbamModule is None, reason="timm is not importable")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons on CUDA without TF32: cuDNN convolutions (the references' 1x1 MLP convs and
    spatial conv) default to TF32 on Ampere and later, ~1e-3 relative off fp32. Restored after."""
    if not HAS_CUDA:
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
needs_ext = pytest.mark.skipif(not cbam_ops._HAVE_OPS, reason="fastnn._C with the cbam kernels is not built")


# ---------------------------------------------------------------- the modules users copy


class TutChannelAttention(nn.Module):
    def __init__(self, in_channels, reduction=16, hidden=None):
        super().__init__()
        hidden = hidden or in_channels // reduction
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, in_channels, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))


class TutSpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]],
                                                 1)))


class TutCBAM(nn.Module):
    def __init__(self, channels, reduction=16, kernel_size=7, hidden=None):
        super().__init__()
        self.channel_attention = TutChannelAttention(channels, reduction, hidden)
        self.spatial_attention = TutSpatialAttention(kernel_size)

    def forward(self, x):
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


class PaperBasicConv(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)
        self.relu = None

    def forward(self, x):
        return self.bn(self.conv(x))


class PaperChannelGate(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))
        self.pool_types = ["avg", "max"]

    def forward(self, x):
        h, w = x.shape[2:]
        att = self.mlp(F.avg_pool2d(x, (h, w), stride=(h, w))) + self.mlp(F.max_pool2d(x, (h, w), stride=(h, w)))
        return x * torch.sigmoid(att)[:, :, None, None]


class PaperSpatialGate(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.spatial = PaperBasicConv(k)

    def forward(self, x):
        pooled = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], 1)
        return x * torch.sigmoid(self.spatial(pooled))


class PaperCBAM(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.ChannelGate = PaperChannelGate(c, r)
        self.SpatialGate = PaperSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


# ---------------------------------------------------------------- helpers


def _randomize(m, seed=0):
    """Parameters and BN statistics away from their defaults, so wrong wiring shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if "bn" in name
                                                                                        and "weight" in name else 0))
        for name, b in m.named_buffers():
            if "running_mean" in name:
                b.fill_(0.2)
            elif "running_var" in name:
                b.fill_(1.7)
    return m


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return noncontig(x)
    return x


def _fwd_bwd(m, x, gout):
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    out = m(x)
    out.backward(gout)
    grads = {k.replace("_orig_mod.", ""): p.grad.detach().clone() for k, p in m.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def _compare(fast_mod, torch_mod, x, gout=None, factor=2.0, atol=1e-5):
    """fastnn's module in x.dtype against torch's module in the same dtype, both judged by their error
    against torch's module run in float64 (assert_lowp_close: at most `factor` x torch's own error)."""
    ref_mod = copy.deepcopy(torch_mod).double()
    if gout is None:
        with torch.no_grad():
            shape = copy.deepcopy(torch_mod)(x).shape
        gout = torch.randn(shape, dtype=x.dtype, device=x.device)
    o64, gx64, gp64 = _fwd_bwd(ref_mod, x.double(), gout.double())
    ot, gxt, gpt = _fwd_bwd(torch_mod, x, gout)
    of, gxf, gpf = _fwd_bwd(fast_mod, x, gout)
    assert of.dtype == ot.dtype and of.shape == ot.shape
    assert_lowp_close(of, o64, ot, factor, atol, "output")
    # atol scales with the gradient's size, as for the parameters below: at (4, 256, 56, 56) |dx| reaches
    # ~30, and fp32 sums in another order differ by ~1e-4 there (GPU run on 3d90236: 9.6e-5, torch 4.1e-5)
    assert_lowp_close(gxf, gx64, gxt, factor, atol * max(1.0, gx64.abs().max().item()), "grad x")
    assert set(gpf) == set(gpt)
    for k in gpt:
        scale = max(1.0, gp64[k].abs().max().item())
        assert_lowp_close(gpf[k], gp64[k], gpt[k], factor, atol * scale, f"grad {k}")
    return of, ot


# ---------------------------------------------------------------- the tutorial module


def test_tutorial_state_dict_loads():
    t = TutCBAM(64)
    f = CBAM(64)
    assert list(f.state_dict()) == list(t.state_dict()) == [
        "channel_attention.mlp.0.weight", "channel_attention.mlp.2.weight", "spatial_attention.conv.weight"]
    f.load_state_dict(_randomize(t).state_dict())
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(f(x), t(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 32, 7, 7), (3, 40, 13, 17), (4, 64, 1, 1), (2, 48, 28, 28)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_matches_tutorial(device, shape, layout):
    t = _randomize(TutCBAM(shape[1])).to(device)
    f = CBAM.from_module(t)
    assert f.layout == "tutorial" and f.max_ties == "first"
    x = _layout(torch.randn(shape, device=device), layout)
    of, ot = _compare(f, t, x)
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert of.is_contiguous(memory_format=torch.channels_last)
    else:
        assert of.is_contiguous()


@pytest.mark.parametrize("variant", ["tutorial", "timm"])
def test_pruned_parametrized_and_hooked_submodules(variant):
    # prune recomputes a weight in a forward pre-hook; weight_norm computes it on access; hooks on the
    # submodules must run: the block then calls its submodules (was a KeyError / hooks skipped)
    import torch.nn.utils.prune as prune
    if variant == "tutorial":
        t = _randomize(TutCBAM(24, 4))
        fc1_t, conv_t = t.channel_attention.mlp[0], t.spatial_attention.conv
    else:
        if CbamModule is None:
            pytest.skip("timm not installed")
        t = _randomize(CbamModule(24, rd_ratio=1 / 4)).train()
        fc1_t, conv_t = t.channel.fc1, t.spatial.conv.conv
    f = CBAM.from_module(t)
    fc1_f, _ = f.ca.layers
    conv_f = f.sa.conv_layer
    for fc1, conv in ((fc1_t, conv_t), (fc1_f, conv_f)):
        prune.l1_unstructured(fc1, "weight", amount=0.5)
        torch.nn.utils.parametrizations.weight_norm(conv)
    calls = []
    f.sa.register_forward_hook(lambda *a: calls.append("sa"))
    xt = torch.randn(2, 24, 7, 5)
    for m in (t, f):  # a step: weight_orig and the weight_norm parameters change
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(xt).pow(2).sum().backward()
        opt.step()
    x = torch.randn(2, 24, 7, 5, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    ot, of = t(x), f(xf)
    torch.testing.assert_close(of, ot, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ot)
    ot.backward(g)
    of.backward(g)
    torch.testing.assert_close(xf.grad, x.grad, rtol=1e-5, atol=1e-6)
    assert calls == ["sa", "sa"]


@needs_timm
def test_parametrized_bias():
    # a parametrized bias leaves _parameters: the fused path read it as absent (output off by ~0.5)
    class Shift(nn.Module):
        def forward(self, b):
            return b + 0.5

    t = _randomize(CbamModule(24, rd_ratio=1 / 4, mlp_bias=True)).eval()
    f = CBAM.from_module(t)
    torch.nn.utils.parametrize.register_parametrization(t.channel.fc1, "bias", Shift())
    torch.nn.utils.parametrize.register_parametrization(f.ca.layers[0], "bias", Shift())
    x = torch.randn(2, 24, 7, 5)
    torch.testing.assert_close(f(x), t(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_below_reduction(device):
    # hidden = max(1, C // r): 8 // 16 -> 1
    f = _randomize(CBAM(8, reduction=16)).to(device)
    assert f.ca.hidden_channels == 1
    t = TutCBAM(8, hidden=1).to(device)
    t.load_state_dict(f.state_dict())
    _compare(f, t, torch.randn(3, 8, 13, 17, device=device))


def test_spatial_conv_bias_and_linear_mlp():
    # a tutorial variant with Linear MLP layers (with bias) and a biased spatial conv
    t = TutCBAM(24, reduction=4)
    ca = t.channel_attention
    ca.mlp = nn.Sequential(nn.Flatten(), nn.Linear(24, 6), nn.ReLU(), nn.Linear(6, 24), nn.Unflatten(1, (24, 1, 1)))
    with pytest.raises(ValueError, match="Sequential"):
        CBAM.from_module(t)
    t = _randomize(TutCBAM(24, reduction=4))
    t.spatial_attention.conv = nn.Conv2d(2, 1, 7, padding=3, bias=True)
    _randomize(t, seed=4)
    f = CBAM.from_module(t)
    assert f.sa.conv_layer.bias is not None
    _compare(f, t, torch.randn(2, 24, 9, 8))
    lin = _randomize(CBAM(24, reduction=4, mlp_linear=True, mlp_bias=True))
    assert isinstance(lin.ca.layers[0], nn.Linear)
    ref = copy.deepcopy(lin)
    ref.backend = "reference"
    _compare(lin, ref, torch.randn(2, 24, 5, 6))


@needs_timm
def test_from_module_rejects_what_it_cannot_run():
    from timm.layers.cbam import LightCbamModule
    with pytest.raises(ValueError, match="Light"):
        CBAM.from_module(LightCbamModule(32))
    m = CbamModule(32, act_layer=nn.SiLU)
    with pytest.raises(ValueError, match="ReLU"):
        CBAM.from_module(m)


@pytest.mark.parametrize("kernel", [3, 5])
def test_spatial_kernels(kernel):
    t = _randomize(TutCBAM(24, reduction=4, kernel_size=kernel))
    f = CBAM.from_module(t)
    assert f.sa.kernel_size == kernel
    _compare(f, t, torch.randn(2, 24, 6, 11))


# ---------------------------------------------------------------- timm and the paper's code


@needs_timm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_timm(device, mlp_bias, training, layout):
    t = _randomize(CbamModule(48, mlp_bias=mlp_bias)).to(device).train(training)
    f = CBAM.from_module(t)
    assert list(f.state_dict()) == list(t.state_dict())
    assert f.max_ties == "split" and f.training == training
    x = _layout(torch.randn(3, 48, 13, 17, device=device), layout)
    tb = copy.deepcopy(t)
    _compare(f, tb, x)
    # the BN's running statistics and batch count follow timm's (one step each in _compare)
    fs, ts = f.state_dict(), tb.state_dict()
    for k in ts:
        torch.testing.assert_close(fs[k], ts[k], rtol=1e-5, atol=1e-6, msg=k)
    # a converted module loads timm's checkpoints and its own
    t.load_state_dict(f.state_dict())


@needs_timm
def test_timm_resnet_blocks_convert():
    import timm
    model = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer="cbam"), num_classes=10)
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, CbamModule)]
    assert mods
    sd = model.state_dict()
    for name, m in mods:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], CBAM.from_module(m))
    model.load_state_dict(sd)  # same keys after the swap
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer="cbam"), num_classes=10).eval()
    ref.load_state_dict(sd)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


@needs_timm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_training", [True, False])
def test_bn_mode_is_the_bns_own(device, block_training):
    # Fine-tuning freezes BatchNorms inside a training model (bn.eval()), and the reverse also occurs:
    # the spatial BN follows its own .training, as in timm's module, not the CBAM block's.
    t = _randomize(CbamModule(32, rd_ratio=1 / 4)).to(device).train(block_training)
    bn = t.spatial.conv.bn
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    bn.train(not block_training)
    f = CBAM.from_module(t)
    assert f.training == block_training and f.spatial.conv.bn.training == (not block_training)
    x = torch.randn(2, 32, 7, 7, device=device)
    tb = copy.deepcopy(t)
    _compare(f, tb, x)
    fs, ts = f.state_dict(), tb.state_dict()
    for k in ts:
        torch.testing.assert_close(fs[k], ts[k], rtol=1e-5, atol=1e-6, msg=k)
    nbt = f.spatial.conv.bn.num_batches_tracked.item()
    assert nbt == (0 if block_training else 1)


@pytest.mark.parametrize("training", [True, False])
def test_matches_paper_style(training):
    p = _randomize(PaperCBAM(32, 8)).train(training)
    f = CBAM.from_module(p)
    assert f.layout == "paper" and f.sa.spatial_order == "max_mean" and f.sa.bn_layer.momentum == 0.01
    assert list(f.state_dict()) == list(p.state_dict())
    assert list(CBAM(32, 8, variant="paper").state_dict()) == list(p.state_dict())
    _compare(f, p, torch.randn(2, 32, 9, 10))


# ---------------------------------------------------------------- gradcheck, ties


def _functional_args(C, hidden, k, bias, bn, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)

    def r(*s, scale=0.4):
        return (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()
    args = dict(mlp_weight1=r(hidden, C), mlp_weight2=r(C, hidden), conv_weight=r(1, 2, k, k, scale=0.3))
    if bias:
        args.update(mlp_bias1=r(hidden), mlp_bias2=r(C), conv_bias=r(1))
    if bn:
        args.update(spatial_bn=True, bn_weight=r(1) , bn_bias=r(1))
    return args


@needs_ext
@pytest.mark.parametrize("max_ties", ["first", "split"])
@pytest.mark.parametrize("variant", ["plain", "bias_bn_train", "bn_eval_maxmean"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(max_ties, variant, layout):
    a = _functional_args(6, 3, 3, bias=variant != "plain", bn=variant != "plain")
    extra = dict(max_ties=max_ties)
    if variant == "bn_eval_maxmean":
        extra.update(bn_training=False, bn_running_mean=torch.tensor([0.1], dtype=torch.float64),
                     bn_running_var=torch.tensor([0.8], dtype=torch.float64), spatial_order="max_mean")
    elif variant == "bias_bn_train":
        extra.update(bn_training=True)
    names = list(a)
    x = _layout(torch.randn(2, 6, 5, 4, dtype=torch.float64), layout).requires_grad_()

    def fn(x, *vals):
        return fastnn.functional.cbam(x, **dict(zip(names, vals)), **extra, backend="cpu")

    vals = [a[n] for n in names]
    assert torch.autograd.gradcheck(fn, (x, *[v for v in vals]), eps=1e-6, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("max_ties", ["first", "split"])
def test_gradcheck_pools_and_gates(max_ties):
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastnn.functional.cbam_channel_pool(t, max_ties), (x,))
    assert torch.autograd.gradcheck(lambda t: fastnn.functional.cbam_spatial_pool(t, max_ties), (x,))
    ca = _randomize(ChannelAttention(5, hidden_channels=2, max_ties=max_ties)).double()
    sa = _randomize(SpatialAttention(3, spatial_bn=True, max_ties=max_ties)).double().eval()
    assert torch.autograd.gradcheck(ca, (x,))
    assert torch.autograd.gradcheck(sa, (x,))


def _tied_input(shape, dtype=torch.float64, device="cpu"):
    """Values in {-2, -1, 0}: most maxima (over H*W, and of x*g over C since g > 0) are 0 and tied."""
    g = torch.Generator().manual_seed(3)
    return torch.randint(-2, 1, shape, generator=g).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_ties", ["first", "split"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ties_match_reference(device, max_ties, layout):
    x = _layout(_tied_input((3, 20, 6, 7), device=device), layout)
    a = {k: v.detach().to(device).requires_grad_() for k, v in _functional_args(20, 4, 5, True, False).items()
         if isinstance(v, torch.Tensor)}
    gout = torch.randn(x.shape, dtype=x.dtype, device=device)
    res = []
    for impl in (fastnn.functional.cbam, reference.cbam):
        xi = x.detach().clone().requires_grad_()
        ai = {k: v.detach().clone().requires_grad_() for k, v in a.items()}
        out = impl(xi, **ai, max_ties=max_ties)
        out.backward(gout)
        res.append([out, xi.grad] + [ai[k].grad for k in sorted(ai)])
    for got, want in zip(*res):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the two rules really differ on this input
    assert max_ties == "first" or (x == 0).sum() > x.numel() // 4


@needs_ext
def test_tie_rules_differ_and_are_what_is_documented():
    # one channel, constant map: the channel max has H*W ties
    x = torch.zeros(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    for ties, want in (("first", [1, 0, 0, 0, 0, 0]), ("split", [1 / 6] * 6)):
        _, mx = fastnn.functional.cbam_channel_pool(x, ties)
        (gx,) = torch.autograd.grad(mx.sum(), x)
        torch.testing.assert_close(gx.flatten(), torch.tensor(want, dtype=torch.float64))
    x = torch.zeros(1, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    for ties, want in (("first", [1, 0, 0, 0]), ("split", [0.25] * 4)):
        m = fastnn.functional.cbam_spatial_pool(x, ties)
        (gx,) = torch.autograd.grad(m[:, 1].sum(), x)
        torch.testing.assert_close(gx.flatten(), torch.tensor(want, dtype=torch.float64))


def test_nan_propagates():
    f = CBAM(16, reduction=4)
    x = torch.randn(2, 16, 5, 5)
    x[0, 3, 2, 2] = float("nan")
    out = f(x)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


# ---------------------------------------------------------------- dtypes, AMP


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_low_precision(device, dtype, layout):
    t = _randomize(TutCBAM(32, reduction=8)).to(device=device, dtype=dtype)
    f = CBAM.from_module(t)
    x = _layout(torch.randn(2, 32, 9, 11, device=device, dtype=dtype), layout)
    _compare(f, t, x, atol=1e-3)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu_bf16(x_dtype):
    t = _randomize(TutCBAM(32, reduction=8))
    f = CBAM.from_module(t)
    x = torch.randn(2, 32, 10, 10).to(x_dtype)
    gout = torch.randn(x.shape, dtype=x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ot, gxt, gpt = _fwd_bwd(t, x, gout)
        of, gxf, gpf = _fwd_bwd(f, x, gout)
    o64, gx64, gp64 = _fwd_bwd(copy.deepcopy(t).double(), x.double(), gout.double())
    assert of.dtype == ot.dtype
    assert_lowp_close(of, o64, ot, what="output")
    assert_lowp_close(gxf, gx64, gxt, what="grad x")
    for k in gpt:
        assert gpf[k].dtype == gpt[k].dtype
        assert_lowp_close(gpf[k], gp64[k], gpt[k], atol=1e-4 * max(1, gp64[k].abs().max().item()), what=k)


# ---------------------------------------------------------------- BN bookkeeping


@needs_ext
def test_bn_running_stats_and_momentum_none():
    # momentum=None: BatchNorm's cumulative average over num_batches_tracked
    f = CBAM(16, reduction=4, variant="timm", bn_momentum=None).train()
    ref = copy.deepcopy(f)
    ref.backend = "reference"
    for _ in range(3):
        x = torch.randn(2, 16, 6, 6)
        torch.testing.assert_close(f(x), ref(x), rtol=1e-5, atol=1e-6)
    for (k, a), (_, b) in zip(f.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert f.spatial.conv.bn.num_batches_tracked.item() == 3


# ---------------------------------------------------------------- the pools and gates on their own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_modules_match_tutorial(device, layout):
    tc = _randomize(TutChannelAttention(24, 4)).to(device)
    ts = _randomize(TutSpatialAttention(5)).to(device)
    fc = ChannelAttention(24, 4).to(device)
    fs = SpatialAttention(5).to(device)
    fc.load_state_dict(tc.state_dict())
    fs.load_state_dict(ts.state_dict())
    x = _layout(torch.randn(3, 24, 7, 9, device=device), layout)
    _compare(fc, tc, x)
    _compare(fs, ts, x)


@pytest.mark.parametrize("max_ties", ["first", "split"])
def test_pool_ops_match_reference(max_ties):
    x = _tied_input((2, 9, 5, 6))
    mean, mx = fastnn.functional.cbam_channel_pool(x, max_ties)
    rm, rx = reference.cbam_channel_pool(x, max_ties)
    torch.testing.assert_close(mean, rm)
    torch.testing.assert_close(mx, rx)
    sp = fastnn.functional.cbam_spatial_pool(x, max_ties)
    torch.testing.assert_close(sp, torch.cat(reference.cbam_spatial_pool(x, max_ties), 1))


# ---------------------------------------------------------------- opcheck, compile


def _op_samples(device="cpu"):
    g = torch.Generator().manual_seed(5)
    out = []
    for cl, bn, bias, first in [(False, False, False, True), (True, True, True, False), (False, True, False, False)]:
        x = torch.randn(2, 12, 5, 6, generator=g).to(device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()

        def p(*s):
            return torch.randn(*s, generator=g).to(device).requires_grad_()
        z, o = torch.zeros(1, device=device), torch.ones(1, device=device)
        out.append((x, p(3, 12), p(3) if bias else None, p(12, 3, 1, 1), p(12) if bias else None, p(1, 2, 3, 3),
                    p(1) if bias else None, p(1) if bn else None, p(1) if bn else None,
                    z if bn else None, o if bn else None, bn, bn and cl, 1e-5, not cl, first))
    return out


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.fastnn.cbam.default, args)
        with torch.no_grad():
            res = torch.ops.fastnn.cbam(*args)
        gout = torch.randn_like(res[0])
        # the backward op runs inside autograd's backward, on tensors that do not require grad
        bargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                      for a in (gout, *args[:9], *args[11:16], *res[1:], True))
        torch.library.opcheck(torch.ops.fastnn.cbam_backward.default, bargs)
    for first in (True, False):
        x = torch.randn(2, 7, 3, 5, device=device, requires_grad=True)
        for name in ("cbam_channel_pool", "cbam_spatial_pool"):
            torch.library.opcheck(getattr(torch.ops.fastnn, name).default, (x, first))
            with torch.no_grad():
                pooled, sel = getattr(torch.ops.fastnn, name)(x, first)
            torch.library.opcheck(getattr(torch.ops.fastnn, name + "_backward").default,
                                  (torch.randn_like(pooled), x.detach(), pooled, sel, first))


@needs_ext
def test_double_backward_raises():
    f = CBAM(8, reduction=4)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    t = _randomize(CbamModule(32, rd_ratio=1 / 8) if CbamModule is not None else TutCBAM(32, 8)).to(device)
    f = CBAM.from_module(t)
    fc = torch.compile(copy.deepcopy(f), fullgraph=True, backend=backend)
    for cl in (False, True):
        x = torch.randn(2, 32, 8, 8, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        gout = torch.randn(x.shape, device=device)
        oe, gxe, gpe = _fwd_bwd(f, x, gout)
        oc, gxc, gpc = _fwd_bwd(fc, x, gout)
        torch.testing.assert_close(oc, oe)
        torch.testing.assert_close(gxc, gxe)
        for k in gpe:
            torch.testing.assert_close(gpc[k], gpe[k], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- backends, bad input


def test_reference_backend_matches():
    f = _randomize(CBAM(16, reduction=4, variant="paper")).train()
    x = torch.randn(2, 16, 6, 5)
    with fastnn.use_backend("reference"):
        ref = copy.deepcopy(f)(x)
        assert backends.last_choice("cbam")[0] == "reference"
    out = copy.deepcopy(f)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if cbam_ops._HAVE_OPS:
        assert backends.last_choice("cbam")[0] == ("cuda" if x.is_cuda else "cpu")


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: fastnn.functional.cbam(torch.randn(16, 5, 5), *_w(16)), ValueError, "4-D"),
    (lambda: fastnn.functional.cbam(torch.randint(0, 3, (1, 16, 5, 5)), *_w(16)), TypeError, "float"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 15, 5, 5), *_w(16)), ValueError, "mlp_weight1"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 5, 5), *_w(16, k=4)), ValueError, "odd"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 5, 5), *_w(16), max_ties="mean"), ValueError, "max_ties"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 5, 5), *_w(16), spatial_order="x"), ValueError,
     "spatial_order"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 1, 1), *_w(16), spatial_bn=True, bn_training=True),
     ValueError, "more than 1 value"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 5, 5), *_w(16), spatial_bn=True), ValueError,
     "running"),
    (lambda: fastnn.functional.cbam(torch.randn(1, 16, 0, 5), *_w(16)), ValueError, "non-zero C, H and W"),
    (lambda: fastnn.functional.cbam(torch.randn(2, 16, 5, 5), *_w(16), spatial_bn=True, bn_training=True,
                                    bn_momentum=None, bn_running_mean=torch.zeros(1),
                                    bn_running_var=torch.ones(1)), ValueError, "bn_momentum"),
    (lambda: ChannelAttention(16)(torch.randn(2, 8, 5, 5)), ValueError, "8 channels.*built for 16"),
    (lambda: CBAM(16, spatial_kernel=4), ValueError, "odd"),
    (lambda: CBAM(16, variant="keras"), ValueError, "variant"),
    (lambda: CBAM.from_module(nn.Linear(3, 3)), TypeError, "cannot convert"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def _w(C, hidden=2, k=3):
    return torch.randn(hidden, C), torch.randn(C, hidden), torch.randn(1, 2, k, k)


@needs_ext
def test_cpp_checks_for_direct_callers():
    with pytest.raises(ValueError, match="w2"):
        torch.ops.fastnn.cbam(torch.randn(1, 4, 3, 3), torch.randn(2, 4), None, torch.randn(3, 2), None,
                              torch.randn(1, 2, 3, 3), None, None, None, None, None, False, False, 1e-5, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("C, HW", [(256, 56), (512, 28), (1024, 14), (2048, 7)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("max_ties", ["first", "split"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("path", ["whole", "legacy"])
def test_resnet_stage_shapes(device, C, HW, layout, max_ties, training, path, monkeypatch):
    # ResNet-50's stage shapes (batch 4), both layouts and tie rules, BN in train and eval mode, through
    # the whole-op CUDA kernels and the generic orchestration (FASTNN_CBAM_CUDA_LEGACY=1)
    monkeypatch.setenv("FASTNN_CBAM_CUDA_LEGACY", "1" if path == "legacy" else "0")
    f = _randomize(CBAM(C, max_ties=max_ties, spatial_bn=True)).to(device).train(training)
    ref = copy.deepcopy(f)
    ref.backend = "reference"
    x = _layout(torch.randn(4, C, HW, HW, device=device), layout)
    _compare(f, ref, x)


# ---------------------------------------------------------------- the CUDA kernels, emulated on the CPU
# tests/cbam_cuda_emu.cpp compiles csrc/cbam/cuda/cbam_cuda_fast.cu as C++ and runs every launch
# with a CPU thread per CUDA thread (barriers for __syncthreads and warp shuffles, alignment checks
# on vector accesses): the GPU path's indexing, reductions, partial sums and launch logic are
# compared here with the CPU op, which writes the same saved buffers. Building it takes about a
# minute (cached by torch.utils.cpp_extension); FASTNN_TEST_CUDA_EMU=0 skips it. For out-of-bounds
# accesses: FASTNN_TEST_CUDA_EMU_ASAN=1 LD_PRELOAD=$(gcc -print-file-name=libasan.so)
# ASAN_OPTIONS=detect_leaks=0 (AddressSanitizer).
_EMU = {}
needs_emu = pytest.mark.skipif(os.environ.get("FASTNN_TEST_CUDA_EMU") == "0" or shutil.which("c++") is None,
                               reason="CUDA-kernel emulation off (FASTNN_TEST_CUDA_EMU=0) or no host C++ compiler")


def _cuda_emulator():
    if "mod" not in _EMU:
        from torch.utils.cpp_extension import load
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        asan = os.environ.get("FASTNN_TEST_CUDA_EMU_ASAN") == "1"
        san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
        # load() rebuilds when the listed source or the flags change: put the included kernels' and
        # headers' contents into the flags
        import hashlib
        h = hashlib.sha1()
        for sub in ("cuda/cbam_cuda_fast.cu", "cuda/cbam_cuda.h", "cbam_math.h", "cbam_saved.h", "cbam_params.h"):
            with open(os.path.join(root, "csrc", "cbam", sub), "rb") as f:
                h.update(f.read())
        _EMU["mod"] = load(name="fastnn_cbam_cuda_emu" + ("_asan" if asan else ""),
                           sources=[os.path.join(root, "tests", "cbam_cuda_emu.cpp")],
                           extra_include_paths=[os.path.join(root, "csrc")],
                           extra_cflags=["-O1", "-std=c++20", "-pthread", f"-DCBAM_EMU_SOURCES={h.hexdigest()[:16]}"] + san,
                           extra_ldflags=["-pthread"] + san[:1], verbose=False)
    return _EMU["mod"]


def _saved_regions(N, C, P, Cr, bn):
    """(name, offset, length) of the meaningful parts of saved / saved_idx (csrc/cbam/cbam_saved.h)."""
    def pad(n):
        return (n + 15) // 16 * 16
    out, o = [], 0
    for name, n in (("g", N * C), ("s", N * P), ("pc", 2 * N * C), ("ps", 2 * N * P), ("co", N * P),
                    ("h", 2 * N * Cr)):
        out.append((name, o, n))
        o += pad(n)
    if bn:
        out.append(("bn", o, 2))
    return out, [("sel_c", 0, N * C), ("sel_s", pad(N * C), N * P)]


@needs_ext
@needs_emu
@pytest.mark.parametrize("shape, layout, dtype, variant, sms", [
    ((2, 24, 5, 7, 3, 3), "nchw", torch.float32, "tutorial", 4),
    ((2, 24, 5, 7, 3, 3), "channels_last", torch.bfloat16, "timm_train", 4),
    ((3, 40, 13, 17, 5, 7), "nchw", torch.bfloat16, "paper_eval", 4),
    ((3, 40, 13, 17, 5, 7), "channels_last", torch.float32, "tutorial_bias", 4),
    ((2, 256, 4, 4, 16, 3), "nchw", torch.float32, "timm_train", 16),    # row splits, pool merge
    ((2, 80, 6, 5, 40, 7), "channels_last", torch.float16, "paper_eval", 16),  # hidden > 32
    ((2, 12, 9, 10, 3, 1), "nchw", torch.float64, "timm_train", 4),
    ((1, 64, 20, 24, 4, 9), "nchw", torch.float32, "tutorial", 16),      # 32 lanes per row
    ((2, 24, 12, 16, 6, 5), "nchw", torch.bfloat16, "tutorial", 64),     # 16 lanes per row
    ((2, 8, 1, 1, 1, 3), "nchw", torch.float32, "timm_train", 4),
])
def test_cuda_kernels_emulated_on_cpu(shape, layout, dtype, variant, sms, monkeypatch):
    monkeypatch.setenv("FASTNN_CBAM_EMU_SMS", str(sms))  # the emulated GPU's SM count: grid splits
    emu = _cuda_emulator()
    N, C, H, W, Cr, k = shape
    bias = variant in ("paper_eval", "tutorial_bias")
    bn, training = variant.startswith(("timm", "paper")), variant.endswith("train")
    mean_first, first = variant != "paper_eval", not variant.startswith("timm")
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-2, 3, (N, C, H, W), generator=g).to(dtype) if not first else torch.randn(
        N, C, H, W, generator=g).to(dtype)  # ties for the split rule
    x = _layout(x, layout)

    def p(*s):
        return (torch.randn(*s, generator=g) * 0.4).to(dtype)
    args = (x, p(Cr, C, 1, 1), p(Cr) if bias else None, p(C, Cr), p(C) if bias else None, p(1, 2, k, k),
            p(1) if bias else None, p(1) + 1 if bn else None, p(1) if bn else None,
            torch.full((1,), 0.2, dtype=dtype) if bn else None, torch.full((1,), 1.7, dtype=dtype) if bn else None,
            bn, training, 1e-5, mean_first, first)
    lowp = dtype in LOWP
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ref = torch.ops.fastnn.cbam(*args)
        got = emu.forward(*args)
    torch.testing.assert_close(got[0], ref[0], **(dict(rtol=2e-2, atol=2e-2) if lowp else tol))
    regions, iregions = _saved_regions(N, C, H * W, Cr, bn)
    for name, o, n in regions:
        torch.testing.assert_close(got[1][o:o + n], ref[1][o:o + n], **tol, msg=name)
    for name, o, n in iregions:
        assert torch.equal(got[2][o:o + n], ref[2][o:o + n]), name
    used = torch.zeros(got[1].numel(), dtype=torch.bool)
    for _, o, n in regions:
        used[o:o + n] = True
    assert (got[1][~used] == 0).all() and (ref[1][~used] == 0).all()
    # the backward, both sides on the emulated forward's saved buffers
    gout = _layout(torch.randn(x.shape, generator=g).to(dtype), layout)
    for need_x in (True, False):
        bargs = (gout, *args[:9], *args[11:16], got[1], got[2], need_x)
        gr, ge = torch.ops.fastnn.cbam_backward(*bargs), emu.backward(*bargs)
        assert len(gr) == len(ge)
        for i, (a, b) in enumerate(zip(ge, gr)):
            assert a.shape == b.shape and a.dtype == b.dtype, i
            scale = max(1.0, b.double().abs().max().item())
            t = dict(rtol=3e-2, atol=3e-2 * scale) if lowp else dict(rtol=tol["rtol"], atol=tol["atol"] * scale)
            torch.testing.assert_close(a, b, **t, msg=f"gradient {i}")
