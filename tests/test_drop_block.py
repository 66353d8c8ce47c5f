"""DropBlock: exactness against the reference given the same seed mask, the distribution
(seed rate, dropped fraction, E[out]), block structure, backward, no-op and in-place paths,
layouts, dtypes, opcheck, torch.compile, modules and the scheduler.

The Triton kernels run on CPU tensors through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU), so their cases use small shapes."""
import math

import pytest
import torch
from helpers import DEVICES, HAS_CUDA, noncontig

import fastnn
import fastnn.functional as F
from fastnn import backends
from fastnn import reference as R
from fastnn.ops import drop_block as ops

ops.register_triton_ops()  # defined on first use (not at import); the tests below reach into _BACKEND_OPS
CPU_BACKENDS = [b for b in ("cpu", "triton", "reference") if backends.unavailable(b, "cpu") is None]
KERNELS = [b for b in ("cpu", "triton") if b in CPU_BACKENDS]
FN = {1: F.drop_block1d, 2: F.drop_block2d, 3: F.drop_block3d}


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def seeds_and_out(x, backend, seed=0, drop_prob=0.3, block_size=3, **kw):
    """The seed mask and the output of one call, drawn from the same generator state."""
    nd = x.dim() - 2
    mask_kw = {k: v for k, v in kw.items() if k in ("gamma_scale", "couple_channels", "valid_only")}
    s = F.drop_block_seed_mask(x, drop_prob, block_size, generator=_gen(seed, x.device), backend=backend, **mask_kw)
    out = FN[nd](x, drop_prob, block_size, generator=_gen(seed, x.device), backend=backend, **kw)
    return s, out


def block_of(x, block_size):
    nd = x.dim() - 2
    bs = (block_size,) * nd if isinstance(block_size, int) else block_size
    return R.drop_block_clip(bs, x.shape[2:])


def window_any(m, lo, hi):
    """out[i] = any(m[i + e] for e in [lo[a], hi[a]]) per spatial axis a (out of range: False).
    Written with shifted slices, independent of the max-pool in fastnn.reference."""
    out = m
    for a in range(m.dim() - 2):
        ax = a + 2
        acc = torch.zeros_like(out)
        n = out.shape[ax]
        for e in range(lo[a], hi[a] + 1):
            src0, src1 = max(0, e), min(n, n + e)
            if src1 <= src0:
                continue
            dst = acc.narrow(ax, src0 - e, src1 - src0)
            dst |= out.narrow(ax, src0, src1 - src0)
        out = acc
    return out


def expected_drop_prob(spatial, block, gamma, valid_only):
    """P(unit dropped) per spatial position: 1 - (1 - gamma)^(#seed positions whose block covers it)."""
    cover = None
    for size, k in zip(spatial, block):
        lo, hi = (k // 2, size - 1 - (k - 1) // 2) if valid_only else (0, size - 1)
        i = torch.arange(size)
        # unit i is covered by seeds s in [i - (k-1)//2, i + k//2] within [lo, hi]
        c = (torch.minimum(i + k // 2, torch.tensor(hi)) - torch.maximum(i - (k - 1) // 2, torch.tensor(lo)) + 1)
        c = c.clamp(min=0).double()
        cover = c if cover is None else cover[..., None] * c
    return 1 - (1 - gamma) ** cover


# ---------------------------------------------------------------- reference vs timm

@pytest.mark.parametrize("shape,block", [((2, 3, 9, 11), 4), ((2, 4, 8, 8), 3), ((1, 2, 5, 6), 7), ((3, 2, 14, 9), 2),
                                         ((2, 3, 7, 7), 7)])
@pytest.mark.parametrize("couple", [True, False])
def test_reference_is_timm(shape, block, couple):
    drop = pytest.importorskip("timm.layers.drop")
    x = torch.randn(shape)
    for s in range(3):
        torch.manual_seed(s)
        a = drop.drop_block_2d(x, 0.3, block, couple_channels=couple)
        torch.manual_seed(s)
        b = R.drop_block(x, 0.3, block, couple_channels=couple)
        assert torch.equal(a, b)
    torch.manual_seed(7)
    a = drop.drop_block_2d(x, 0.3, block, with_noise=True, couple_channels=couple)
    torch.manual_seed(7)
    b = R.drop_block(x, 0.3, block, with_noise=True, couple_channels=couple)
    assert torch.equal(a, b)


def test_reference_timm_offsets_even_block():
    # a seed at (s, t) drops rows [s - k//2, s + (k-1)//2]: timm's even-size convention
    seeds = torch.zeros(1, 1, 8, 9)
    seeds[0, 0, 4, 5] = 1
    m = R.drop_block_dilate(seeds, (4, 2))
    exp = torch.zeros(1, 1, 8, 9)
    exp[0, 0, 2:6, 4:6] = 1
    assert torch.equal(m, exp)


# ---------------------------------------------------------------- exactness given the seed mask

CASES = [
    # shape, block, drop_prob
    ((2, 3, 9, 13), 3, 0.3),
    ((2, 3, 9, 13), (4, 2), 0.3),       # even sizes, per-axis
    ((1, 4, 5, 17), 7, 0.3),            # block > H (clipped per axis)
    ((2, 2, 8, 8), 5, 1.0),             # dense: the CPU's separable path
    ((1, 2, 6, 6), 6, 1.0),             # gamma = 1: every position is a seed
    ((1, 2, 3, 70), (2, 70), 0.5),      # W-reach > 32 words: Triton's far path
    ((2, 3, 4, 40), (3, 9), 0.4),       # rows of two 32-bit words
    ((2, 19, 5, 6), 3, 0.3),            # channels-last with C % 8 != 0
    ((1, 3, 5, 100), (3, 5), 0.4),      # contiguous rows wider than 64: Triton's word kernel
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,block,p", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("couple,valid_only", [(False, False), (True, False), (False, True)])
def test_exact_given_seeds_2d(backend, shape, block, p, layout, couple, valid_only):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    s, out = seeds_and_out(x, backend, seed=3, drop_prob=p, block_size=block, couple_channels=couple,
                           valid_only=valid_only)
    assert s.dtype == torch.uint8 and s.shape == (shape[0], 1 if couple else shape[1]) + shape[2:]
    ref = R.drop_block_from_seeds(x, s.to(x.dtype), block_of(x, block))
    assert torch.equal(out, ref)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nd,shape,block", [(1, (2, 3, 29), 4), (1, (3, 5, 9), 9), (1, (2, 3, 100), 7),
                                            (3, (2, 3, 5, 6, 7), 3),
                                            (3, (1, 2, 4, 9, 5), (2, 4, 3))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("couple,valid_only", [(False, False), (True, True)])
def test_exact_given_seeds_1d_3d(backend, nd, shape, block, layout, couple, valid_only):
    x = torch.randn(shape)
    if layout == "channels_last":  # (N, C, *sp) stored as (N, *sp, C)
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    s, out = seeds_and_out(x, backend, seed=5, drop_prob=0.4, block_size=block, couple_channels=couple,
                           valid_only=valid_only)
    ref = R.drop_block_from_seeds(x, s.to(x.dtype), block_of(x, block))
    assert torch.equal(out, ref)
    assert out.stride() == x.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_exact_given_seeds_dtypes(backend, dtype):
    x = torch.randn(2, 5, 11, 10, dtype=dtype)
    s, out = seeds_and_out(x, backend, seed=1, drop_prob=0.3, block_size=4)
    assert out.dtype == dtype
    # kernels and reference both scale in float32 (float64 for float64) and round once
    assert torch.equal(out, R.drop_block_from_seeds(x, s.to(dtype), block_of(x, 4)))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("couple", [False, True])
def test_backward_exact(backend, layout, couple):
    x = torch.randn(2, 6, 9, 12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":
        x = noncontig(x)
    x.requires_grad_(True)
    s, out = seeds_and_out(x, backend, seed=2, drop_prob=0.3, block_size=(3, 4), couple_channels=couple)
    gout = torch.randn_like(out)  # contiguous, whatever the forward's layout
    (gx,) = torch.autograd.grad(out, x, gout)
    assert torch.equal(gx, R.drop_block_from_seeds(gout, s.float(), (3, 4)))
    assert torch.equal(out.detach(), R.drop_block_from_seeds(x.detach(), s.float(), (3, 4)))


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_saves_bits_not_floats(backend):
    """The backward keeps the mask at ~1 bit per unit (uint8 packed) plus an int64 count."""
    x = torch.randn(2, 4, 14, 14, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = F.drop_block2d(x, 0.2, 5, generator=_gen(0), backend=backend)
    assert saved, "nothing saved"
    assert all(t.dtype in (torch.uint8, torch.int64) for t in saved), [t.dtype for t in saved]
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    assert nbytes <= 2 * 4 * 14 * 2 + 16  # rows of 14 units: 2 bytes each, + (dropped, units)
    y.sum().backward()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("couple,noise", [(False, False), (True, False), (False, True)])
def test_gradcheck(backend, couple, noise):
    # Triton runs interpreted here: a smaller input and fast_mode (random projections) keep it
    # to seconds; the full Jacobian is checked for the CPU kernel and for Triton on the GPU.
    interp = backend == "triton" and backends.triton_interpreted()
    x = torch.randn((1, 2, 5, 6) if interp else (2, 3, 6, 7), dtype=torch.float64, requires_grad=True)

    def f(t):
        return F.drop_block2d(t, 0.4, 3, couple_channels=couple, with_noise=noise, generator=_gen(11),
                              backend=backend)

    assert (f(x.detach()) != x.detach()).any()  # something is dropped
    assert torch.autograd.gradcheck(f, (x,), fast_mode=interp)
    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=interp)


# ---------------------------------------------------------------- distribution

def _draws(backend, x, n, **kw):
    nd = x.dim() - 2
    return [FN[nd](x, generator=_gen(1000 + i), backend=backend, **kw) for i in range(n)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("valid_only", [False, True])
@pytest.mark.parametrize("shape,block,p", [((4, 16, 14, 12), (5, 4), 0.3),    # gamma 0.028: Triton's sparse path
                                           ((4, 16, 9, 40), (3, 2), 0.9),     # gamma 0.18: its per-position path
                                           ((2, 8, 3, 70), (1, 66), 0.2)])    # seeds in 3 words per row
def test_seed_rate(backend, valid_only, shape, block, p):
    """Seeds are Bernoulli(gamma) on the seed grid, and absent elsewhere."""
    x = torch.zeros(shape)
    gamma = R.drop_block_gamma(p, 1.0, shape[2:], block)
    n = 3 if backend == "triton" else 10
    s = torch.stack([F.drop_block_seed_mask(x, p, block, valid_only=valid_only, generator=_gen(i), backend=backend)
                     for i in range(n)]).double()
    if valid_only:
        inside = torch.zeros(shape[2:], dtype=torch.bool)
        inside[block[0] // 2: shape[2] - (block[0] - 1) // 2, block[1] // 2: shape[3] - (block[1] - 1) // 2] = True
        assert s[..., ~inside].sum() == 0
        s = s[..., inside]
    m = s.numel()
    z = (s.mean().item() - gamma) / math.sqrt(gamma * (1 - gamma) / m)
    assert abs(z) < 5, f"seed rate {s.mean().item():.5f} vs gamma {gamma:.5f} (z = {z:.1f})"
    # and uniform over positions: no bit of a word (position along W mod 32) is favoured
    per_col = s.mean(dim=tuple(range(s.dim() - 1)))
    zc = (per_col - gamma) / math.sqrt(gamma * (1 - gamma) / (m / per_col.numel()))
    assert zc.abs().max() < 5, f"max |z| over columns {zc.abs().max():.1f}"
    # independent draws: two different generator states give different masks
    assert not torch.equal(s[0], s[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block,p,couple,valid_only", [(5, 0.2, False, False), ((3, 6), 0.3, False, True),
                                                       (4, 0.25, True, False), (14, 0.5, False, False)])
def test_dropped_fraction(backend, block, p, couple, valid_only):
    """Mean dropped fraction = the exact per-position drop probability, within 5 sigma."""
    shape = (4, 16, 14, 14) if backend == "triton" else (16, 32, 14, 14)
    n = 4 if backend == "triton" else 8
    x = torch.ones(shape)
    outs = _draws(backend, x, n, drop_prob=p, block_size=block, couple_channels=couple, valid_only=valid_only)
    bl = block_of(x, block)
    gamma = R.drop_block_gamma(p, 1.0, shape[2:], bl)
    q = expected_drop_prob(shape[2:], bl, gamma, valid_only)
    # one independent sample per seed plane: its dropped fraction
    frac = torch.stack([(o[:, :1] if couple else o).eq(0).double().mean(dim=(-2, -1)).reshape(-1)
                        for o in outs]).reshape(-1)
    mean, se = frac.mean().item(), frac.std().item() / math.sqrt(frac.numel())
    exp = q.mean().item()
    assert abs(mean - exp) < 5 * se + 1e-9, f"dropped {mean:.4f} +- {se:.4f}, expected {exp:.4f}"
    if couple:
        for o in outs:
            assert torch.equal(o == 0, (o[:, :1] == 0).expand_as(o))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("block", [1, 3])
def test_expectation(backend, block):
    """E[out] = x * E[keep * units / kept]: exactly x for block 1 (dropout); with blocks the
    border units are dropped less often, so E[out] = x * (1 - q_i) / (1 - mean(q))."""
    if backend not in CPU_BACKENDS:
        pytest.skip("backend unavailable")
    shape, p, n = (8, 64, 9, 10), 0.3, 60
    x = torch.rand(shape[1:]).add_(0.5).expand(shape).contiguous()
    outs = torch.stack(_draws(backend, x, n, drop_prob=p, block_size=block))
    per_pos = outs.mean(dim=(0, 1))  # average over draws and over the batch: [C, H, W]
    bl = block_of(x, block)
    q = expected_drop_prob(shape[2:], bl, R.drop_block_gamma(p, 1.0, shape[2:], bl), False).float()
    factor = (1 - q) / (1 - q.mean())
    if block == 1:
        assert torch.allclose(factor, torch.ones_like(factor))
    exp = x[0] * factor
    # each element of per_pos averages n * N draws of x * keep * ~1/(1 - q): sd known
    sd = x[0] / (1 - q.mean()) * torch.sqrt(q * (1 - q) / (n * shape[0]))
    z = (per_pos - exp) / sd
    assert z.abs().max() < 6, f"max |z| = {z.abs().max():.2f}"
    assert (z ** 2).mean() < 1.3, f"mean z^2 = {(z ** 2).mean():.2f}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,block,couple,valid_only", [((3, 4, 13, 11), (4, 3), False, False),
                                                            ((2, 5, 9, 9), 5, True, True),
                                                            ((2, 3, 6, 7, 8), (3, 2, 4), False, False)])
def test_dropped_regions_are_blocks(backend, shape, block, couple, valid_only):
    """The zero pattern is exactly a union of (clipped) k-windows around seed positions."""
    x = torch.rand(shape) + 0.5
    nd = len(shape) - 2
    out = FN[nd](x, 0.5, block, couple_channels=couple, valid_only=valid_only, generator=_gen(4), backend=backend)
    z = out == 0
    assert z.any() and not z.all()
    bl = block_of(x, block)
    # seed s's block covers units [s - k//2, s + (k-1)//2]
    full = ~window_any(~z, [-(k // 2) for k in bl], [(k - 1) // 2 for k in bl])  # blocks wholly dropped
    rebuilt = window_any(full, [-((k - 1) // 2) for k in bl], [k // 2 for k in bl])
    assert torch.equal(rebuilt, z)
    kept = ~z
    s = out[kept] / x[kept]
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-6, atol=0)  # one scale for all kept units


# ---------------------------------------------------------------- semantics

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noop_paths_return_input(backend):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert F.drop_block2d(x, 0.3, 3, training=False, backend=backend) is x
    assert F.drop_block2d(x, 0.0, 3, backend=backend) is x
    x1 = x[:, :, 0]
    assert F.drop_block1d(x1, 0.0, 3, backend=backend) is x1
    e = torch.empty(0, 3, 8, 8)
    assert F.drop_block2d(e, 0.3, 3, backend=backend) is e
    m = fastnn.nn.DropBlock2d(0.3, 3).eval()
    assert m(x) is x
    m = fastnn.nn.DropBlock2d(0.0, 3).train()
    assert m(x) is x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_inplace(backend, layout):
    x0 = torch.randn(2, 4, 9, 10)
    x = x0.clone()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":
        x = noncontig(x)
    ref = F.drop_block2d(x.clone(), 0.3, 3, generator=_gen(8), backend=backend)
    y = F.drop_block2d(x, 0.3, 3, inplace=True, generator=_gen(8), backend=backend)
    assert y is x
    assert torch.equal(x, ref)
    assert not torch.equal(x, x0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_autograd(backend):
    leaf = torch.randn(2, 4, 9, 10, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        F.drop_block2d(leaf, 0.3, 3, inplace=True, backend=backend)
    h = leaf * 2
    ref = F.drop_block2d(leaf.detach() * 2, 0.3, 3, generator=_gen(9), backend=backend)
    y = F.drop_block2d(h, 0.3, 3, inplace=True, generator=_gen(9), backend=backend)
    assert y is h and torch.equal(h.detach(), ref)
    y.sum().backward()
    # grad of sum(drop(2 * leaf)) is 2 * keep * scale
    s = (ref[ref != 0] / (2 * leaf.detach())[ref != 0])[0]
    assert torch.allclose(leaf.grad, 2 * (ref != 0).float() * s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontig"])
def test_inplace_on_a_tensor_saved_for_backward_raises(backend, layout):
    """x saved by another op (w * x keeps x for w's gradient) and then dropped in place: autograd must
    raise as for x.mul_(), not compute w's gradient from the overwritten x."""
    w = torch.randn(2, 4, 9, 10, requires_grad=True)
    x = torch.randn(2, 4, 9, 10) + 3
    if layout == "noncontig":
        x = noncontig(x)
    y = w * x
    F.drop_block2d(x, 0.3, 3, inplace=True, generator=_gen(10), backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_inference_tensor(backend):
    with torch.inference_mode():
        x = torch.randn(2, 4, 9, 10)
        x0 = x.clone()
        assert F.drop_block2d(x, 0.3, 3, inplace=True, backend=backend) is x  # allowed inside inference mode
        assert not torch.equal(x, x0)
    with pytest.raises(RuntimeError, match="inference tensor"):  # as x.mul_() outside inference mode
        F.drop_block2d(x, 0.3, 3, inplace=True, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eager_fast_path_equals_registered_op(backend, layout, monkeypatch):
    """Eager calls run the kernels through _DropBlockFn (below the autograd key); torch.compile and
    torch.func run the torch.library op. Same seeds -> the same output, gradient and double backward."""
    x0 = torch.randn(2, 5, 9, 10)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    gy0 = torch.randn(2, 5, 9, 10)
    got = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ops, "_eager_ok", lambda t: False)
        x = x0.clone().requires_grad_()
        y = F.drop_block2d(x, 0.3, 3, generator=_gen(11), backend=backend)
        assert (type(y.grad_fn).__name__ == "_DropBlockFnBackward") == fast
        gy = gy0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
        (ggy,) = torch.autograd.grad((gx * gx).sum(), gy)
        with torch.no_grad():
            y_ng = F.drop_block2d(x0, 0.3, 3, generator=_gen(11), backend=backend)
        got[fast] = (y.detach(), gx.detach(), ggy, y_ng)
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)
    y, gx, ggy, _ = got[True]
    keep = y != 0
    assert keep.any() and not keep.all()
    assert torch.equal(gx != 0, keep)  # the gradient goes where the output was kept
    assert torch.allclose(ggy, 2 * gx * (gx / gy0), rtol=1e-5, atol=1e-6)  # d/dgy sum((k*gy)^2) = 2 k^2 gy


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_with_noise(backend):
    x = torch.randn(8, 16, 12, 12)
    s, out = seeds_and_out(x, backend, seed=4, drop_prob=0.4, block_size=3, with_noise=True)
    dropped = R.drop_block_dilate(s.float(), (3, 3)).bool().expand_as(x)
    assert torch.equal(out[~dropped], x[~dropped])  # kept units: unscaled
    z = out[dropped].double()
    assert z.numel() > 2000
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    # reproducible from the generator
    out2 = F.drop_block2d(x, 0.4, 3, with_noise=True, generator=_gen(4), backend=backend)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_by_keep_false_and_gamma_scale(backend):
    x = torch.randn(2, 4, 10, 10)
    s, out = seeds_and_out(x, backend, seed=6, drop_prob=0.3, block_size=3, scale_by_keep=False, gamma_scale=0.5)
    assert torch.equal(out, R.drop_block_from_seeds(x, s.float(), (3, 3), scale_by_keep=False))
    gamma = R.drop_block_gamma(0.3, 0.5, (10, 10), (3, 3))
    assert gamma == pytest.approx(0.5 * 0.3 * 100 / 9 / 64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gamma_above_one_seeds_everywhere(backend):
    # gamma_scale > 1 can push timm's formula past 1: every position is a seed, on every backend (the reference
    # raised from bernoulli_)
    assert R.drop_block_gamma(1.0, 10.0, (8, 8), (3, 3)) == 1.0
    x = torch.randn(2, 3, 8, 8)
    out = F.drop_block2d(x, 1.0, 3, gamma_scale=10.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reproducible_under_manual_seed(backend):
    x = torch.randn(2, 4, 10, 10)
    torch.manual_seed(123)
    a = F.drop_block2d(x, 0.3, 3, backend=backend)
    b = F.drop_block2d(x, 0.3, 3, backend=backend)
    torch.manual_seed(123)
    c = F.drop_block2d(x, 0.3, 3, backend=backend)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_cpu_mask_independent_of_layout_and_threads():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    x = torch.randn(3, 12, 11, 10)
    a = F.drop_block2d(x, 0.3, 4, generator=_gen(1), backend="cpu")
    b = F.drop_block2d(x.contiguous(memory_format=torch.channels_last), 0.3, 4, generator=_gen(1), backend="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = F.drop_block2d(x, 0.3, 4, generator=_gen(1), backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("bad,kw,exc,match", [
    ("ndim", {}, ValueError, "input must be"),
    ("dtype", {}, TypeError, "float16, bfloat16"),
    (None, {"drop_prob": 1.5}, ValueError, "drop_prob"),
    (None, {"drop_prob": -0.1}, ValueError, "drop_prob"),
    (None, {"block_size": 0}, ValueError, "block_size"),
    (None, {"block_size": (3, 3, 3)}, ValueError, "block_size"),
    (None, {"block_size": 2.5}, ValueError, "block_size"),
    (None, {"gamma_scale": -1.0}, ValueError, "gamma_scale"),
    (None, {"gamma_scale": float("nan")}, ValueError, "gamma_scale"),
    (None, {"generator": 3}, TypeError, "generator"),
])
def test_bad_arguments(bad, kw, exc, match):
    x = torch.randn(2, 3, 8, 8)
    if bad == "ndim":
        x = torch.randn(2, 3, 8)
    elif bad == "dtype":
        x = torch.ones(2, 3, 8, 8, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        F.drop_block2d(x, **kw)


def test_bad_backend_and_module_args():
    with pytest.raises(ValueError, match="unknown backend"):
        F.drop_block2d(torch.randn(1, 1, 4, 4), backend="nope")
    with pytest.raises(ValueError, match="drop_prob"):
        fastnn.nn.DropBlock2d(drop_prob=2)
    with pytest.raises(ValueError, match="block_size"):
        fastnn.nn.DropBlock3d(block_size=(1, 2))
    if "cpu" in CPU_BACKENDS:  # the C++ boundary checks too
        x = torch.randn(1, 2, 4, 4)
        with pytest.raises(ValueError, match="block"):
            torch.ops.fastnn.drop_block_fwd(x, torch.tensor([1]), [5, 1], 0.1, False, False, False, True, False)
        with pytest.raises(ValueError, match="dense"):
            torch.ops.fastnn.drop_block_fwd(x.transpose(2, 3), torch.tensor([1]), [2, 2], 0.1, False, False, False,
                                            True, False)


# ---------------------------------------------------------------- opcheck and compile

def _sample_args(x, channels_last=False, couple=False, valid_only=False, noise=False):
    return (x, torch.tensor([77], device=x.device), [3, 2], 0.2, couple, valid_only, noise, True, channels_last)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("variant", ["plain", "channels_last", "coupled_noise"])
def test_opcheck(backend, variant):
    ops_ = ops._BACKEND_OPS[backend]
    x = torch.randn(2, 5, 7, 9, requires_grad=True)
    kw = {}
    if variant == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        kw["channels_last"] = True
    if variant == "coupled_noise":
        kw.update(couple=True, noise=True)
    # Triton under the interpreter cannot be traced by aot (see ENVIRONMENT.md): CUDA covers it
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if backend == "triton" and not \
        x.is_cuda else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    args = _sample_args(x, **kw)
    torch.library.opcheck(ops_.fwd, args, test_utils=utils)
    torch.library.opcheck(ops_.fwd_, (x.detach().clone(),) + args[1:], test_utils=utils)
    torch.library.opcheck(ops_.seeds, (x.detach(),) + args[1:6] + args[8:], test_utils=utils)
    _, mask, stats = ops_.fwd(*args)
    g = torch.randn_like(x).requires_grad_(True)
    if kw.get("channels_last"):
        g = g.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(ops_.bwd, (g, mask, stats, True, bool(kw.get("channels_last"))), test_utils=utils)


def test_compile_cpu_aot_eager_matches_eager():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    m = fastnn.nn.DropBlock2d(0.3, 3)
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    f = torch.compile(lambda t: m(t) * 2, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    a = f(x)
    torch.manual_seed(5)
    b = m(x) * 2
    assert torch.equal(a, b)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("grad", [False, True])
def test_compile_cpu_inplace_fullgraph(grad):
    """inplace=True traces in one graph (the eager-only checks must not reach Dynamo) and matches eager."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    m = fastnn.nn.DropBlock2d(0.3, 3, inplace=True)
    x0 = torch.randn(2, 4, 9, 10)

    def run(fn):
        x = x0.clone().requires_grad_(grad)
        torch.manual_seed(6)
        y = fn(x * 1 if grad else x)
        g = torch.autograd.grad(y.sum(), x)[0] if grad else None
        return y.detach(), g

    f = torch.compile(lambda t: m(t) * 2, backend="aot_eager", fullgraph=True)
    (a, ga), (b, gb) = run(f), run(lambda t: m(t) * 2)
    assert torch.equal(a, b) and not torch.equal(a, x0 * 2)
    if grad:
        assert torch.equal(ga, gb)


def test_compile_cpu_inductor():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")

    def f(t):
        return F.drop_block2d(t.relu() + 1, 0.3, (3, 4), backend="cpu") * 3

    x = torch.randn(2, 6, 10, 11, requires_grad=True)
    cf = torch.compile(f, fullgraph=True)
    y = cf(x)
    base = (x.detach().relu() + 1) * 3
    z = y.detach() == 0
    assert z.any() and not z.all()
    s = (y.detach()[~z] / base[~z])
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-6)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.where(~z & (x.detach() > 0), 3 * s[0], torch.zeros_like(g)), rtol=1e-6)


@pytest.mark.skipif(backends.triton_available() is not None, reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    """Every Triton launch compiles to a cubin for sm_90 without a GPU (CI has none): catches
    what the interpreter cannot, e.g. type errors in lowering."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from fastnn.triton_kernels.drop_block import compile_check\n"
            "f = compile_check(90)\n"
            "print('\\n'.join(map(str, f)) or 'ALL COMPILED')\n")
    from helpers import fastnn_home
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=fastnn_home())
    assert r.returncode == 0 and "ALL COMPILED" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


# ---------------------------------------------------------------- modules

def test_modules_and_from_timm():
    drop = pytest.importorskip("timm.layers.drop")
    t = drop.DropBlock2d(drop_prob=0.2, block_size=5)
    m = fastnn.nn.DropBlock2d.from_module(t)
    assert m.couple_channels is True and m.drop_prob == 0.2 and m.block_size == 5
    x = torch.randn(2, 3, 12, 12)
    with fastnn.use_backend(drop_block="reference"):
        torch.manual_seed(1)
        a = m(x)
    torch.manual_seed(1)
    b = t(x)
    assert torch.equal(a, b)
    assert "drop_prob=0.2" in repr(m) and "couple_channels=True" in repr(m)
    with pytest.raises(TypeError, match="timm DropBlock2d"):
        fastnn.nn.DropBlock2d.from_module(torch.nn.ReLU())


@pytest.mark.parametrize("cls,shape", [(fastnn.nn.DropBlock1d, (2, 3, 20)), (fastnn.nn.DropBlock2d, (2, 3, 9, 9)),
                                       (fastnn.nn.DropBlock3d, (2, 3, 5, 6, 7))])
def test_module_shapes(cls, shape):
    m = cls(0.3, 3)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and (y == 0).any()
    y.sum().backward()
    with pytest.raises(ValueError, match="input must be"):
        m(torch.randn(2, 3))


def test_linear_scheduler():
    db = fastnn.nn.DropBlock2d(0.5, 3)
    sch = fastnn.nn.LinearScheduler(db, start_value=0.0, stop_value=0.2, nr_steps=5)
    assert db.drop_prob == 0.0
    seen = []
    for _ in range(6):
        sch.step()
        seen.append(db.drop_prob)
    assert seen == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    x = torch.randn(1, 2, 8, 8)
    assert sch(x).shape == x.shape
    state = sch.state_dict()
    db2 = fastnn.nn.DropBlock2d(0.5, 3)
    sch2 = fastnn.nn.LinearScheduler(db2, 0.0, 0.2, 5)
    sch2.load_state_dict(state)
    assert db2.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="nr_steps"):
        fastnn.nn.LinearScheduler(db, 0.0, 0.1, 0)


# ---------------------------------------------------------------- CUDA (Triton on the GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,block", [((4, 64, 56, 56), 7), ((8, 128, 14, 14), 5), ((2, 16, 33, 70), (4, 70)),
                                         ((2, 40, 9, 13), (2, 6))])
def test_cuda_exact(dtype, layout, shape, block):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for couple in (False, True):
        s, out = seeds_and_out(x, "triton", seed=3, drop_prob=0.2, block_size=block, couple_channels=couple)
        ref = R.drop_block_from_seeds(x.detach(), s.to(dtype), block_of(x, block))
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        assert torch.equal(gx, R.drop_block_from_seeds(g, s.to(dtype), block_of(x, block)))


@pytest.mark.cuda
def test_cuda_distribution_and_compile():
    x = torch.ones(32, 64, 28, 28, device="cuda")
    outs = [F.drop_block2d(x, 0.1, 7, generator=_gen(i, "cuda")) for i in range(4)]
    bl = (7, 7)
    q = expected_drop_prob((28, 28), bl, R.drop_block_gamma(0.1, 1.0, (28, 28), bl), False).mean().item()
    frac = torch.stack([(o == 0).double().mean(dim=(-2, -1)).reshape(-1) for o in outs]).reshape(-1)
    assert abs(frac.mean().item() - q) < 5 * frac.std().item() / math.sqrt(frac.numel())
    m = fastnn.nn.DropBlock2d(0.1, 7).cuda()
    xr = torch.randn(8, 32, 28, 28, device="cuda", requires_grad=True)
    cf = torch.compile(lambda t: m(t) * 2, fullgraph=True)
    y = cf(xr)
    z = y.detach() == 0
    s = y.detach()[~z] / xr.detach()[~z]
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), xr)
    assert torch.allclose(g, torch.where(z, 0.0, s[0].item()), rtol=1e-5)


@pytest.mark.cuda
def test_cuda_opcheck_and_generator():
    ops_ = ops._BACKEND_OPS["triton"]
    x = torch.randn(2, 5, 7, 9, device="cuda", requires_grad=True)
    torch.library.opcheck(ops_.fwd, _sample_args(x))
    g = torch.Generator(device="cuda").manual_seed(1)
    a = F.drop_block2d(x, 0.3, 3, generator=g)
    g.manual_seed(1)
    b = F.drop_block2d(x, 0.3, 3, generator=g)
    assert torch.equal(a, b)
    c = F.drop_block2d(x, 0.3, 3, generator=torch.Generator().manual_seed(1))  # a CPU generator also works
    assert c.device == x.device
    assert HAS_CUDA and DEVICES
