"""Integration with PyTorch, for every module and op:
  - torch.compile(fullgraph=True) of every module (no graph break), forward and backward, equal to
    eager (CPU; the Triton-backed modules on CUDA, marked cuda);
  - torch.library.opcheck of every registered op (listed from the dispatcher: a new op without a
    case here fails test_opcheck_covers_every_op);
  - torch.autocast (CPU bf16; CUDA fp16/bf16): the dtypes of the reference module;
  - deterministic mode: bit-identical results across two runs with the same seed;
  - random ops: the same seed gives the same result; torch.Generator and torch.random.fork_rng
    are respected;
  - every module runs on the meta device (shape inference)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastnn
import fastnn.functional as F
import fastnn.nn as fnn
from fastnn import backends, reference as R
from fastnn.ops import drop_block as db_ops
from fastnn.ops import flash_attention as fa

HAS_EXT = fastnn._ext.EXT is not None
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = backends.triton_available() is None
INTERP = HAS_TRITON and backends.triton_interpreted()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastnn._C not built")
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setenv("FASTNN_FA_AUTOTUNE", "0")
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------- the modules

def _mha_call(m, x):
    return m(x, x, x, need_weights=False)[0]


# name -> (factory(device), input shape, forward(module, x), random?)
MODULES = {
    "ConvBNReLU2d": (lambda d: fnn.ConvBNReLU2d(3, 4, 3, padding=1).to(d), (2, 3, 6, 5), None, False),
    "ConvBN2d": (lambda d: fnn.ConvBN2d(3, 4, 3, stride=2, bias=True).to(d), (2, 3, 7, 6), None, False),
    "CBAM": (lambda d: fnn.CBAM(8, 4).to(d), (2, 8, 5, 6), None, False),
    "CBAM-timm": (lambda d: fnn.CBAM(8, 4, variant="timm").to(d), (2, 8, 5, 6), None, False),
    "CBAM-paper": (lambda d: fnn.CBAM(8, 4, variant="paper").to(d), (2, 8, 5, 6), None, False),
    "ChannelAttention": (lambda d: fnn.ChannelAttention(8, 4).to(d), (2, 8, 5, 6), None, False),
    "SpatialAttention": (lambda d: fnn.SpatialAttention(5).to(d), (2, 8, 5, 6), None, False),
    "StochasticPool2d": (lambda d: fnn.StochasticPool2d(3, 2, 1, mode="softmax").to(d), (2, 3, 7, 6), None, True),
    "DropBlock1d": (lambda d: fnn.DropBlock1d(0.3, 3).to(d), (2, 3, 11), None, True),
    "DropBlock2d": (lambda d: fnn.DropBlock2d(0.3, 3).to(d), (2, 3, 7, 6), None, True),
    "DropBlock3d": (lambda d: fnn.DropBlock3d(0.3, 2).to(d), (2, 3, 4, 5, 3), None, True),
    "LinearScheduler": (lambda d: fnn.LinearScheduler(fnn.DropBlock2d(0.0, 3), 0.0, 0.3, 3).to(d), (2, 3, 7, 6),
                        None, True),
    "MultiheadAttention": (lambda d: fnn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True).to(d), (2, 5, 16),
                           _mha_call, True),
}
# the modules whose CPU path runs fastnn's compiled kernels (the others are pure PyTorch on the CPU)
EXT_MODULES = {"ConvBNReLU2d", "ConvBN2d", "CBAM", "CBAM-timm", "CBAM-paper", "ChannelAttention", "SpatialAttention",
               "StochasticPool2d", "DropBlock1d", "DropBlock2d", "DropBlock3d", "LinearScheduler"}


def _module_params():
    out = []
    for name in MODULES:
        marks = [needs_ext] if name in EXT_MODULES else []
        out.append(pytest.param(name, "cpu", marks=marks, id=f"{name}-cpu"))
        out.append(pytest.param(name, "cuda", marks=[pytest.mark.cuda], id=f"{name}-cuda"))
    return out


def _run(name, m, x):
    fwd = MODULES[name][2]
    return fwd(m, x) if fwd else m(x)


def _input(name, device, dtype=torch.float32):
    shape = MODULES[name][1]
    x = torch.randn(shape, device=device, dtype=dtype)
    if name == "StochasticPool2d":
        x = x.abs()
    return x


def _step(name, m, x, seed):
    """Forward + backward from a seed: (output, input grad, parameter grads)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = _run(name, m, x)
    g = torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(seed), device=y.device, dtype=y.dtype)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * g).sum(), [x] + params, allow_unused=True)
    return y.detach(), grads


def _assert_same(a, b, exact, what):
    ya, ga = a
    yb, gb = b
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    assert check(ya, yb), f"{what}: outputs differ"
    for i, (u, v) in enumerate(zip(ga, gb)):
        assert (u is None) == (v is None), f"{what}: gradient {i} missing on one side"
        if u is not None:
            assert check(u, v), f"{what}: gradient {i} differs"


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("name,device", _module_params())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(name, device, train):
    """fullgraph=True: a graph break raises. aot_eager traces the fake kernels and the autograd
    formulas (what inductor sees) without compiling C++ for every case; inductor itself is
    test_compile_inductor_network. Random modules draw the same numbers compiled and eager."""
    torch.manual_seed(0)
    m = MODULES[name][0](device).train(train)
    m_eager = copy.deepcopy(m)
    x = _input(name, device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for step in range(2):  # the second call reuses the graph (and checks the buffers it updated)
        a = _step(name, compiled, x, seed=10 + step)
        b = _step(name, m_eager, x, seed=10 + step)
        _assert_same(a, b, exact=MODULES[name][3] and train, what=f"{name} step {step}")
    for (n, u), v in zip(m.named_buffers(), m_eager.buffers()):
        assert torch.allclose(u.double(), v.double(), rtol=1e-5, atol=1e-6), f"{name}: buffer {n}"


@needs_ext
def test_compile_inductor_network():
    """One small network of every CPU-kernel module under inductor (fullgraph), forward and backward,
    equal to eager; fallback_random makes inductor draw random numbers as eager does."""
    import torch._inductor.config as icfg

    torch.manual_seed(0)
    net = nn.Sequential(fnn.ConvBNReLU2d(3, 8, 3, padding=1), fnn.CBAM(8, 4), fnn.DropBlock2d(0.2, 3),
                        fnn.StochasticPool2d(2, mode="softmax"), fnn.ConvBN2d(8, 4, 1))
    eager = copy.deepcopy(net)
    x = torch.randn(2, 3, 9, 8)
    with icfg.patch(fallback_random=True):
        compiled = torch.compile(net, fullgraph=True)
        for train in (True, False):
            net.train(train)
            eager.train(train)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            torch.manual_seed(5)
            ya = compiled(xa)
            torch.manual_seed(5)
            yb = eager(xb)
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
            ya.sum().backward()
            yb.sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")


@pytest.mark.cuda
def test_compile_triton_attention_cuda():
    """The Triton-backed attention under inductor on CUDA (the CPU path is torch's SDPA)."""
    torch.manual_seed(0)
    m = fnn.MultiheadAttention(64, 4, batch_first=True).cuda().eval()
    x = torch.randn(2, 33, 64, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    a = _step("MultiheadAttention", compiled, x, 0)
    b = _step("MultiheadAttention", m, x, 0)
    _assert_same(a, b, exact=False, what="MHA compiled")
    assert backends.last_choice("flash_attention")[0] == "triton"


# ---------------------------------------------------------------- opcheck: every registered op

def _t(*shape, device="cpu", dtype=torch.float32, grad=False):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)


def _bn_args(d):
    x, w, b = _t(2, 3, 4, 5, device=d, grad=True), _t(3, device=d, grad=True), _t(3, device=d, grad=True)
    mean, var = _t(3, device=d), torch.rand(3, device=d) + 0.5
    g = _t(2, 3, 4, 5, device=d)
    return x, w, b, mean, var, g


def _cbam_args(d, backward=False):
    x = _t(2, 4, 5, 6, device=d, grad=True)
    w1, w2, cw = _t(2, 4, device=d, grad=True), _t(4, 2, device=d, grad=True), _t(1, 2, 3, 3, device=d, grad=True)
    fwd = (x, w1, None, w2, None, cw, None, None, None, None, None, False, False, 1e-5, True, True)
    if not backward:
        return fwd
    res = torch.ops.fastnn.cbam(*fwd)
    return (torch.randn_like(res[0]), x.detach(), w1.detach(), None, w2.detach(), None, cw.detach(), None, None,
            None, False, False, 1e-5, True, True, *res[1:], True)


def _pool_args(d, which, backward=False):
    x = _t(2, 4, 5, 6, device=d, grad=True)
    if not backward:
        return (x, True)
    pooled, sel = getattr(torch.ops.fastnn, which)(x.detach(), True)
    return (torch.randn_like(pooled), x.detach(), pooled, sel, True)


def _db_args(d, backend, kind):
    ops = db_ops._BACKEND_OPS[backend]
    x = _t(2, 3, 7, 6, device=d, grad=True)
    seed = torch.tensor([7], device=d)
    args = (x, seed, [3, 2], 0.2, False, False, False, True, False)
    if kind == "fwd":
        return args
    if kind == "fwd_":
        return (x.detach().clone(),) + args[1:]
    if kind == "seeds":
        return (x.detach(),) + args[1:6] + args[8:]
    _, mask, stats = ops.fwd(*args)
    return (_t(2, 3, 7, 6, device=d, grad=True), mask, stats, True, False)


def _fa_args(d, kind):
    q, k, v = _t(1, 19, 2, 16, device=d, grad=True), _t(1, 23, 1, 16, device=d, grad=True), \
        _t(1, 23, 1, 16, device=d, grad=True)
    if kind == "fwd":
        return (q, k, v, None, 0.0, 0.25, True, True)
    out, lse = torch.ops.fastnn.flash_attn_fwd(q.detach(), k.detach(), v.detach(), None, 0.0, 0.25, True, True)
    return (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse), None, 0.0,
            0.25, True, True)


def _sp_args(d, backward=False):
    x = torch.rand(2, 3, 7, 6, device=d).requires_grad_(True)
    a = ([3, 2], [2, 2], [1, 1], True, "activation", True)
    if not backward:  # the default generator: opcheck replays its state (a Generator object would advance)
        return (x,) + a + (None,)
    out, off = torch.ops.fastnn.stochastic_pool2d(x.detach(), *a)
    return (torch.randn_like(out), x.detach(), off) + a


# op name -> (sample args(device), "ext" (C++) or "triton")
OPCHECK = {
    "bn_relu_stats": (lambda d: (_bn_args(d)[0],), "ext"),
    "bn_relu_apply": (lambda d: (lambda x, w, b, m, v, g: (x, m, v, w, b, 1e-5, True))(*_bn_args(d)), "ext"),
    "bn_relu_train": (lambda d: (lambda x, w, b, m, v, g: (x, w, b, 1e-5, True))(*_bn_args(d)), "ext"),
    "bn_relu_backward": (lambda d: (lambda x, w, b, m, v, g: (g, x.detach(), m, v, w.detach(), b.detach(), 1e-5,
                                                               True))(*_bn_args(d)), "ext"),
    "bn_relu_backward_reduce": (lambda d: (lambda x, w, b, m, v, g: (g, x.detach(), m, v, w.detach(), b.detach(),
                                                                      1e-5, True))(*_bn_args(d)), "ext"),
    "bn_relu_backward_elemt": (lambda d: (lambda x, w, b, m, v, g: (g, x.detach(), m, v, w.detach(), b.detach(),
                                                                     torch.randn_like(m), torch.randn_like(m), 40.0,
                                                                     1e-5, True))(*_bn_args(d)), "ext"),
    "bn_relu_update_running": (lambda d: (lambda x, w, b, m, v, g: (m.clone(), v.clone(),
                                                                     torch.zeros((), dtype=torch.long, device=d),
                                                                     torch.randn_like(m), torch.rand_like(v), 40.0,
                                                                     0.1))(*_bn_args(d)), "ext"),
    "cbam": (lambda d: _cbam_args(d), "ext"),
    "cbam_backward": (lambda d: _cbam_args(d, backward=True), "ext"),
    "cbam_channel_pool": (lambda d: _pool_args(d, "cbam_channel_pool"), "ext"),
    "cbam_channel_pool_backward": (lambda d: _pool_args(d, "cbam_channel_pool", True), "ext"),
    "cbam_spatial_pool": (lambda d: _pool_args(d, "cbam_spatial_pool"), "ext"),
    "cbam_spatial_pool_backward": (lambda d: _pool_args(d, "cbam_spatial_pool", True), "ext"),
    "stochastic_pool2d": (lambda d: _sp_args(d), "ext"),
    "stochastic_pool2d_backward": (lambda d: _sp_args(d, True), "ext"),
    "drop_block_fwd": (lambda d: _db_args(d, "cpu", "fwd"), "ext"),
    "drop_block_fwd_": (lambda d: _db_args(d, "cpu", "fwd_"), "ext"),
    "drop_block_bwd": (lambda d: _db_args(d, "cpu", "bwd"), "ext"),
    "drop_block_seeds": (lambda d: _db_args(d, "cpu", "seeds"), "ext"),
    "drop_block_fwd_triton": (lambda d: _db_args(d, "triton", "fwd"), "triton"),
    "drop_block_fwd_triton_": (lambda d: _db_args(d, "triton", "fwd_"), "triton"),
    "drop_block_bwd_triton": (lambda d: _db_args(d, "triton", "bwd"), "triton"),
    "drop_block_seeds_triton": (lambda d: _db_args(d, "triton", "seeds"), "triton"),
    "flash_attn_fwd": (lambda d: _fa_args(d, "fwd"), "triton"),
    "flash_attn_bwd": (lambda d: _fa_args(d, "bwd"), "triton"),
}
EXEMPT = {"build_info": "no tensor arguments: a string list describing the build (test_foundation.py covers it)"}


def _register_lazy_ops():
    if HAS_TRITON:
        fa.register_ops()
        db_ops.register_triton_ops()


def registered_ops():
    _register_lazy_ops()
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastnn::"))


def test_opcheck_covers_every_op():
    ops = set(registered_ops())
    missing = ops - set(OPCHECK) - set(EXEMPT)
    assert not missing, f"ops without an opcheck case in tests/test_integration.py: {sorted(missing)}"
    if HAS_EXT and HAS_TRITON:  # everything listed here exists
        assert set(OPCHECK) | set(EXEMPT) == ops, sorted(set(OPCHECK) | set(EXEMPT) - ops)


def _opcheck_params():
    out = []
    for name, (_, kind) in OPCHECK.items():
        for dev in ("cpu", "cuda"):
            marks = [pytest.mark.cuda] if dev == "cuda" else []
            if kind == "ext":
                marks.append(needs_ext)
            elif dev == "cpu":
                marks.append(pytest.mark.skipif(not INTERP, reason="Triton on CPU tensors needs the interpreter"))
            if name.startswith("drop_block") and kind == "ext":
                marks.append(needs_ext)
                if dev == "cuda":  # CUDA tensors take the Triton ops (the *_triton cases)
                    marks.append(pytest.mark.skip(reason="the C++ DropBlock ops have a CPU kernel only"))
            out.append(pytest.param(name, dev, marks=marks, id=f"{name}-{dev}"))
    return out


@pytest.mark.parametrize("name,device", _opcheck_params())
def test_opcheck(name, device):
    _register_lazy_ops()
    make, kind = OPCHECK[name]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if kind == "triton" and device == "cpu":  # aot tracing of a Triton op needs a GPU (ENVIRONMENT.md)
        utils = utils[:3]
    torch.manual_seed(0)
    op = getattr(torch.ops.fastnn, name).default
    torch.library.opcheck(op, make(device), test_utils=utils)


# ---------------------------------------------------------------- autocast

def _reference_module(name, m):
    """The plain-PyTorch module fastnn's replaces (same parameters)."""
    if name in ("ConvBNReLU2d", "ConvBN2d"):
        layers = [copy.deepcopy(m.conv), copy.deepcopy(m.bn)] + ([nn.ReLU()] if name == "ConvBNReLU2d" else [])
        return nn.Sequential(*layers)
    if name in ("CBAM", "ChannelAttention", "SpatialAttention"):  # the tutorial modules (tests/test_cbam.py)
        from test_cbam import TutCBAM, TutChannelAttention, TutSpatialAttention
        r = {"CBAM": lambda: TutCBAM(8, 4, 7), "ChannelAttention": lambda: TutChannelAttention(8, 4),
             "SpatialAttention": lambda: TutSpatialAttention(5)}[name]()
        r.load_state_dict(m.state_dict())
        return r.to(next(m.parameters()).device)
    if name.startswith("CBAM"):  # timm / paper variants: fastnn's reference backend (PyTorch ops)
        r = copy.deepcopy(m)
        for mod in r.modules():
            if hasattr(mod, "backend"):
                mod.backend = "reference"
        return r
    if name == "MultiheadAttention":
        r = nn.MultiheadAttention(16, 2, dropout=0.0, batch_first=True).to(next(m.parameters()).device)
        r.load_state_dict(m.state_dict())
        return r
    raise KeyError(name)


AUTOCAST_MODULES = ["ConvBNReLU2d", "ConvBN2d", "CBAM", "CBAM-timm", "CBAM-paper", "ChannelAttention",
                    "SpatialAttention", "MultiheadAttention"]


def _autocast_params():
    out = []
    for name in AUTOCAST_MODULES:
        marks = [needs_ext] if name in EXT_MODULES else []
        out.append(pytest.param(name, "cpu", torch.bfloat16, marks=marks, id=f"{name}-cpu-bf16"))
        for dt in (torch.float16, torch.bfloat16):
            out.append(pytest.param(name, "cuda", dt, marks=[pytest.mark.cuda], id=f"{name}-cuda-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("name,device,dtype", _autocast_params())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_dtypes_match_reference(name, device, dtype, train):
    """Under autocast, output and gradient dtypes are the reference module's, and the values agree
    with it within the low-precision rule (2x the reference's own error against fp32, + 1 ulp)."""
    from helpers import assert_lowp_close
    torch.manual_seed(0)
    m = MODULES[name][0](device).train(train)
    if name == "MultiheadAttention":
        m.dropout = 0.0
    ref = _reference_module(name, m).train(train)
    x = _input(name, device)
    gout = torch.randn(_run(name, copy.deepcopy(ref).eval(), x).shape, device=device)  # BN outputs sum to a constant
    outs = {}
    for key, mod, cast in (("fastnn", m, True), ("ref", ref, True), ("ref32", copy.deepcopy(ref), False)):
        xx = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype, enabled=cast):
            y = _run(name, mod, xx)
        (y.float() * gout).sum().backward()
        outs[key] = (y, xx.grad, [p.grad for p in mod.parameters()])
    y, gx, gp = outs["fastnn"]
    yr, gxr, gpr = outs["ref"]
    y32, gx32, _ = outs["ref32"]
    assert y.dtype == yr.dtype, f"{name}: output dtype {y.dtype}, reference {yr.dtype}"
    assert gx.dtype == gxr.dtype
    for a, b in zip(gp, gpr):
        assert (a is None) == (b is None) and (a is None or a.dtype == b.dtype)
    if y.dtype == torch.float32 and yr.dtype == torch.float32:
        return
    eps = torch.finfo(dtype).eps
    assert_lowp_close(y.float(), y32.float(), yr.float(), atol=eps * y32.abs().max().item(), what=f"{name} output")
    assert_lowp_close(gx.float(), gx32.float(), gxr.float(), atol=eps * gx32.abs().max().item(), what=f"{name} grad")


# ---------------------------------------------------------------- deterministic mode

def _det_params():
    out = []
    for name in MODULES:
        marks = [needs_ext] if name in EXT_MODULES else []
        out.append(pytest.param(name, "cpu", marks=marks, id=f"{name}-cpu"))
        out.append(pytest.param(name, "cuda", marks=[pytest.mark.cuda], id=f"{name}-cuda"))
    return out


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("name,device", _det_params())
def test_deterministic_mode_bit_identical(name, device, deterministic):
    """With torch.use_deterministic_algorithms(True) no fastnn op raises (none needs to: the
    FlashAttention backward has no atomics, DropBlock's Triton count is an integer atomic, which
    is exact) and two runs from the same seed are bit-identical, forward and backward."""
    torch.manual_seed(0)
    m = MODULES[name][0](device).train()
    m2 = copy.deepcopy(m)
    x = _input(name, device)
    _assert_same(_step(name, m, x, 1), _step(name, m2, x, 1), exact=True, what=name)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="interpreter")),
                                    CUDA])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_deterministic_flash_attention_triton(device, dropout, deterministic):
    """The Triton FlashAttention, GQA and causal, forward and backward (through the lse too)."""
    def run():
        torch.manual_seed(0)
        q, k, v = _t(2, 37, 4, 32, device=device, grad=True), _t(2, 45, 2, 32, device=device, grad=True), \
            _t(2, 45, 2, 32, device=device, grad=True)
        torch.manual_seed(1)
        out, lse = F.flash_attn_func(q, k, v, dropout_p=dropout, causal=True, return_lse=True, backend="triton")
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        return out.detach(), grads
    _assert_same(run(), run(), exact=True, what="flash_attn_func triton")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="interpreter")),
                                    CUDA])
def test_deterministic_drop_block_triton(device, deterministic):
    x = torch.randn(3, 5, 33, 17, device=device)
    outs = [F.drop_block2d(x, 0.2, 5, generator=torch.Generator(device=device).manual_seed(4), backend="triton")
            for _ in range(2)]
    assert torch.equal(*outs)


# ---------------------------------------------------------------- random ops: seeds, generators, fork_rng

def _random_calls(device):
    """name -> f(generator or None) for every random op; generator None means torch's default."""
    kernels = "cuda" if device == "cuda" else "cpu"
    db_backend = "triton" if device == "cuda" else "cpu"
    ones2, ones3 = torch.ones(2, 3, 9, 8, device=device), torch.ones(1, 2, 4, 5, 6, device=device)
    xa, xs = torch.rand(2, 3, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device)
    calls = {
        "drop_block2d": lambda g: F.drop_block2d(ones2, 0.3, 3, generator=g, backend=db_backend),
        "drop_block3d-noise": lambda g: F.drop_block3d(ones3, 0.3, 2, with_noise=True, generator=g,
                                                        backend=db_backend),
        "stochastic_pool2d": lambda g: F.stochastic_pool2d(xa, 2, generator=g, backend=kernels),
        "stochastic_pool2d-softmax": lambda g: F.stochastic_pool2d(xs, 3, 2, 1, mode="softmax", generator=g,
                                                                   backend=kernels),
    }
    if device == "cpu" and INTERP:
        calls["drop_block2d-triton"] = lambda g: F.drop_block2d(ones2, 0.3, 3, generator=g, backend="triton")
    return calls


def _attention_calls(device):
    """Attention dropout: no generator argument (flash-attn's and torch's APIs have none); it draws
    from torch's default generator."""
    q = torch.randn(1, 33, 2, 16, device=device)
    calls = {"flash_attn_func-reference": lambda: F.flash_attn_func(q, q, q, dropout_p=0.3, backend="reference")}
    if device == "cuda" or INTERP:
        calls["flash_attn_func-triton"] = lambda: F.flash_attn_func(q, q, q, dropout_p=0.3, backend="triton")
    mha = fnn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True).to(device).train()
    x = torch.ones(2, 5, 16, device=device)
    calls["MultiheadAttention"] = lambda: mha(x, x, x, need_weights=False)[0]
    return calls


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_ext), CUDA])
def test_random_ops_seed_generator_fork_rng(device):
    for name, f in _random_calls(device).items():
        gen = lambda s: torch.Generator(device=device).manual_seed(s)  # noqa: E731
        a, b, c = f(gen(1)), f(gen(1)), f(gen(2))
        assert torch.equal(a, b), f"{name}: same generator seed, different results"
        assert not torch.equal(a, c), f"{name}: different seeds, same result"
        # a generator makes the result independent of the global state, and advances only itself
        torch.manual_seed(0)
        before = torch.random.get_rng_state()
        d = f(gen(1))
        assert torch.equal(a, d) and torch.equal(before, torch.random.get_rng_state()), name
        g = gen(1)
        f(g)
        assert not torch.equal(f(g), a), f"{name}: the generator's state did not advance"
        # the default generator: torch.manual_seed reproduces, and fork_rng restores it
        torch.manual_seed(5)
        e = f(None)
        torch.manual_seed(5)
        assert torch.equal(f(None), e), f"{name}: torch.manual_seed does not reproduce"
        _check_fork_rng(device, lambda: f(None), name)
    for name, f in _attention_calls(device).items():
        torch.manual_seed(5)
        e = f()
        torch.manual_seed(5)
        assert torch.equal(f(), e), f"{name}: torch.manual_seed does not reproduce"
        torch.manual_seed(6)
        assert not torch.equal(f(), e), f"{name}: dropout ignores the seed"
        _check_fork_rng(device, f, name)


def _check_fork_rng(device, f, name):
    devices = [torch.device(device).index or 0] if device == "cuda" else []
    torch.manual_seed(7)
    f()
    after_one = f()  # the second draw from seed 7
    torch.manual_seed(7)
    f()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(99)
        f()  # draws inside the fork do not disturb the outer stream
    assert torch.equal(f(), after_one), f"{name}: fork_rng did not restore the generator state"


# ---------------------------------------------------------------- meta device

@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_modules_on_meta_device(name, train):
    """Shape inference: every module runs on meta tensors (a model built on the meta device)."""
    m = MODULES[name][0]("cpu").to("meta").train(train)
    x = torch.empty(MODULES[name][1], device="meta")
    y = _run(name, m, x)
    assert y.device.type == "meta"
    want = _run(name, MODULES[name][0]("cpu").train(False), _input(name, "cpu")).shape if HAS_EXT or \
        name not in EXT_MODULES else y.shape
    assert y.shape == want
