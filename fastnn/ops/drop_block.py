"""DropBlock (Ghiasi et al. 2018): functional API, op registration, autograd.

    fastnn.functional.drop_block2d(x, drop_prob=0.1, block_size=7, ...)   # (N, C, H, W)
    fastnn.functional.drop_block1d / drop_block3d                        # (N, C, L) / (N, C, D, H, W)

The default distribution is timm's drop_block_2d (timm >= 1.0.23), per channel by default:
  - the block size is clipped per axis to the map;
  - gamma = gamma_scale * p * prod(size) / prod(k) / prod(size - k + 1);
  - seeds are Bernoulli(gamma); a block is the k-window around a seed, covering
    [s - k // 2, s + (k - 1) // 2] per axis (timm's offset for even k), clipped to the map;
  - kept units are scaled by units / (kept + 1e-7) counted over the whole mask, in float32;
  - couple_channels=True shares one mask across channels (timm's default; ours is False);
  - with_noise fills dropped units with N(0, 1) instead of rescaling;
  - valid_only=True draws seeds only where the whole block fits (the paper / torchvision).
It is the identity (returns `input` itself) when not training or drop_prob == 0.

Backends: "triton" on CUDA (also CPU tensors under TRITON_INTERPRET=1), "cpu" (C++/OpenMP),
"reference" (fastnn.reference.drop_block: timm's algorithm, bit-exact with timm's float32
output under the same torch RNG state when couple_channels=True).

Randomness: every call draws one int64 seed from torch's generator (`generator`, else the
default generator of the input's device), so torch.manual_seed makes runs reproducible. The
kernels expand it with counter-based generators (Philox in Triton, splitmix64 on the CPU),
so the two backends draw different (equally distributed) masks for the same seed.
`drop_block_seed_mask` returns the seeds a call would draw, for exactness tests.

Backward: grad * keep * scale from the 1-bit-per-unit mask saved by the forward.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from fastnn import _ext, backends, reference
from fastnn.ops import _fast_path

OP = "drop_block"
backends.register_op(OP, cuda=("triton",), cpu=("cpu",),
                     doc="DropBlock 1-D/2-D/3-D: Triton (GPU) and C++/OpenMP (CPU) kernels")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SEED_HIGH = 2 ** 62


# ---------------------------------------------------------------- validation and layout

def _check_args(input, nd: int, drop_prob, block_size, gamma_scale, generator, name: str):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != nd + 2:
        shape = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[nd]
        hint = f"; use drop_block{input.dim() - 2}d for {input.dim()}-D inputs" if 3 <= input.dim() <= 5 else ""
        raise ValueError(f"{name}: input must be {shape} ({nd + 2}-D), got shape {tuple(input.shape)}{hint}")
    if input.dtype not in _FLOAT:
        raise TypeError(f"{name}: input must be float16, bfloat16, float32 or float64, got {input.dtype}; "
                        f"convert it with .float()")
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real) or not 0.0 <= float(drop_prob) <= 1.0:
        raise ValueError(f"{name}: drop_prob must be a number in [0, 1], got {drop_prob!r}")
    _block_tuple(block_size, nd, name)
    if isinstance(gamma_scale, bool) or not isinstance(gamma_scale, numbers.Real) or not (
            math.isfinite(float(gamma_scale)) and float(gamma_scale) >= 0):
        raise ValueError(f"{name}: gamma_scale must be a finite number >= 0, got {gamma_scale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def _block_tuple(block_size, nd: int, name: str) -> Tuple[int, ...]:
    def ok(b):
        return isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1
    if ok(block_size):
        return (int(block_size),) * nd
    if isinstance(block_size, (tuple, list)) and len(block_size) == nd and all(ok(b) for b in block_size):
        return tuple(int(b) for b in block_size)
    raise ValueError(f"{name}: block_size must be an int >= 1 or a sequence of {nd} ints >= 1, got {block_size!r}")


def _channels_last_dense(x: torch.Tensor) -> bool:
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def _layout(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """x dense in a layout the kernels walk, and whether that layout is channels-last.
    Other strides are copied to contiguous (the output then is contiguous)."""
    if x.is_contiguous():
        return x, False
    if _channels_last_dense(x):
        return x, True
    return x.contiguous(), False


def _to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t.contiguous()
    if _channels_last_dense(t):
        return t
    perm = (0, *range(2, t.dim()), 1)
    inv = [0] * t.dim()
    for i, p in enumerate(perm):
        inv[p] = i
    return t.permute(perm).contiguous().permute(inv)


def _draw_seed(device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One int64 from torch's generator, on `device` (no host sync on CUDA)."""
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=generator.device, generator=generator)
    return seed.to(device)


# ---------------------------------------------------------------- the ops

def _mask_shape(x, channels_last: bool):
    n, c, sp = x.shape[0], x.shape[1], x.shape[2:]
    inner = c if channels_last else sp[-1]
    outer = n
    for s in (sp if channels_last else (c,) + tuple(sp[:-1])):
        outer = outer * s
    return (outer, (inner + 7) // 8)


class _Ops:
    """The fwd / fwd_ / bwd / seeds ops of one backend, and fwd's autograd (setup, backward), which the
    eager fast path (_DropBlockFn) shares with the torch.library registration."""

    def __init__(self, fwd, fwd_, bwd, seeds, setup, backward):
        self.fwd, self.fwd_, self.bwd, self.seeds = fwd, fwd_, bwd, seeds
        self.setup, self.backward = setup, backward


_BACKEND_OPS = {}


def _register_common(names: Tuple[str, str, str, str]):
    fwd, fwd_, bwd, seeds = names

    @torch.library.register_fake(fwd)
    def _fwd_fake(x, seed, block, gamma, couple_channels, valid_only, with_noise, scale_by_keep, channels_last):
        return (torch.empty_like(x), x.new_empty(_mask_shape(x, channels_last), dtype=torch.uint8),
                x.new_empty((2,), dtype=torch.int64))

    @torch.library.register_fake(fwd_)
    def _fwd_inplace_fake(x, seed, block, gamma, couple_channels, valid_only, with_noise, scale_by_keep,
                          channels_last):
        return (x.new_empty(_mask_shape(x, channels_last), dtype=torch.uint8), x.new_empty((2,), dtype=torch.int64))

    @torch.library.register_fake(bwd)
    def _bwd_fake(grad, mask, stats, scale, channels_last):
        return torch.empty_like(grad)

    @torch.library.register_fake(seeds)
    def _seeds_fake(x, seed, block, gamma, couple_channels, valid_only, channels_last):
        return x.new_empty((x.shape[0], 1 if couple_channels else x.shape[1]) + tuple(x.shape[2:]),
                           dtype=torch.uint8)

    bwd_op = _resolve(bwd)

    def setup_fwd(ctx, inputs, output):
        _, _, _, _, _, _, with_noise, scale_by_keep, channels_last = inputs
        _, mask, stats = output
        ctx.save_for_backward(mask, stats)
        ctx.scale = bool(scale_by_keep and not with_noise)
        ctx.channels_last = channels_last

    def backward_fwd(ctx, gout, _gmask, _gstats):
        mask, stats = ctx.saved_tensors
        gin = bwd_op(_to_layout(gout, ctx.channels_last), mask, stats, ctx.scale, ctx.channels_last)
        return gin, None, None, None, None, None, None, None, None

    torch.library.register_autograd(fwd, backward_fwd, setup_context=setup_fwd)

    def setup_bwd(ctx, inputs, output):
        _, mask, stats, scale, channels_last = inputs
        ctx.save_for_backward(mask, stats)
        ctx.scale, ctx.channels_last = scale, channels_last

    def backward_bwd(ctx, gg):  # the backward is linear in grad: its own backward is itself
        mask, stats = ctx.saved_tensors
        return bwd_op(_to_layout(gg, ctx.channels_last), mask, stats, ctx.scale, ctx.channels_last), None, None, \
            None, None

    torch.library.register_autograd(bwd, backward_bwd, setup_context=setup_bwd)
    return _Ops(*(_resolve(n) for n in names), setup=setup_fwd, backward=backward_fwd)


def _resolve(name: str):
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


if _ext.EXT is not None:
    _BACKEND_OPS["cpu"] = _register_common(
        ("fastnn::drop_block_fwd", "fastnn::drop_block_fwd_", "fastnn::drop_block_bwd", "fastnn::drop_block_seeds"))


def _check_kernel_args(x: torch.Tensor, seed: torch.Tensor, block: Sequence[int], gamma: float, channels_last: bool):
    """The triton ops' own checks (the C++ ops check the same in drop_block.cpp)."""
    if x.dim() < 3 or x.dim() > 5 or x.dtype not in _FLOAT:
        raise ValueError(f"drop_block: input must be a 3-D to 5-D float tensor, got {x.dtype} {tuple(x.shape)}")
    if not (_channels_last_dense(x) if channels_last else x.is_contiguous()):
        raise ValueError("drop_block: input must be dense in the requested layout (call .contiguous() first)")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
        raise ValueError("drop_block: seed must be a one-element int64 tensor on the input's device")
    if len(block) != x.dim() - 2 or any(not 1 <= k <= max(1, s) for k, s in zip(block, x.shape[2:])):
        raise ValueError(f"drop_block: block {list(block)} must have one size in [1, size] per spatial axis "
                         f"of {tuple(x.shape[2:])}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"drop_block: gamma must be finite and >= 0, got {gamma}")


def register_triton_ops() -> bool:
    """Define the Triton ops (torch.ops.fastnn.drop_block_*_triton) and put them in _BACKEND_OPS;
    idempotent. Importing triton and torch.library.triton_op (which loads torch._inductor) takes
    1-2 s, so this runs on the first call that selects the Triton backend, not at `import fastnn`.
    Returns whether the ops exist (False without triton)."""
    if "triton" in _BACKEND_OPS:
        return True
    if backends.triton_available() is not None:
        return False
    from torch.library import triton_op

    from fastnn.triton_kernels import drop_block as _tk

    @triton_op("fastnn::drop_block_fwd_triton", mutates_args=())
    def _fwd_triton(x: torch.Tensor, seed: torch.Tensor, block: List[int], gamma: float, couple_channels: bool,
                    valid_only: bool, with_noise: bool, scale_by_keep: bool,
                    channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_kernel_args(x, seed, block, gamma, channels_last)
        g = _tk.geometry(x.shape, block, couple_channels, valid_only, channels_last)
        mask, stats = _tk.build_mask(x, seed, g, gamma)
        out = torch.empty_like(x)
        _tk.apply_mask(x, out, mask, stats, seed, g, scale_by_keep, with_noise)
        return out, mask, stats

    @triton_op("fastnn::drop_block_fwd_triton_", mutates_args={"x"})
    def _fwd_triton_(x: torch.Tensor, seed: torch.Tensor, block: List[int], gamma: float, couple_channels: bool,
                     valid_only: bool, with_noise: bool, scale_by_keep: bool,
                     channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_kernel_args(x, seed, block, gamma, channels_last)
        g = _tk.geometry(x.shape, block, couple_channels, valid_only, channels_last)
        mask, stats = _tk.build_mask(x, seed, g, gamma)
        _tk.apply_mask(x, x, mask, stats, seed, g, scale_by_keep, with_noise)
        return mask, stats

    @triton_op("fastnn::drop_block_bwd_triton", mutates_args=())
    def _bwd_triton(grad: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, scale: bool,
                    channels_last: bool) -> torch.Tensor:
        if not (_channels_last_dense(grad) if channels_last else grad.is_contiguous()):
            raise ValueError("drop_block_bwd: grad must be dense in the forward's layout")
        g = _tk.geometry(grad.shape, [1] * (grad.dim() - 2), False, False, channels_last)
        if tuple(mask.shape) != (g.outer, g.nb) or mask.dtype != torch.uint8 or stats.numel() != 2:
            raise ValueError(f"drop_block_bwd: mask must be uint8 {(g.outer, g.nb)} and stats int64 [2] from the "
                             f"forward, got {mask.dtype} {tuple(mask.shape)} and {tuple(stats.shape)}")
        out = torch.empty_like(grad)
        _tk.apply_mask(grad, out, mask, stats, stats, g, scale, False)
        return out

    @triton_op("fastnn::drop_block_seeds_triton", mutates_args=())
    def _seeds_triton(x: torch.Tensor, seed: torch.Tensor, block: List[int], gamma: float, couple_channels: bool,
                      valid_only: bool, channels_last: bool) -> torch.Tensor:
        _check_kernel_args(x, seed, block, gamma, channels_last)
        g = _tk.geometry(x.shape, block, couple_channels, valid_only, channels_last)
        stats = torch.empty(2, dtype=torch.int64, device=x.device)
        return _tk.seeds_from_words(_tk.seed_words(x, seed, g, gamma, stats), g, x.dim())

    _BACKEND_OPS["triton"] = _register_common(
        ("fastnn::drop_block_fwd_triton", "fastnn::drop_block_fwd_triton_", "fastnn::drop_block_bwd_triton",
         "fastnn::drop_block_seeds_triton"))
    return True


def _triton_ready() -> bool:
    # Under torch.compile this runs once at trace time (its result is a constant), so the ops exist
    # before Dynamo looks them up, without a graph break (as flash_attention._ops_ready).
    return register_triton_ops()


# = torch.compiler.assume_constant_result(_triton_ready), without importing torch._dynamo at import
_triton_ready._dynamo_marked_constant = True


# ---------------------------------------------------------------- eager fast path

# (fastnn.ops._fast_path: ops called below the Autograd key, where eager_ok says the fast path may run)
_below_autograd = _fast_path.below_autograd
_eager_ok = _fast_path.eager_ok


class _DropBlockFn(torch.autograd.Function):
    """Eager forward/backward of a DropBlock op: the same computation as the op's torch.library autograd
    (registered above for torch.compile and opcheck) with about half the host work per training step
    (measured on the CPU: 52 -> 26 us for fwd+bwd of a tiny map). DropBlock layers sit in every block of
    a network, and on a GPU small maps are bound by this per-call host time."""

    @staticmethod
    def forward(ctx, x, ops, args):
        with _below_autograd():
            out, mask, stats = ops.fwd(x, *args)
        ops.setup(ctx, (x,) + args, (out, mask, stats))
        ctx.backward_fn = ops.backward
        return out

    @staticmethod
    def backward(ctx, gout):
        return _fast_path.in_backward(ctx.backward_fn, ctx, gout, None, None)[0], None, None


def _run_fwd(ops: "_Ops", x: torch.Tensor, args: tuple) -> torch.Tensor:
    """Out-of-place forward through the fast path where it applies, else the registered op."""
    if not _eager_ok(x):
        return ops.fwd(x, *args)[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return _DropBlockFn.apply(x, ops, args)
    with _below_autograd():
        return ops.fwd(x, *args)[0]


# ---------------------------------------------------------------- functional API

def _prepare(input, nd, drop_prob, block_size, gamma_scale, generator, name, checked=False):
    if not checked:
        _check_args(input, nd, drop_prob, block_size, gamma_scale, generator, name)
    block = reference.drop_block_clip(_block_tuple(block_size, nd, name), input.shape[2:])
    gamma = reference.drop_block_gamma(float(drop_prob), float(gamma_scale), input.shape[2:], block) \
        if input.numel() > 0 else 0.0
    return list(block), gamma


def _drop_block(input, nd, drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep,
                valid_only, inplace, training, generator, backend, name):
    _check_args(input, nd, drop_prob, block_size, gamma_scale, generator, name)
    if not training or float(drop_prob) == 0.0 or input.numel() == 0:
        return input
    if input.device.type == "meta":  # shape inference only: no values, no mask to draw
        return input if inplace else torch.empty_like(input)
    block, gamma = _prepare(input, nd, drop_prob, block_size, gamma_scale, generator, name, checked=True)
    b = backends.select(OP, input.device, backend)
    if b == "reference":
        out = reference.drop_block(input, float(drop_prob), block, float(gamma_scale), bool(with_noise),
                                   bool(couple_channels), bool(scale_by_keep), bool(valid_only), True, generator)
        return input.copy_(out) if inplace else out
    if b == "triton":
        _triton_ready()
    ops = _BACKEND_OPS[b]
    x, cl = _layout(input)
    seed = _draw_seed(input.device, generator)
    args = (seed, block, gamma, bool(couple_channels), bool(valid_only), bool(with_noise), bool(scale_by_keep), cl)
    if not inplace:
        return _run_fwd(ops, x, args)
    # eager only: Dynamo cannot trace is_inference() (a compiled graph is functionalized anyway)
    if not torch.compiler.is_compiling() and input.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name}(inplace=True): input is an inference tensor (made under torch.inference_mode) and "
                           "cannot be updated in place outside inference mode (as x.mul_() would refuse); "
                           "pass input.clone() or use inplace=False")
    if torch.is_grad_enabled() and input.requires_grad:
        # autograd sees an in-place update of input (like x.mul_(keep)): a leaf that requires
        # grad raises as it does for any in-place op
        return input.copy_(_run_fwd(ops, x, args))
    with _below_autograd() if _eager_ok(x) else contextlib.nullcontext():
        ops.fwd_(x, *args)
    if not torch.compiler.is_compiling():
        # The C++ op does not bump the version counter itself: without this, autograd would not notice
        # that a tensor it saved for another op's backward (say w * x saves x for w's gradient) was
        # overwritten, and that gradient would be silently wrong instead of raising as for x.mul_().
        torch.autograd.graph.increment_version(x)
    if x is not input:  # input was not dense: the kernel wrote into a dense copy
        input.copy_(x)
    return input


_DOC = """DropBlock on a{shape} tensor (see fastnn.ops.drop_block for the semantics).

    Args:
        input: {shape}, float16/bfloat16/float32/float64, contiguous or channels-last (other
            strides are copied first).
        drop_prob: the fraction of units to drop, in [0, 1].
        block_size: int or one int per spatial axis; clipped to the feature map.
        gamma_scale: multiplies the seed rate.
        with_noise: fill dropped units with N(0, 1) instead of rescaling the kept ones.
        couple_channels: one mask shared by all channels (timm's default) instead of one per channel.
        scale_by_keep: scale kept units by units / kept (ignored with with_noise).
        valid_only: seeds only where the whole block fits (the paper / torchvision).
        inplace: write the result into input and return input. Under autograd this is an
            in-place update of input (a leaf that requires grad raises, as with x.mul_()).
        training: when False (or drop_prob == 0) input is returned unchanged.
        generator: torch.Generator to draw the seed from (default: the input device's default).
        backend: "triton", "cpu" or "reference" (default: the best available, see fastnn.backends).
    """


def drop_block1d(input: torch.Tensor, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7,
                 gamma_scale: float = 1.0, with_noise: bool = False, couple_channels: bool = False,
                 scale_by_keep: bool = True, valid_only: bool = False, inplace: bool = False, training: bool = True,
                 generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    return _drop_block(input, 1, drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep,
                       valid_only, inplace, training, generator, backend, "drop_block1d")


def drop_block2d(input: torch.Tensor, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7,
                 gamma_scale: float = 1.0, with_noise: bool = False, couple_channels: bool = False,
                 scale_by_keep: bool = True, valid_only: bool = False, inplace: bool = False, training: bool = True,
                 generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    return _drop_block(input, 2, drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep,
                       valid_only, inplace, training, generator, backend, "drop_block2d")


def drop_block3d(input: torch.Tensor, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7,
                 gamma_scale: float = 1.0, with_noise: bool = False, couple_channels: bool = False,
                 scale_by_keep: bool = True, valid_only: bool = False, inplace: bool = False, training: bool = True,
                 generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    return _drop_block(input, 3, drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep,
                       valid_only, inplace, training, generator, backend, "drop_block3d")


drop_block1d.__doc__ = _DOC.format(shape=" (N, C, L)")
drop_block2d.__doc__ = _DOC.format(shape=" (N, C, H, W)")
drop_block3d.__doc__ = _DOC.format(shape=" (N, C, D, H, W)")


def drop_block_seed_mask(input: torch.Tensor, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7,
                         gamma_scale: float = 1.0, couple_channels: bool = False, valid_only: bool = False,
                         generator: Optional[torch.Generator] = None, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """The seed mask (uint8, (N, C or 1, *spatial)) that drop_block{1,2,3}d with the same
    arguments draws from the same generator state: a test hook. Blocks are the dilation of
    these seeds (fastnn.reference.drop_block_dilate), so
    `reference.drop_block_from_seeds(x, seeds, block)` reproduces the kernels' output.
    Like a forward call, it advances the generator. The layout of `input` matters for the
    Triton backend (its random stream follows memory order)."""
    nd = input.dim() - 2 if isinstance(input, torch.Tensor) else 0
    name = "drop_block_seed_mask"
    if nd not in (1, 2, 3):
        raise ValueError(f"{name}: input must be a 3-D to 5-D tensor (N, C, *spatial)")
    block, gamma = _prepare(input, nd, drop_prob, block_size, gamma_scale, generator, name)
    b = backends.select(OP, input.device, backend)
    if b == "reference":
        return reference.drop_block_seeds(input, gamma, block, bool(couple_channels), bool(valid_only),
                                          generator).to(torch.uint8)
    if b == "triton":
        _triton_ready()
    x, cl = _layout(input)
    seed = _draw_seed(input.device, generator)
    return _BACKEND_OPS[b].seeds(x, seed, block, gamma, bool(couple_channels), bool(valid_only), cl)
