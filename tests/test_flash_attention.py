"""FlashAttention: the Triton kernels (CPU: Triton's interpreter on tiny shapes; CUDA: the sweep),
the flash_attn_func / SDPA entry points, MultiheadAttention and patch_sdpa.

References: fastnn.reference.attention_math in float64 (softmax(q k^T * scale) v, materialized) and
torch's own SDPA. Low precision passes when its error is at most 2x PyTorch's error in the same
dtype (the same math run in that dtype) + one ulp of the result's magnitude.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import backends, reference
from fastnn.functional import flash_attn_func, scaled_dot_product_attention
from fastnn.ops import flash_attention as fa
from helpers import HAS_CUDA, assert_lowp_close, fastnn_home, noncontig

OP = "flash_attention"
HAS_TRITON = backends.triton_available() is None
# CPU tensors reach the Triton kernels only through the interpreter (conftest sets it without a GPU)
INTERP = backends.triton_interpreted() and HAS_TRITON
needs_interp = pytest.mark.skipif(not INTERP, reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1 "
                                  "(set by conftest when there is no GPU)")
CPU = pytest.param("cpu", marks=needs_interp)
DEVS = [CPU, pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    # one fixed tile config per shape: autotuning every case would only add compile time
    monkeypatch.setenv("FASTNN_FA_AUTOTUNE", "0")
    if HAS_TRITON:
        fa.register_ops()


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def _make(b, sq, sk, h, hkv, d, dtype, device, scale=1.0):
    q = _rand((b, sq, h, d), dtype, device, scale)
    k = _rand((b, sk, hkv, d), dtype, device, scale)
    v = _rand((b, sk, hkv, d), dtype, device)
    return q, k, v


def _ref_bshd(q, k, v, *, causal, bottom_right=True, scale=None, keep=None, p=0.0, dtype=torch.float64):
    """The materialized reference in (B, S, H, D) layout, computed in `dtype`."""
    qt, kt, vt = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
    shift = (k.shape[1] - q.shape[1]) if bottom_right else 0
    out, lse = reference.attention_math(qt, kt, vt, scale=scale, causal=causal, causal_shift=shift,
                                        keep=keep, dropout_p=p)
    return out.transpose(1, 2), lse


def _atol(ref, dtype):
    return 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * ref.abs().max().item()


def _check_fwd_bwd(q, k, v, *, causal, scale=None, bottom_right=True, sdpa_entry=False, grad_lse=True):
    """Run fastnn's Triton path on (B, S, H, D) inputs and compare out, lse, dq, dk, dv with the
    float64 reference and torch's error in the same dtype."""
    dtype, device = q.dtype, q.device
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if sdpa_entry:  # torch's (B, H, L, E) API: top-left causal, no lse
        out = scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[2] != k.shape[2], backend="triton").transpose(1, 2)
        lse = None
    else:
        out, lse = flash_attn_func(*leaves, softmax_scale=scale, causal=causal, return_lse=True, backend="triton")
    assert backends.last_choice(OP)[0] == "triton"
    assert out.shape == q.shape and out.dtype == dtype

    ref64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o64, l64 = _ref_bshd(*ref64, causal=causal, bottom_right=bottom_right, scale=scale)
    olo, llo = _ref_bshd(*low, causal=causal, bottom_right=bottom_right, scale=scale, dtype=dtype)
    assert_lowp_close(out, o64, olo, atol=_atol(o64, dtype), what="out")
    if lse is not None:
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        fin = torch.isfinite(l64)
        assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
        torch.testing.assert_close(lse[fin].double(), l64[fin], atol=1e-4, rtol=1e-5)

    g = torch.randn_like(o64)
    gl = torch.randn_like(l64).masked_fill(~torch.isfinite(l64), 0) if (grad_lse and lse is not None) else None

    def loss(o, l_):
        tot = (o.double() * g).sum()
        if gl is not None:
            tot = tot + (l_.double().masked_fill(~torch.isfinite(l_), 0) * gl).sum()
        return tot

    mine = torch.autograd.grad(loss(out, lse), leaves)
    want = torch.autograd.grad(loss(o64, l64), ref64)
    base = torch.autograd.grad(loss(olo, llo), low)
    for name, a, w, bl in zip("qkv", mine, want, base):
        assert a.shape == w.shape
        assert_lowp_close(a, w, bl, atol=_atol(w, dtype), what=f"d{name}")


# ----------------------------------------------------------------------------- kernels vs reference

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, dtype)
CPU_CASES = [
    (2, 17, 17, 2, 2, 40, False, torch.float16),
    (1, 33, 20, 4, 2, 64, True, torch.bfloat16),   # causal, Sq > Sk: bottom-right leaves empty rows
    (1, 20, 45, 2, 1, 16, True, torch.float32),    # MQA, Sq < Sk
    (1, 1, 37, 2, 2, 80, True, torch.float16),     # seqlen 1, head dim 80
]
CUDA_CASES = [
    (2, 1, 1, 2, 2, 64, False, torch.float16),
    (2, 17, 17, 4, 4, 40, True, torch.bfloat16),
    (2, 97, 97, 8, 2, 80, True, torch.float16),
    (1, 1025, 1025, 4, 4, 128, False, torch.bfloat16),
    (1, 1025, 1025, 4, 4, 128, True, torch.float16),
    (2, 128, 1025, 4, 1, 256, True, torch.bfloat16),
    (1, 1025, 97, 4, 2, 64, True, torch.bfloat16),
    (1, 97, 1025, 6, 2, 96, True, torch.float16),
    (2, 300, 257, 2, 2, 160, False, torch.bfloat16),
    (1, 513, 513, 4, 4, 256, False, torch.float16),
    (2, 97, 130, 4, 4, 64, True, torch.float32),
    (1, 257, 257, 2, 2, 128, False, torch.float32),
    (1, 129, 77, 2, 2, 256, True, torch.float32),
]


def _case_id(c):
    return f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}x{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-{str(c[7])[6:]}"


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_interp) for c in CPU_CASES]
                         + [pytest.param(c, marks=pytest.mark.cuda) for c in CUDA_CASES], ids=_case_id)
def test_flash_attn_func_matches_reference(case):
    b, sq, sk, h, hkv, d, causal, dtype = case
    device = "cuda" if case in CUDA_CASES else "cpu"
    q, k, v = _make(b, sq, sk, h, hkv, d, dtype, device)
    _check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVS)
def test_sdpa_entry_is_top_left_causal(device):
    big = device == "cuda"
    sq, sk = (97, 301) if big else (12, 23)
    for sq_, sk_ in ((sq, sk), (sk, sq)):
        q, k, v = _make(2, sq_, sk_, 4, 2, 64 if big else 32, torch.bfloat16, device)
        _check_fwd_bwd(q, k, v, causal=True, bottom_right=False, sdpa_entry=True)


@pytest.mark.parametrize("device", DEVS)
def test_softmax_scale(device):
    q, k, v = _make(1, 19, 21, 2, 2, 32, torch.float32, device)
    for scale in (0.3, 1.7, -0.5):
        _check_fwd_bwd(q, k, v, causal=False, scale=scale, grad_lse=False)


@pytest.mark.parametrize("device", DEVS)
def test_sdpa_matches_torch_sdpa(device):
    """Against torch's own SDPA (not only the math reference), GQA and the default scale."""
    big = device == "cuda"
    b, h, hkv, l, s, e = (2, 8, 2, 257, 513, 128) if big else (1, 4, 2, 9, 14, 16)
    q = torch.randn(b, h, l, e, device=device)
    k = torch.randn(b, hkv, s, e, device=device)
    v = torch.randn(b, hkv, s, e, device=device)
    for causal in (False, True):
        mine = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend="triton")
        want = reference.torch_sdpa(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(mine.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVS)
def test_noncontiguous_inputs(device):
    """Views of a packed QKV projection (strided along seq and heads) and a strided head dim give
    exactly what contiguous copies give."""
    big = device == "cuda"
    b, s, h, d = (2, 333, 4, 64) if big else (1, 18, 2, 16)
    qkv = torch.randn(b, s, 3, h, d, device=device, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    for causal in (False, True):
        a = flash_attn_func(q, k, v, causal=causal, backend="triton")
        c = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, backend="triton")
        assert torch.equal(a, c)
    qn, kn, vn = (noncontig(t.contiguous()) for t in (q, k, v))  # head-dim stride 2
    assert torch.equal(flash_attn_func(qn, kn, vn, backend="triton"),
                       flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    # the SDPA entry with (B, H, L, E) views of the same buffer, and a gradient through the views
    qkv.requires_grad_()
    qs, ks, vs = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = scaled_dot_product_attention(qs, ks, vs, is_causal=True, backend="triton")
    out.float().square().sum().backward()
    ref = qkv.detach().clone().requires_grad_()
    qr, kr, vr = (t.transpose(1, 2).contiguous() for t in ref.unbind(2))
    out_r = scaled_dot_product_attention(qr, kr, vr, is_causal=True, backend="triton")
    out_r.float().square().sum().backward()
    assert torch.equal(out, out_r) and torch.equal(qkv.grad, ref.grad)


# ----------------------------------------------------------------------------- dropout

def _dropout_case(device, dtype, causal):
    big = device == "cuda"
    b, sq, sk, h, hkv, d = (2, 200, 333, 4, 2, 64) if big else (1, 20, 27, 2, 1, 32)
    q, k, v = _make(b, sq, sk, h, hkv, d, dtype, device)
    p = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1234)
    out, lse = flash_attn_func(*leaves, dropout_p=p, causal=causal, return_lse=True, backend="triton")
    torch.manual_seed(1234)  # replay the seed draw the call made
    seed = fa.draw_dropout_seed(device)
    keep = fa.dropout_mask(seed, b, h, sq, sk, p)
    assert keep.shape == (b, h, sq, sk) and keep.dtype == torch.bool
    ref64 = [t.double().requires_grad_() for t in (q, k, v)]
    o64, l64 = _ref_bshd(*ref64, causal=causal, keep=keep, p=p)
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    olo, _ = _ref_bshd(*low, causal=causal, keep=keep, p=p, dtype=dtype)
    assert_lowp_close(out, o64, olo, atol=_atol(o64, dtype), what="out (dropout)")
    fin = torch.isfinite(l64)
    torch.testing.assert_close(lse[fin].double(), l64[fin], atol=1e-4, rtol=1e-5)  # lse ignores dropout
    g = torch.randn_like(o64)
    mine = torch.autograd.grad((out.double() * g).sum(), leaves)
    want = torch.autograd.grad((o64 * g).sum(), ref64)
    base = torch.autograd.grad((olo.double() * g).sum(), low)
    for name, a, w, bl in zip("qkv", mine, want, base):
        assert_lowp_close(a, w, bl, atol=_atol(w, dtype), what=f"d{name} (dropout: the backward must use the same mask)")
    return out


@pytest.mark.parametrize("device", DEVS)
def test_dropout_uses_the_exposed_mask_forward_and_backward(device):
    _dropout_case(device, torch.float32, causal=False)
    _dropout_case(device, torch.bfloat16 if device == "cpu" else torch.float16, causal=True)


@pytest.mark.parametrize("device", DEVS)
def test_dropout_keep_fraction_and_fresh_masks(device):
    n = (4, 8, 256, 512) if device == "cuda" else (2, 2, 64, 128)
    for p in (0.1, 0.5, 0.9):
        keep = fa.dropout_mask(fa.draw_dropout_seed(device), *n, p)
        frac = keep.float().mean().item()
        sigma = math.sqrt(p * (1 - p) / keep.numel())
        assert abs(frac - (1 - p)) < 5 * sigma, (p, frac)
        # no structure: each query row keeps about the same share
        rows = keep.float().mean(-1).flatten()
        assert rows.std().item() < 5 * math.sqrt(p * (1 - p) / n[-1])
    s1, s2 = fa.draw_dropout_seed(device), fa.draw_dropout_seed(device)
    assert not torch.equal(fa.dropout_mask(s1, *n, 0.5), fa.dropout_mask(s2, *n, 0.5))
    q = torch.randn(1, 16, 2, 16, device=device)
    a = flash_attn_func(q, q, q, dropout_p=0.5, backend="triton")
    b = flash_attn_func(q, q, q, dropout_p=0.5, backend="triton")
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- API behaviour

def test_cpu_default_is_torch_sdpa_and_gradcheck():
    """CPU tensors run torch's SDPA (the reference backend); float64 gradcheck through the API."""
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        out = flash_attn_func(q, k, v, causal=causal)
        assert backends.last_choice(OP)[0] == "reference"
        ref, _ = _ref_bshd(q, k, v, causal=causal)
        torch.testing.assert_close(out, ref)
        assert torch.autograd.gradcheck(lambda a, b_, c: flash_attn_func(a, b_, c, causal=causal), (q, k, v))
    # Sq > Sk bottom-right with lse: empty rows are 0 with lse -inf
    q2 = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = flash_attn_func(q2, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2])) and torch.isneginf(lse[..., :2]).all()
    assert torch.autograd.gradcheck(lambda a, b_, c: flash_attn_func(a, b_, c, causal=True), (q2, k, v))


@needs_interp
def test_sdpa_cpu_and_fallbacks_are_torch():
    q = torch.randn(2, 3, 6, 8)
    k = torch.randn(2, 3, 9, 8)
    mask = torch.randn(6, 9)
    assert torch.equal(scaled_dot_product_attention(q, k, k, attn_mask=mask), F.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    assert torch.equal(scaled_dot_product_attention(q, k, k, is_causal=True), F.scaled_dot_product_attention(q, k, k, is_causal=True))
    v5 = torch.randn(2, 3, 9, 5)  # a value head dim that differs: torch's SDPA
    assert torch.equal(scaled_dot_product_attention(q, k, v5), F.scaled_dot_product_attention(q, k, v5))
    with pytest.raises(RuntimeError, match="attn_mask"):
        scaled_dot_product_attention(q, k, k, attn_mask=mask, backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        flash_attn_func(torch.randn(1, 4, 1, 8, dtype=torch.float64), *[torch.randn(1, 4, 1, 8, dtype=torch.float64)] * 2,
                        backend="triton")


@pytest.mark.cuda
def test_cuda_fallback_is_reported(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())  # warn_once: forget earlier tests' warnings
    q = torch.randn(1, 2, 16, 32, device="cuda", dtype=torch.float16)
    mask = torch.randn(16, 16, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="attn_mask"):
        out = scaled_dot_product_attention(q, q, q, attn_mask=mask + 100.0)
    assert backends.last_choice(OP)[0] == "reference"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask + 100.0))
    scaled_dot_product_attention(q, q, q, is_causal=True)
    assert backends.last_choice(OP)[0] == "triton"


def test_bad_inputs_raise_clear_errors():
    t = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="head dims differ"):
        flash_attn_func(t, torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="out of range"):
        big = torch.randn(1, 2, 1, 257)
        flash_attn_func(big, big, big)
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_func(t[0], t[0], t[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        flash_attn_func(t, t.half(), t)
    with pytest.raises(TypeError, match="not supported"):
        flash_attn_func(t.int(), t.int(), t.int())
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(torch.randn(1, 4, 3, 8), t, t)
    with pytest.raises(ValueError, match="same shape"):
        flash_attn_func(t, t, torch.randn(1, 5, 2, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(t, t, t, dropout_p=1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        flash_attn_func(t.numpy(), t, t)
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_func(t, t, t, window_size=(4, 0))
    if HAS_CUDA:
        with pytest.raises(ValueError, match="different devices"):
            flash_attn_func(t.cuda(), t, t)
    mha = fastnn.nn.MultiheadAttention(8, 2)
    with pytest.raises(Exception):  # torch's own error for a mask of the wrong shape
        mha(torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), attn_mask=torch.zeros(5, 5),
            need_weights=False)


@pytest.mark.parametrize("device", DEVS)
def test_empty_and_zero_length(device):
    q = torch.randn(0, 4, 2, 16, device=device)
    assert flash_attn_func(q, q, q, backend="triton").shape == q.shape
    q = torch.randn(1, 3, 2, 16, device=device)
    k = torch.randn(1, 0, 2, 16, device=device)
    out, lse = flash_attn_func(q, k, k, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------- registration

def test_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not INTERP:
        pytest.skip("no GPU and no Triton interpreter (or no triton)")
    q, k, v = _make(1, 19, 23, 2, 1, 16, torch.float32, device)
    seed = fa.draw_dropout_seed(device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA:
        tests = tests + ("test_aot_dispatch_dynamic",)
    for args in ((q, k, v, None, 0.0, 0.25, True, True), (q, k, v, seed, 0.2, 0.25, False, False)):
        torch.library.opcheck(torch.ops.fastnn.flash_attn_fwd, args, test_utils=tests)
    out, lse = torch.ops.fastnn.flash_attn_fwd(q, k, v, None, 0.0, 0.25, True, True)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.fastnn.flash_attn_bwd,
                              (torch.randn_like(out), q, k, v, out, lse, dlse, None, 0.0, 0.25, True, True),
                              test_utils=tests)


def test_compile_marker_matches_torch():
    # fastnn marks _ops_ready as assume_constant_result without importing torch._dynamo at import
    def probe():
        return True
    assert getattr(torch.compiler.assume_constant_result(probe), "_dynamo_marked_constant", False)
    assert fa._ops_ready._dynamo_marked_constant


@needs_interp
def test_compile_fullgraph_cpu_capture():
    """Dynamo captures the API (backend choice, lazy op registration) without a graph break. The
    Triton kernels themselves are compiled by Inductor only on CUDA (see the CUDA test)."""
    torch._dynamo.reset()
    q, k, v = _make(1, 12, 12, 2, 2, 16, torch.float32, "cpu")

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True, backend="triton").sin()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), f(q, k, v))


@pytest.mark.cuda
def test_compile_inductor_cuda():
    """Inductor compiles the Triton kernels (as user-defined kernels) into the graph, forward and
    backward. Compiled and eager results agree to a few bf16 ulps of the largest value, not
    bitwise: Inductor elides the bf16 round trips between the ops it fuses (here the GQA dK/dV group
    sums and the adds of the two attention terms; torch._inductor.config.emulate_precision_casts
    keeps them), and the compiled forward uses pointer loads where eager may use TMA. Both also pass
    the accuracy rule of the other tests against the float64 reference."""
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in _make(2, 257, 300, 4, 2, 64, torch.bfloat16, "cuda"))

    def f(q, k, v):
        o = flash_attn_func(q, k, v, causal=True)
        s = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
        return o * 2 + s.transpose(1, 2)

    def ref(q, k, v, dtype):  # the same composite from the materialized reference in `dtype`
        o, _ = _ref_bshd(q, k, v, causal=True, bottom_right=True, dtype=dtype)
        s, _ = _ref_bshd(q, k, v, causal=True, bottom_right=False, dtype=dtype)
        return o * 2 + s

    cf = torch.compile(f, fullgraph=True)
    out = cf(q, k, v)
    want = f(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    eager = torch.autograd.grad(want, (q, k, v), g)
    few_ulps = 4 * torch.finfo(torch.bfloat16).eps
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + got, (want,) + eager):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=few_ulps, atol=few_ulps * b.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")

    ref64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o64, olo = ref(*ref64, torch.float64), ref(*low, torch.bfloat16)
    assert_lowp_close(out, o64, olo, atol=_atol(o64, torch.bfloat16), what="compiled out")
    want64 = torch.autograd.grad(o64, ref64, g.double())
    base = torch.autograd.grad(olo, low, g)
    for name, a, w, bl in zip("qkv", got, want64, base):
        assert_lowp_close(a, w, bl, atol=_atol(w, torch.bfloat16), what=f"compiled d{name}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernels_compile_for_sm90_with_inductor_scalar_types():
    """Every launch compiles for sm_90 without a GPU (CI has none), with Python floats typed as
    Triton's launcher does (fp32, to a cubin) and as Inductor does for user kernels under
    torch.compile (fp64, to Triton IR with no fp64 math): the fp64 softmax scale once turned the
    forward's accumulator fp64, and tl.dot rejected it, only under torch.compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from fastnn.triton_kernels.flash_attention import compile_check\n"
            "f = compile_check(90)\n"
            "print('\\n'.join(map(str, f)) or 'ALL COMPILED')\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                       cwd=fastnn_home())
    assert r.returncode == 0 and "ALL COMPILED" in r.stdout, r.stdout[-6000:] + r.stderr[-4000:]


def test_import_does_not_load_triton():
    code = "import sys, fastnn; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=fastnn_home())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["False", "False"], r.stdout


# ----------------------------------------------------------------------------- CUDA-only kernel knobs

@pytest.mark.cuda
def test_autotuned_path_and_deterministic_backward(monkeypatch):
    monkeypatch.setenv("FASTNN_FA_AUTOTUNE", "1")
    q, k, v = _make(2, 1000, 1000, 4, 4, 128, torch.bfloat16, "cuda")
    _check_fwd_bwd(q, k, v, causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(q)
    a = torch.autograd.grad(flash_attn_func(*leaves, causal=True), leaves, g)
    b = torch.autograd.grad(flash_attn_func(*leaves, causal=True), leaves, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.cuda
def test_tma_and_pointer_paths_agree():
    from fastnn.triton_kernels import flash_attention as K
    if not K.HAS_TENSOR_DESC or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Triton >= 3.4 and sm_90+")
    for d, causal in ((64, False), (128, True), (80, True)):
        q, k, v = _make(2, 517, 700, 4, 2, d, torch.float16, "cuda")
        a, la = K.forward(q, k, v, softmax_scale=0.1, causal=causal, causal_shift=183, use_tma=True)
        b, lb = K.forward(q, k, v, softmax_scale=0.1, causal=causal, causal_shift=183, use_tma=False)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- MultiheadAttention

def _mha_pair(device, dtype=torch.float32, **kw):
    torch.manual_seed(7)
    theirs = torch.nn.MultiheadAttention(**kw, device=device, dtype=dtype)
    mine = fastnn.nn.MultiheadAttention(**kw, device=device, dtype=dtype)
    mine.load_state_dict(theirs.state_dict())
    return mine, theirs


@pytest.mark.parametrize("device", DEVS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_matches_torch(device, batch_first):
    e, h = 32, 4
    mine, theirs = _mha_pair(device, embed_dim=e, num_heads=h, batch_first=batch_first)
    assert list(mine.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(mine.state_dict())
    x = torch.randn(2, 11, e, device=device)
    mem = torch.randn(2, 7, e, device=device)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11, device=device)
    with fastnn.use_backend(flash_attention="triton"):  # the Triton kernel on CPU too (interpreter)
        for args, kw in (((x, x, x), {}), ((x, mem, mem), {}), ((x, x, x), dict(attn_mask=causal, is_causal=True))):
            a, w = mine(*args, need_weights=False, **kw)
            assert w is None and backends.last_choice(OP)[0] == "triton"
            b, _ = theirs(*args, need_weights=False, **kw)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # need_weights=True: torch's path, weights included
    a, wa = mine(x, mem, mem)
    b, wb = theirs(x, mem, mem)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    # key_padding_mask: torch's path
    kpm = torch.zeros(2, 7, dtype=torch.bool, device=device)
    kpm[:, -2:] = True
    a, _ = mine(x, mem, mem, key_padding_mask=kpm, need_weights=False)
    b, _ = theirs(x, mem, mem, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVS)
def test_mha_kdim_vdim_unbatched_training_and_grads(device):
    mine, theirs = _mha_pair(device, embed_dim=16, num_heads=2, kdim=12, vdim=10)
    assert set(mine.state_dict()) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                      "out_proj.weight", "out_proj.bias"}
    x, kk, vv = (torch.randn(*s_, device=device) for s_ in ((5, 16), (6, 12), (6, 10)))  # unbatched (L, E)
    with fastnn.use_backend(flash_attention="triton"):
        a, _ = mine(x, kk, vv, need_weights=False)
        a.sum().backward()
    b, _ = theirs(x, kk, vv, need_weights=False)
    b.sum().backward()
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for (n, p1), p2 in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=2e-5, rtol=1e-4, msg=n)
    # and a torch module loads fastnn's state_dict
    torch.nn.MultiheadAttention(16, 2, kdim=12, vdim=10).load_state_dict(mine.state_dict())


@pytest.mark.parametrize("device", DEVS)
def test_mha_dropout_in_training_only(device):
    mha = fastnn.nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True, device=device)
    x = torch.randn(2, 9, 16, device=device)
    with fastnn.use_backend(flash_attention="triton"):
        mha.eval()
        assert torch.equal(mha(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
        mha.train()
        assert not torch.equal(mha(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])


# ----------------------------------------------------------------------------- patch_sdpa

@pytest.mark.parametrize("device", DEVS)
def test_patch_sdpa_scoped_and_global(device):
    orig = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 10, 16, device=device)
    with fastnn.patch_sdpa():
        assert fa.sdpa_patched() and F.scaled_dot_product_attention is not orig
        with fastnn.use_backend(flash_attention="triton"):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            assert backends.last_choice(OP)[0] == "triton"
            # torch's own MultiheadAttention calls SDPA through the module attribute too
            m = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=device)
            x = torch.randn(1, 10, 16, device=device)
            m(x, x, x, need_weights=False)
            assert backends.last_choice(OP)[0] == "triton"
        # a general mask inside the patch runs torch's original SDPA (no recursion)
        mask = torch.randn(10, 10, device=device)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, attn_mask=mask),
                                   orig(q, q, q, attn_mask=mask))
    assert F.scaled_dot_product_attention is orig and not fa.sdpa_patched()
    torch.testing.assert_close(out, orig(q, q, q, is_causal=True), atol=2e-5, rtol=1e-4)
    handle = fastnn.patch_sdpa()  # globally, until undone
    try:
        assert fa.sdpa_patched()
    finally:
        fastnn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is orig
    handle.restore()  # a no-op after unpatch
    assert F.scaled_dot_product_attention is orig


@pytest.mark.cuda
def test_patch_sdpa_timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).cuda().half().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.half)
    with torch.no_grad():
        want = model(x)
        with fastnn.patch_sdpa():
            got = model(x)
            assert backends.last_choice(OP)[0] == "triton"
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
