"""The bad-input contract: one table (BAD below) of invalid inputs per op, the exception type and
a literal excerpt of its message; one test per row. docs/robustness.md shows the same table, and
test_doc_matches_table keeps the two equal (regenerate the doc's table with
`python tests/test_bad_input.py --write-doc`).

Rows whose exception is "-" are not errors: they document what happens instead (NaN/Inf
propagate as in the reference, a block larger than the map is clipped, ...) and their test
checks exactly that. Rows on "cuda" need a GPU (marked cuda). Empty inputs (N = 0, zero spatial
sizes) are compared with PyTorch in test_empty_*."""
from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

if __name__ == "__main__":  # python tests/test_bad_input.py --write-doc, from a source checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastnn  # noqa: E402
import fastnn.functional as F  # noqa: E402
import fastnn.nn as fnn  # noqa: E402
from fastnn import backends, reference as R  # noqa: E402
from fastnn.ops import flash_attention as fa  # noqa: E402

HAS_EXT = fastnn._ext.EXT is not None
INTERP = backends.triton_available() is None and backends.triton_interpreted()
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "robustness.md")
BEGIN, END = "<!-- bad-input table: begin -->", "<!-- bad-input table: end -->"


@dataclass
class Bad:
    op: str
    what: str                     # the invalid input, as the doc shows it
    call: Callable[[str], object]  # runs it on a device
    exc: Optional[type]           # None: not an error; `call` checks the documented behaviour
    msg: str                      # literal excerpt of the message (or the behaviour, for exc None)
    device: str = "cpu"


def _r(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


def _nan_like_reference(out, ref, what, must_reach=True):
    """NaN/Inf positions equal, finite values close (the rule: the reference's propagation)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)) and torch.equal(torch.isneginf(out),
                                                                                 torch.isneginf(ref)), what
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5)
    if must_reach:
        assert bool(torch.isnan(ref).any() or torch.isinf(ref).any()), f"{what}: the case must reach the output"


def _poison(x):
    x = x.clone()
    flat = x.view(-1)
    flat[1] = float("nan")
    flat[-2] = float("inf")
    flat[flat.numel() // 2] = -float("inf")
    return x


# ---------------------------------------------------------------- conv_bn_relu

def _cbr(device="cpu", train=True, **kw):
    m = fnn.ConvBNReLU2d(4, 8, 3, **kw).to(device)
    return m.train(train)


def _cbr_nan(device):
    torch.manual_seed(0)
    for train in (True, False):
        m = _cbr(device, train)
        ref = nn.Sequential(m.conv, m.bn, nn.ReLU())
        x = _poison(_r(2, 4, 6, 6, device=device))
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        out = m(x)
        m.load_state_dict(sd)
        _nan_like_reference(out, ref(x), f"ConvBNReLU2d train={train}")
    x = _poison(_r(3, 4, 5, device=device))
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    _nan_like_reference(F.batch_norm_relu(x, rm.clone(), rv.clone(), training=True),
                        R.batch_norm_relu(x, rm.clone(), rv.clone(), training=True), "batch_norm_relu")


def _bn(x, C=4, **kw):
    args = dict(running_mean=torch.zeros(C, device=x.device), running_var=torch.ones(C, device=x.device))
    args.update(kw)
    return F.batch_norm_relu(x, **args)


BAD = [
    Bad("conv_bn_relu", "wrong rank: `ConvBNReLU2d(4, 8, 3)` on a 3-D input", lambda d: _cbr(d)(_r(4, 6, 6, device=d)),
        ValueError, "expected 4D input (got 3D input)"),
    Bad("conv_bn_relu", "channel mismatch: 3 channels into `ConvBNReLU2d(4, 8, 3)` (nn.Conv2d's check)",
        lambda d: _cbr(d)(_r(2, 3, 6, 6, device=d)), RuntimeError, "to have 4 channels, but got 3 channels instead"),
    Bad("conv_bn_relu", "unsupported dtype: an int64 input",
        lambda d: _cbr(d)(torch.ones(2, 4, 6, 6, dtype=torch.long, device=d)), TypeError,
        "input must be a floating-point tensor"),
    Bad("conv_bn_relu", "unsupported dtype: `batch_norm_relu` on int64",
        lambda d: _bn(torch.ones(2, 4, 3, dtype=torch.long, device=d)), TypeError,
        "input must be float32, float64, float16 or bfloat16"),
    Bad("conv_bn_relu", "mixed devices: a meta input into a CPU module",
        lambda d: _cbr(d)(_r(2, 4, 6, 6, device="meta")), ValueError, "is on cpu but input is on meta"),
    Bad("conv_bn_relu", "mixed devices: `batch_norm_relu` with running_mean on meta",
        lambda d: _bn(_r(2, 4, 3, device=d), running_mean=torch.zeros(4, device="meta")), ValueError,
        "running_mean is on meta but input is on cpu"),
    Bad("conv_bn_relu", "mixed devices: a CPU input into a CUDA module",
        lambda d: _cbr(d)(_r(2, 4, 6, 6)), RuntimeError, "should be the same", device="cuda"),
    Bad("conv_bn_relu", "kernel larger than the input: 3x3 on 2x2 (nn.Conv2d's check)",
        lambda d: _cbr(d)(_r(2, 4, 2, 2, device=d)), RuntimeError,
        "Kernel size can't be greater than actual input size"),
    Bad("conv_bn_relu", "stride 0 (nn.Conv2d's check)", lambda d: _cbr(d, stride=0)(_r(2, 4, 6, 6, device=d)),
        RuntimeError, "non-positive stride is not supported"),
    Bad("conv_bn_relu", "negative channel count: `ConvBNReLU2d(4, -1, 3)` (nn.Conv2d's check)",
        lambda d: fnn.ConvBNReLU2d(4, -1, 3), RuntimeError, "negative dimension -1"),
    Bad("conv_bn_relu", "one value per channel in training", lambda d: _cbr(d)(_r(1, 4, 3, 3, device=d)), ValueError,
        "Expected more than 1 value per channel when training"),
    Bad("conv_bn_relu", "running_mean of the wrong shape", lambda d: _bn(_r(2, 4, 3, device=d),
                                                                          running_mean=torch.zeros(3, device=d)),
        ValueError, "running_mean must have shape (4,)"),
    Bad("conv_bn_relu", "eval without running statistics",
        lambda d: F.batch_norm_relu(_r(2, 4, 3, device=d), None, None, training=False), ValueError,
        "running_mean and running_var are needed when training=False"),
    Bad("conv_bn_relu", "negative eps", lambda d: _bn(_r(2, 4, 3, device=d), eps=-1.0), ValueError,
        "eps must be >= 0"),
    Bad("conv_bn_relu", "raw op: `bn_relu_apply` with a mean of the wrong size",
        lambda d: torch.ops.fastnn.bn_relu_apply(_r(2, 4, 3, device=d), torch.zeros(3, device=d),
                                                 torch.ones(4, device=d), None, None, 1e-5, True),
        ValueError, "mean"),
    Bad("conv_bn_relu", "NaN/Inf in the input", _cbr_nan, None,
        "propagate as in Conv2d -> BatchNorm2d -> ReLU (a NaN in training poisons its channel's statistics)"),
]


# ---------------------------------------------------------------- flash_attention

def _qkv(d=16, hq=2, hk=2, sq=5, sk=7, device="cpu", dtype=torch.float32):
    return _r(1, sq, hq, d, device=device, dtype=dtype), _r(1, sk, hk, d, device=device, dtype=dtype), \
        _r(1, sk, hk, d, device=device, dtype=dtype)


def _fa_nan(device):
    torch.manual_seed(0)
    q, k, v = _qkv(device=device)
    cases = {"q": q, "k": k, "v": v}
    backends_ = ["reference"] + (["triton"] if (INTERP or device == "cuda") else [])
    for name in cases:
        qq, kk, vv = (_poison(t) if n == name else t for n, t in cases.items())
        for be in backends_:
            for causal in (False, True):
                out, lse = F.flash_attn_func(qq, kk, vv, causal=causal, return_lse=True, backend=be)
                ro, rl = R.attention_math(*(t.transpose(1, 2) for t in (qq, kk, vv)), causal=causal, causal_shift=2)
                if be == "reference" and name == "q":
                    continue  # torch's CPU SDPA itself drops a NaN in q (not fastnn's doing; see the doc)
                _nan_like_reference(out, ro.transpose(1, 2), f"{be} NaN/Inf in {name}, causal={causal}")
                _nan_like_reference(lse, rl, f"{be} lse, NaN/Inf in {name}", must_reach=name != "v")


def _mha(device="cpu"):
    return fnn.MultiheadAttention(16, 2, batch_first=True).to(device).eval()


BAD += [
    Bad("flash_attention", "wrong rank: a 3-D q into `flash_attn_func`",
        lambda d: F.flash_attn_func(_r(5, 2, 16, device=d), *_qkv(device=d)[1:]), ValueError,
        "q must be 4-D (batch, seqlen, nheads, headdim)"),
    Bad("flash_attention", "head dims differ (q 16, k/v 32)",
        lambda d: F.flash_attn_func(_qkv(device=d)[0], *_qkv(d=32, device=d)[1:]), ValueError,
        "head dims differ: q has 16, k/v have 32"),
    Bad("flash_attention", "head dim above the supported range (320 > 256)",
        lambda d: F.flash_attn_func(*_qkv(d=320, device=d)), ValueError, "head dim 320 is out of range"),
    Bad("flash_attention", "unsupported dtype: int64",
        lambda d: F.flash_attn_func(*(t.long() for t in _qkv(device=d))), TypeError, "is not supported"),
    Bad("flash_attention", "q, k, v dtypes differ",
        lambda d: F.flash_attn_func(_qkv(device=d)[0].half(), *_qkv(device=d)[1:]), TypeError,
        "q, k, v dtypes differ"),
    Bad("flash_attention", "mixed devices: k, v on meta",
        lambda d: F.flash_attn_func(_qkv(device=d)[0], *(t.to("meta") for t in _qkv(device=d)[1:])), ValueError,
        "q, k, v are on different devices"),
    Bad("flash_attention", "mixed devices: q on CUDA, k/v on the CPU",
        lambda d: F.flash_attn_func(_qkv(device=d)[0], *_qkv()[1:]), ValueError, "q, k, v are on different devices",
        device="cuda"),
    Bad("flash_attention", "dropout_p = 1 (outside [0, 1))",
        lambda d: F.flash_attn_func(*_qkv(device=d), dropout_p=1.0),
        ValueError, "dropout_p must be a float in [0, 1), got 1.0"),
    Bad("flash_attention", "dropout_p < 0", lambda d: F.flash_attn_func(*_qkv(device=d), dropout_p=-0.1), ValueError,
        "dropout_p must be a float in [0, 1)"),
    Bad("flash_attention", "q heads not a multiple of the k/v heads (GQA 3 vs 2)",
        lambda d: F.flash_attn_func(*_qkv(hq=3, hk=2, device=d)), ValueError,
        "the q heads must be a multiple of the k/v heads"),
    Bad("flash_attention", "k and v shapes differ",
        lambda d: F.flash_attn_func(*_qkv(device=d)[:2], _r(1, 6, 2, 16, device=d)), ValueError,
        "k and v must have the same shape"),
    Bad("flash_attention", "unsupported options (window_size, softcap, alibi)",
        lambda d: F.flash_attn_func(*_qkv(device=d), window_size=(4, 4)), NotImplementedError,
        "window_size, softcap and alibi_slopes are not supported"),
    Bad("flash_attention", "attn_mask of the wrong shape (SDPA entry; torch's own check)",
        lambda d: F.scaled_dot_product_attention(_r(1, 2, 4, 8, device=d), _r(1, 2, 5, 8, device=d),
                                                 _r(1, 2, 5, 8, device=d),
                                                 attn_mask=torch.ones(3, 3, dtype=torch.bool, device=d)),
        RuntimeError, "must match the size of tensor b"),
    Bad("flash_attention", "key_padding_mask of the wrong shape (`MultiheadAttention`, torch's check)",
        lambda d: _mha(d)(*([_r(2, 5, 16, device=d)] * 3), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool,
                                                                                      device=d)),
        AssertionError, "Expected key_padded_mask.shape[1] to be 5, but got 4"),
    Bad("flash_attention", "embedding size mismatch: 8 features into `MultiheadAttention(16, 2)`",
        lambda d: _mha(d)(*([_r(2, 5, 8, device=d)] * 3), need_weights=False), AssertionError,
        "was expecting embedding dimension of 16, but got 8"),
    Bad("flash_attention", "raw op: `flash_attn_fwd` with k/v head dim 32 beside q's 16",
        lambda d: (fa.register_ops(), torch.ops.fastnn.flash_attn_fwd(_qkv(device=d)[0], *_qkv(d=32, device=d)[1:],
                                                                      None, 0.0, 0.25, False, True)),
        ValueError, "do not match"),
    Bad("flash_attention", "raw op: `flash_attn_fwd` with dropout and no seed",
        lambda d: (fa.register_ops(), torch.ops.fastnn.flash_attn_fwd(*_qkv(device=d), None, 0.5, 0.25, False, True)),
        ValueError, "dropout needs a one-element int64 seed tensor"),
    Bad("flash_attention", "NaN/Inf in q, k or v", _fa_nan, None,
        "propagate as in softmax(q k^T) v: NaN rows, +inf log-sum-exp for an infinite logit"),
]


# ---------------------------------------------------------------- cbam

def _cbam(device="cpu", **kw):
    return fnn.CBAM(16, **kw).to(device)


def _cbam_w(C=16, hidden=2, k=3, device="cpu"):
    return _r(hidden, C, device=device), _r(C, hidden, device=device), _r(1, 2, k, k, device=device)


def _cbam_nan(device):
    torch.manual_seed(0)
    for variant in ("tutorial", "timm"):
        m = _cbam(device, variant=variant).eval()
        x = _poison(_r(2, 16, 5, 5, device=device))
        w1, b1, w2, b2 = m.ca.mlp_params()
        kw = dict(mlp_bias1=b1, mlp_bias2=b2, max_ties=m.max_ties)
        if m.sa.bn_layer is not None:
            bn = m.sa.bn_layer
            kw.update(spatial_bn=True, bn_weight=bn.weight, bn_bias=bn.bias, bn_running_mean=bn.running_mean,
                      bn_running_var=bn.running_var, bn_eps=bn.eps)
        ref = R.cbam(x, w1, w2, m.sa.conv_layer.weight, **kw)
        _nan_like_reference(m(x), ref, f"CBAM {variant}")


def _cbam_big_kernel(device):
    m = fnn.CBAM(16, spatial_kernel=7).to(device)  # padding 3 keeps H, W: a 7x7 conv on a 1x1 map is valid
    x = _r(2, 16, 1, 1, device=device)
    w1, _, w2, _ = m.ca.mlp_params()
    torch.testing.assert_close(m(x), R.cbam(x, w1, w2, m.sa.conv_layer.weight))


BAD += [
    Bad("cbam", "wrong rank: a 3-D input", lambda d: _cbam(d)(_r(16, 5, 5, device=d)), ValueError,
        "x must be 4-D [N, C, H, W]"),
    Bad("cbam", "channel mismatch: 8 channels into `CBAM(16)`", lambda d: _cbam(d)(_r(2, 8, 5, 5, device=d)),
        ValueError, "x has 8 channels (shape (2, 8, 5, 5)) but the module was built for 16"),
    Bad("cbam", "unsupported dtype: int64", lambda d: _cbam(d)(torch.ones(2, 16, 5, 5, dtype=torch.long, device=d)),
        TypeError, "x must be float32, float16, bfloat16 or float64"),
    Bad("cbam", "mixed devices: a meta input into a CPU module", lambda d: _cbam(d)(_r(2, 16, 5, 5, device="meta")),
        ValueError, "is on cpu but x is on meta"),
    Bad("cbam", "mixed devices: a CPU input into a CUDA module", lambda d: _cbam(d)(_r(2, 16, 5, 5)), ValueError,
        "is on cuda:0 but x is on cpu", device="cuda"),
    Bad("cbam", "spatial kernel larger than the map (7x7 on 1x1)", _cbam_big_kernel, None,
        "not an error: padding k // 2 keeps H x W (as the tutorial's Conv2d)"),
    Bad("cbam", "zero channels: `CBAM(0)`", lambda d: fnn.CBAM(0), ValueError, "channels must be a positive int"),
    Bad("cbam", "reduction <= 0", lambda d: fnn.CBAM(16, reduction=0), ValueError,
        "reduction must be a positive number"),
    Bad("cbam", "even spatial kernel", lambda d: fnn.CBAM(16, spatial_kernel=4), ValueError,
        "kernel_size must be a positive odd int"),
    Bad("cbam", "conv_weight of the wrong shape (functional)",
        lambda d: F.cbam(_r(2, 16, 5, 5, device=d), *_cbam_w(device=d)[:2], _r(1, 3, 3, 3, device=d)), ValueError,
        "conv_weight must be [1, 2, k, k] with an odd k"),
    Bad("cbam", "zero H or W", lambda d: _cbam(d)(_r(2, 16, 0, 5, device=d)), ValueError,
        "must have non-zero C, H and W"),
    Bad("cbam", "spatial BN in training with one value per channel",
        lambda d: _cbam(d, variant="timm")(_r(1, 16, 1, 1, device=d)), ValueError,
        "needs more than 1 value per channel"),
    Bad("cbam", "raw op: `cbam` with an MLP weight of the wrong shape",
        lambda d: torch.ops.fastnn.cbam(_r(1, 4, 3, 3, device=d), _r(2, 4, device=d), None, _r(3, 2, device=d), None,
                                        _r(1, 2, 3, 3, device=d), None, None, None, None, None, False, False, 1e-5,
                                        True, True), ValueError, "w2"),
    Bad("cbam", "NaN/Inf in the input", _cbam_nan, None, "propagate as in the reference module (the sample's gate "
        "goes NaN)"),
]


# ---------------------------------------------------------------- stochastic_pool

def _sp(x, *a, **kw):
    return F.stochastic_pool2d(x, *a, **kw)


def _sp_nan(device):
    torch.manual_seed(0)
    for mode in ("activation", "softmax"):
        x = _r(2, 3, 6, 6, device=device).abs()
        x = _poison(x)
        x.view(-1)[x.numel() // 2] = 0.0 if mode == "activation" else -float("inf")
        for training in (False, True):
            out = _sp(x, 2, mode=mode, training=training)
            ref = R.stochastic_pool2d(x, (2, 2), (2, 2), (0, 0), False, mode, training)
            if training:  # samples differ: compare which windows are NaN, and the clean windows' membership
                assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{mode} training NaN windows"
                continue
            _nan_like_reference(out, ref, f"stochastic_pool2d {mode}")


BAD += [
    Bad("stochastic_pool", "wrong rank: a 3-D input", lambda d: _sp(_r(3, 6, 6, device=d).abs(), 2), ValueError,
        "input must be 4-D (N, C, H, W), got 3-D"),
    Bad("stochastic_pool", "channel mismatch with the module", lambda d: None, None,
        "not applicable: StochasticPool2d has no channel count"),
    Bad("stochastic_pool", "unsupported dtype: int64",
        lambda d: _sp(torch.ones(1, 2, 4, 4, dtype=torch.long, device=d), 2),
        TypeError, "input must be float32, float16, bfloat16 or float64"),
    Bad("stochastic_pool", "mixed devices: a generator on another device (meta input, CPU generator)",
        lambda d: _sp(_r(1, 2, 4, 4, device="meta"), 2, generator=torch.Generator()), ValueError,
        "generator is on cpu but input is on meta"),
    Bad("stochastic_pool", "mixed devices: a CPU generator for a CUDA input",
        lambda d: _sp(_r(1, 2, 4, 4, device=d).abs(), 2, generator=torch.Generator()), ValueError,
        "generator is on cpu but input is on cuda", device="cuda"),
    Bad("stochastic_pool", "kernel larger than the padded input (5x5 on 3x3)",
        lambda d: _sp(_r(1, 2, 3, 3, device=d).abs(), 5), ValueError, "is larger than the padded input"),
    Bad("stochastic_pool", "stride 0", lambda d: _sp(_r(1, 2, 4, 4, device=d).abs(), 2, 0), ValueError,
        "stride must be positive, got (0, 0)"),
    Bad("stochastic_pool", "negative stride", lambda d: fnn.StochasticPool2d(2, -1), ValueError,
        "stride must be positive, got (-1, -1)"),
    Bad("stochastic_pool", "kernel_size 0", lambda d: fnn.StochasticPool2d(0), ValueError,
        "kernel_size must be positive"),
    Bad("stochastic_pool", "padding above half the kernel", lambda d: fnn.StochasticPool2d(2, 2, 2), ValueError,
        "must be at most half of kernel_size"),
    Bad("stochastic_pool", "window above 256 elements", lambda d: fnn.StochasticPool2d(17), ValueError,
        "at most 256 are supported"),
    Bad("stochastic_pool", "negative input in mode='activation'",
        lambda d: _sp(-_r(1, 2, 4, 4, device=d).abs(), 2), ValueError, "apply a ReLU first"),
    Bad("stochastic_pool", "unknown mode", lambda d: fnn.StochasticPool2d(2, mode="max"), ValueError,
        "mode must be 'activation' or 'softmax'"),
    Bad("stochastic_pool", "raw op: backward with offsets of the wrong shape",
        lambda d: torch.ops.fastnn.stochastic_pool2d_backward(
            _r(1, 1, 2, 2, device=d), _r(1, 1, 4, 4, device=d), torch.zeros(1, 1, 3, 3, dtype=torch.uint8, device=d),
            [2, 2], [2, 2], [0, 0], False, "activation", True), ValueError, "offsets must have shape [1, 1, 2, 2]"),
    Bad("stochastic_pool", "NaN/Inf in the input", _sp_nan, None,
        "propagate as in the reference: a window with a NaN (or inf / inf) outputs NaN"),
]


# ---------------------------------------------------------------- drop_block

def _db_nan(device):
    x = _poison(_r(2, 3, 7, 6, device=device))
    kernels = [b for b in ("cpu", "triton") if backends.unavailable(b, device) is None]
    for be in kernels:
        for noise in (False, True):
            s = F.drop_block_seed_mask(x, 0.5, 3, generator=torch.Generator().manual_seed(0), backend=be)
            out = F.drop_block2d(x, 0.5, 3, with_noise=noise, generator=torch.Generator().manual_seed(0), backend=be)
            noise_t = torch.zeros(s.shape, device=device) if noise else None
            ref = R.drop_block_from_seeds(x, s.to(x.dtype), (3, 3), noise, True, noise_t)
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{be} noise={noise}: NaN positions"
            assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"{be} noise={noise}: inf positions"


def _db_big_block(device):
    x = _r(2, 3, 4, 5, device=device)
    be = "cpu" if device == "cpu" else "triton"
    a = F.drop_block2d(x, 0.5, 9, generator=torch.Generator().manual_seed(1), backend=be)
    b = F.drop_block2d(x, 0.5, (4, 5), generator=torch.Generator().manual_seed(1), backend=be)
    assert torch.equal(a, b)


BAD += [
    Bad("drop_block", "wrong rank: a 3-D input into `drop_block2d`",
        lambda d: F.drop_block2d(_r(3, 6, 6, device=d), 0.1, 3), ValueError,
        "input must be (N, C, H, W) (4-D), got shape (3, 6, 6); use drop_block1d for 3-D inputs"),
    Bad("drop_block", "channel mismatch with the module", lambda d: None, None,
        "not applicable: DropBlock2d has no channel count"),
    Bad("drop_block", "unsupported dtype: int64",
        lambda d: F.drop_block2d(torch.ones(1, 2, 4, 4, dtype=torch.long, device=d), 0.1, 3), TypeError,
        "input must be float16, bfloat16, float32 or float64"),
    Bad("drop_block", "mixed devices: a CPU generator for a CUDA input", lambda d: F.drop_block2d(
        _r(1, 2, 8, 8, device=d), 0.3, 3, generator=torch.Generator().manual_seed(0)), None,
        "not an error: the seed is drawn on the generator's device and moved", device="cuda"),
    Bad("drop_block", "block larger than the input (9 on 4x5)", _db_big_block, None,
        "not an error: clipped to the map per axis, as timm"),
    Bad("drop_block", "block_size 0", lambda d: fnn.DropBlock2d(0.1, 0), ValueError,
        "block_size must be an int >= 1 or a sequence of 2 ints >= 1"),
    Bad("drop_block", "negative block size in a tuple",
        lambda d: F.drop_block2d(_r(1, 2, 5, 5, device=d), 0.1, (3, -1)),
        ValueError, "block_size must be an int >= 1"),
    Bad("drop_block", "drop_prob < 0", lambda d: F.drop_block2d(_r(1, 2, 5, 5, device=d), -0.1, 3), ValueError,
        "drop_prob must be a number in [0, 1], got -0.1"),
    Bad("drop_block", "drop_prob > 1", lambda d: fnn.DropBlock2d(1.5, 3), ValueError,
        "drop_prob must be a number in [0, 1], got 1.5"),
    Bad("drop_block", "negative gamma_scale", lambda d: F.drop_block2d(_r(1, 2, 5, 5, device=d), 0.1, 3,
                                                                        gamma_scale=-1.0), ValueError,
        "gamma_scale must be a finite number >= 0"),
    Bad("drop_block", "generator of the wrong type", lambda d: F.drop_block2d(_r(1, 2, 5, 5, device=d), 0.1, 3,
                                                                               generator=3), TypeError,
        "generator must be a torch.Generator or None, got int"),
    Bad("drop_block", "LinearScheduler with nr_steps 0", lambda d: fnn.LinearScheduler(fnn.DropBlock2d(), 0, 0.1, 0),
        ValueError, "nr_steps must be an int >= 1"),
    Bad("drop_block", "raw op: backward with a mask of the wrong shape",
        lambda d: torch.ops.fastnn.drop_block_bwd(_r(1, 1, 4, 4, device=d), torch.zeros(3, 1, dtype=torch.uint8,
                                                                                         device=d),
                                                  torch.zeros(2, dtype=torch.int64, device=d), True, False),
        ValueError, "mask must be a contiguous uint8 [4, 1] tensor"),
    Bad("drop_block", "NaN/Inf in the input", _db_nan, None,
        "propagate as in the reference (x * keep * scale: a dropped NaN or inf stays NaN, as timm and F.dropout)"),
]

OPS = ("conv_bn_relu", "flash_attention", "cbam", "stochastic_pool", "drop_block")
NEEDS_EXT = ("raw op: `bn_relu", "raw op: `cbam", "raw op: backward")


def _id(b: Bad) -> str:
    return f"{b.op}-{re.sub(r'[^a-zA-Z0-9]+', '_', b.what)[:60]}"


def _param(b: Bad):
    marks = [pytest.mark.cuda] if b.device == "cuda" else []
    if any(b.what.startswith(p) for p in NEEDS_EXT):
        marks.append(pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built"))
    if b.what.startswith("raw op: `flash_attn"):
        marks.append(pytest.mark.skipif(backends.triton_available() is not None, reason="needs triton"))
    return pytest.param(b, marks=marks, id=_id(b))


@pytest.mark.parametrize("row", [_param(b) for b in BAD])
def test_bad_input(row: Bad):
    dev = row.device
    if row.exc is None:
        row.call(dev)  # checks the documented behaviour itself
        return
    with pytest.raises(row.exc, match=re.escape(row.msg)):
        row.call(dev)


def test_every_op_has_the_contract_rows():
    kinds = ("wrong rank", "unsupported dtype", "mixed devices", "NaN/Inf")
    for op in OPS:
        rows = [b.what for b in BAD if b.op == op]
        for kind in kinds:
            assert any(w.startswith(kind) for w in rows), f"{op}: no '{kind}' row"
        assert any("channel mismatch" in w or "embedding size mismatch" in w for w in rows), op
        assert any(w.startswith("raw op") for w in rows), f"{op}: no row for the C++/Triton op's own checks"


# ---------------------------------------------------------------- the doc

def render() -> str:
    lines = [BEGIN, ""]
    for op in OPS:
        lines += [f"#### {op}", "", "| invalid input | exception | message (excerpt) or behaviour |", "|---|---|---|"]
        for b in BAD:
            if b.op != op:
                continue
            exc = "-" if b.exc is None else b.exc.__name__
            where = " (CUDA)" if b.device == "cuda" else ""
            lines.append(f"| {b.what}{where} | {exc} | {b.msg.replace('|', '/')} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _doc_text() -> str:
    with open(DOC) as f:
        return f.read()


def test_doc_matches_table():
    text = _doc_text()
    assert BEGIN in text and END in text, "docs/robustness.md lost its table markers"
    got = text[text.index(BEGIN):text.index(END) + len(END)]
    assert got == render(), "docs/robustness.md is out of date: run python tests/test_bad_input.py --write-doc"


# ---------------------------------------------------------------- empty inputs, as PyTorch

def _same_outcome(mine: Callable, theirs: Callable):
    """Both raise, or both return tensors of equal shapes (and values, when there are any)."""
    try:
        want = theirs()
    except Exception:
        with pytest.raises(Exception):
            mine()
        return None
    got = mine()
    got, want = (got if isinstance(got, (tuple, list)) else (got,)), (want if isinstance(want, (tuple, list))
                                                                       else (want,))
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    return got


@pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built")
@pytest.mark.parametrize("shape", [(0, 4, 6, 6), (2, 4, 0, 6), (0, 4, 2, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_empty_conv_bn_relu(shape, train):
    m = fnn.ConvBNReLU2d(4, 8, 3, padding=1).train(train)
    ref = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU()).train(train)
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    try:
        yr = ref(xr)
    except Exception:
        with pytest.raises(Exception):
            m(x)
        return
    y = m(x)
    assert y.shape == yr.shape
    y.sum().backward()
    yr.sum().backward()
    assert x.grad.shape == x.shape and xr.grad.shape == x.shape
    for (n, b), br in zip(m.bn.named_buffers(), ref[1].buffers()):
        assert torch.equal(b, br), n  # an empty batch leaves the statistics as BatchNorm2d does


@pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built")
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 5), (2, 4, 0), (0, 4, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_norm_relu(shape, training):
    x = torch.randn(shape)
    stats = [torch.randn(4), torch.rand(4) + 0.5]
    mine, theirs = [t.clone() for t in stats], [t.clone() for t in stats]
    _same_outcome(lambda: F.batch_norm_relu(x, *mine, training=training),
                  lambda: R.batch_norm_relu(x, *theirs, training=training))
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("b,sq,sk", [(0, 5, 7), (1, 0, 7), (1, 5, 0), (1, 0, 0)])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERP, reason="needs the Triton interpreter"))])
def test_empty_flash_attention(b, sq, sk, backend):
    q, k, v = _r(b, sq, 2, 16), _r(b, sk, 2, 16), _r(b, sk, 2, 16)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = F.flash_attn_func(q, k, v, backend=backend)
    want = TF.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)  # no keys: 0, as torch's SDPA (and flash-attn)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g is None or (g.shape == t.shape and bool((g == 0).all()))


@pytest.mark.parametrize("shape", [(0, 16, 5, 5), (2, 16, 0, 5), (2, 16, 5, 0)])
@pytest.mark.parametrize("variant", ["tutorial", "timm"])
def test_empty_cbam(shape, variant):
    m = fnn.CBAM(16, variant=variant)
    x = torch.randn(shape, requires_grad=True)
    w1, b1, w2, b2 = m.ca.mlp_params()
    kw = dict(mlp_bias1=b1, mlp_bias2=b2, max_ties=m.max_ties)
    if m.sa.bn_layer is not None:
        bn = m.sa.bn_layer
        kw.update(spatial_bn=True, bn_weight=bn.weight, bn_bias=bn.bias, bn_running_mean=bn.running_mean.clone(),
                  bn_running_var=bn.running_var.clone(), bn_training=True, bn_eps=bn.eps)
    got = _same_outcome(lambda: m(x), lambda: R.cbam(x.detach(), w1, w2, m.sa.conv_layer.weight, **kw))
    if got is not None:
        got[0].sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built")
@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (2, 3, 0, 6), (2, 3, 6, 0), (2, 0, 6, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_stochastic_pool(shape, training):
    x = torch.rand(shape, requires_grad=True)
    if shape[1] == 0:  # nn.MaxPool2d raises for C = 0; fastnn returns the (empty) result instead
        out = F.stochastic_pool2d(x, 3, 2, 1, training=training)
        assert out.shape == (2, 0, 3, 3)
        out.sum().backward()
        assert x.grad.shape == x.shape
        return
    got = _same_outcome(lambda: F.stochastic_pool2d(x, 3, 2, 1, training=training),
                        lambda: TF.max_pool2d(x.detach(), 3, 2, 1))
    if got is not None:
        got[0].sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (2, 0, 6, 6), (2, 3, 0, 6)])
def test_empty_drop_block(shape):
    x = torch.randn(shape)
    for be in [b for b in ("cpu", "triton", "reference") if backends.unavailable(b, "cpu") is None]:
        assert F.drop_block2d(x, 0.3, 3, backend=be) is x  # nothing to drop: the input, as F.dropout's shape
    assert TF.dropout(x, 0.3).shape == x.shape


# ---------------------------------------------------------------- a PyTorch bug the fuzzer met

@pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built")
@pytest.mark.parametrize("training", [True, False])
def test_pytorch_batch_norm_stride_bug(training):
    """PyTorch's CPU batch_norm backward is wrong for channels-last-like strides with a size-1 dim
    (torch 2.14.1: shape (4, 12, 1, 9), strides (108, 1, 12, 12)); fastnn's kernels are right
    there, which is why the fuzz references run on contiguous copies."""
    torch.manual_seed(0)
    base = torch.randn(4, 12, 1, 9, dtype=torch.float64)
    x = base.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # strides (108, 1, 12, 12)
    assert x.stride() == (108, 1, 12, 12)
    rm, rv, w = torch.randn(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64) + 0.5, \
        torch.rand(12, dtype=torch.float64) + 0.5
    g = torch.randn(x.shape, dtype=torch.float64)

    def grad(fn, t):
        t = t.clone(memory_format=torch.preserve_format).requires_grad_(True)
        y = fn(t, rm.clone(), rv.clone(), w, None, training, 0.1, 1e-5, False)
        return torch.autograd.grad((y * g).sum(), t)[0]

    want = grad(R.batch_norm_relu, base)  # contiguous: PyTorch is right here
    torch.testing.assert_close(grad(F.batch_norm_relu, x), want, rtol=1e-10, atol=1e-10)
    torch_err = (grad(R.batch_norm_relu, x) - want).abs().max().item()
    print(f"PyTorch's batch_norm backward error on these strides: {torch_err:.3g}")  # ~6-8 with torch 2.14.1


if __name__ == "__main__":
    if "--write-doc" in sys.argv:
        text = _doc_text()
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + render() + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + render() + "\n"
        with open(DOC, "w") as f:
            f.write(text)
        print(f"wrote the table into {DOC}")
    else:
        print(render())
