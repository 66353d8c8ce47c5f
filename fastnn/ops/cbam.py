"""CBAM (Woo et al., 2018): channel attention then spatial attention, fused.

    out = x' * Ms(x'),  x' = x * Mc(x)
    Mc = sigmoid(MLP(mean_hw x) + MLP(max_hw x))          (shared 2-layer MLP, ReLU between)
    Ms = sigmoid([BN](conv_kxk([mean_c x', max_c x'])))   (or [max, mean] order)

`cbam` runs the whole block as one op (torch.ops.fastnn.cbam) whose x-sized work is three reads
and one write of x forward, and one elementwise pass plus two reductions backward; the MLP, the
conv and the BN are small ATen ops inside it. `cbam_channel_pool` / `cbam_spatial_pool` are the
fused pools on their own (for fastnn.nn.ChannelAttention / SpatialAttention).

Gradient of a max on ties (`max_ties`):
  "first": all of it goes to the first maximal element (scan order h*W+w over H*W, channel order
           over C), as the tutorial's AdaptiveMaxPool2d and torch.max(x, 1) do.
  "split": it is split evenly among the maximal elements, as torch.amax does (timm's CbamModule).
The reference (fastnn.reference.cbam) uses those very PyTorch ops, so kernel and reference agree.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastnn import _ext, backends, reference

OP = "cbam"
POOL_OPS = ("cbam_channel_pool", "cbam_spatial_pool")
backends.register_op(OP, cuda=("cuda",), cpu=("cpu",), doc="CBAM block: channel + spatial attention, fused")
backends.register_op("cbam_channel_pool", cuda=("cuda",), cpu=("cpu",),
                     doc="CBAM channel pool: mean and max over H*W in one pass")
backends.register_op("cbam_spatial_pool", cuda=("cuda",), cpu=("cpu",),
                     doc="CBAM spatial pool: mean and max over C in one pass")

MAX_TIES = ("first", "split")
SPATIAL_ORDERS = ("mean_max", "max_mean")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---------------------------------------------------------------- validation


def _why_not(backend):
    if not _HAVE_OPS:
        return "fastnn._C was built without the cbam kernels; rebuild it (pip install --no-build-isolation .)"
    return None


def _check_x(x, name="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"fastnn.cbam: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastnn.cbam: {name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}; "
                         f"add a batch dimension with {name}.unsqueeze(0) for a single image")
    if x.dtype not in _FLOATS:
        raise TypeError(f"fastnn.cbam: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}; "
                        f"convert it with {name}.float()")
    if min(x.shape[1:]) == 0:  # an empty batch (N = 0) is fine, as in PyTorch's pools and convs
        raise ValueError(f"fastnn.cbam: {name} must have non-zero C, H and W (PyTorch's adaptive pools need "
                         f"them too), got shape {tuple(x.shape)}")


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"fastnn.cbam: {name} must be one of {choices}, got {value!r}")


def _check_mlp_weight(w, name, rows, cols, x):
    """An MLP weight: Linear [out, in] or 1x1 Conv2d [out, in, 1, 1] (the op takes either)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"fastnn.cbam: {name} must be a torch.Tensor, got {type(w).__name__}")
    if (not (w.dim() == 2 or (w.dim() == 4 and w.shape[2] == 1 and w.shape[3] == 1))
            or (rows is not None and w.shape[0] != rows) or (cols is not None and w.shape[1] != cols)):
        want = f"[{rows if rows is not None else 'hidden'}, {cols if cols is not None else 'hidden'}]"
        raise ValueError(f"fastnn.cbam: {name} must be {want} (or [..., 1, 1] from a 1x1 Conv2d), got shape "
                         f"{tuple(w.shape)}; it must match x's {x.shape[1]} channels")
    _check_param(w, name, x)
    return w


def _check_param(t, name, x, numel=None):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fastnn.cbam: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastnn.cbam: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"fastnn.cbam: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"fastnn.cbam: {name} must have {numel} element(s), got shape {tuple(t.shape)}")


def _check_conv(conv_weight, x):
    if not isinstance(conv_weight, Tensor):
        raise TypeError(f"fastnn.cbam: conv_weight must be a torch.Tensor, got {type(conv_weight).__name__}")
    s = tuple(conv_weight.shape)
    if len(s) != 4 or s[0] != 1 or s[1] != 2 or s[2] != s[3] or s[2] % 2 == 0:
        raise ValueError(f"fastnn.cbam: conv_weight must be [1, 2, k, k] with an odd k (the spatial conv "
                         f"Conv2d(2, 1, k, padding=k//2)), got shape {s}")
    _check_param(conv_weight, "conv_weight", x)


# ---------------------------------------------------------------- the fused block


def cbam(x: Tensor, mlp_weight1: Tensor, mlp_weight2: Tensor, conv_weight: Tensor, *,
         mlp_bias1: Optional[Tensor] = None, mlp_bias2: Optional[Tensor] = None,
         conv_bias: Optional[Tensor] = None, spatial_bn: bool = False,
         bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
         bn_running_mean: Optional[Tensor] = None, bn_running_var: Optional[Tensor] = None,
         bn_training: bool = False, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
         spatial_order: str = "mean_max", max_ties: str = "first", backend: Optional[str] = None) -> Tensor:
    """CBAM on x [N, C, H, W]: returns x' * Ms(x') with x' = x * Mc(x), in x's dtype and memory format.

    mlp_weight1: [hidden, C] (Linear) or [hidden, C, 1, 1] (1x1 Conv2d); mlp_weight2: [C, hidden] or
    [C, hidden, 1, 1]; conv_weight: [1, 2, k, k], k odd, applied with padding k//2 to the
    2-channel map in `spatial_order`. With spatial_bn, a 1-channel BatchNorm follows the conv: in
    training mode (bn_training) it normalizes with the batch statistics over N*H*W and updates
    bn_running_mean/var in place (momentum bn_momentum, unbiased variance) like F.batch_norm; else it
    uses the running statistics. max_ties: see the module docstring.
    """
    _check_x(x)
    _check_choice(spatial_order, "spatial_order", SPATIAL_ORDERS)
    _check_choice(max_ties, "max_ties", MAX_TIES)
    C = x.shape[1]
    w1 = _check_mlp_weight(mlp_weight1, "mlp_weight1", None, C, x)
    hidden = w1.shape[0]
    w2 = _check_mlp_weight(mlp_weight2, "mlp_weight2", C, hidden, x)
    _check_param(mlp_bias1, "mlp_bias1", x, hidden)
    _check_param(mlp_bias2, "mlp_bias2", x, C)
    _check_conv(conv_weight, x)
    _check_param(conv_bias, "conv_bias", x, 1)
    if spatial_bn:
        for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_running_mean", bn_running_mean),
                        ("bn_running_var", bn_running_var)):
            _check_param(t, name, x, 1)
        if (bn_running_mean is None) != (bn_running_var is None):
            raise ValueError("fastnn.cbam: give both bn_running_mean and bn_running_var, or neither")
        if not bn_training and bn_running_mean is None:
            raise ValueError("fastnn.cbam: spatial BN in eval mode (bn_training=False) needs bn_running_mean and "
                             "bn_running_var; pass them or set bn_training=True to use batch statistics")
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, numbers.Real) or \
                not 0.0 <= float(bn_momentum) <= 1.0:
            raise ValueError(f"fastnn.cbam: bn_momentum must be a number in [0, 1], got {bn_momentum!r}; for "
                             f"BatchNorm's cumulative average (momentum=None) pass 1 / num_batches_tracked, "
                             f"as fastnn.nn.CBAM does")
        if bn_training and x.shape[0] * x.shape[2] * x.shape[3] == 1:  # F.batch_norm's rule (0 is fine)
            raise ValueError(f"fastnn.cbam: spatial BN in training mode needs more than 1 value per channel "
                             f"(N*H*W > 1), got x of shape {tuple(x.shape)}; use eval mode or a bigger batch")

    b = backends.select(OP, x.device, backend, why_not=_why_not)
    if b == "reference" or x.shape[0] == 0:  # empty batch: PyTorch's ops give the empty result
        return reference.cbam(x, w1, w2, conv_weight, mlp_bias1=mlp_bias1, mlp_bias2=mlp_bias2,
                              conv_bias=conv_bias, spatial_bn=spatial_bn, bn_weight=bn_weight, bn_bias=bn_bias,
                              bn_running_mean=bn_running_mean, bn_running_var=bn_running_var,
                              bn_training=bn_training, bn_momentum=bn_momentum, bn_eps=bn_eps,
                              spatial_order=spatial_order, max_ties=max_ties)
    return _run(x, w1, mlp_bias1, w2, mlp_bias2, conv_weight, conv_bias, bool(spatial_bn), bn_weight, bn_bias,
                bn_running_mean, bn_running_var, bool(bn_training), bn_momentum, float(bn_eps),
                spatial_order == "mean_max", max_ties == "first")


def _run(x, w1, b1, w2, b2, cw, cb, spatial_bn, bnw, bnb, rm, rv, bn_training, momentum, eps, mean_first, first):
    """torch.ops.fastnn.cbam on validated arguments, then the BN's running statistics.

    Eager calls skip the op's registered autograd kernel (a Python wrapper that costs more host time
    per call than the whole CUDA forward at ResNet shapes): with gradients they go through
    _CbamFunction, whose forward runs the op below autograd and whose backward is the registered
    backward's; without, they call the op below autograd. Traced calls (torch.compile) use the op as
    registered, autograd included."""
    if not spatial_bn:
        bnw = bnb = rm = rv = None
    args = (x, w1, b1, w2, b2, cw, cb, bnw, bnb, rm, rv, spatial_bn, bn_training, eps, mean_first, first)
    if torch.compiler.is_compiling():
        out, saved, _ = torch.ops.fastnn.cbam(*args)
    elif torch.is_grad_enabled() and torch._C._any_requires_grad(x, w1, b1, w2, b2, cw, cb, bnw, bnb):
        out, saved = _CbamFunction.apply(*args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            out, saved, _ = torch.ops.fastnn.cbam.default(*args)
    if spatial_bn and bn_training and rm is not None:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        _update_running_stats(saved[-2:], rm, rv, momentum, count)
    return out


def _update_running_stats(stats, running_mean, running_var, momentum, count):
    # As BatchNorm: the running variance takes the unbiased batch variance.
    with torch.no_grad():
        mean, var = stats[0], stats[1] * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype).reshape(running_mean.shape), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype).reshape(running_var.shape), alpha=momentum)


def _saved_sizes(N, C, P, Cr, spatial_bn):
    """Sizes of the forward's saved / saved_idx buffers (csrc/cbam/cbam_saved.h: SavedLayout)."""
    def pad(n):  # regions start at multiples of 16 elements
        return (n + 15) // 16 * 16
    total = pad(N * C) + pad(N * P) + pad(2 * N * C) + pad(2 * N * P) + pad(N * P) + pad(2 * N * Cr)
    return total + (2 if spatial_bn else 0), pad(N * C) + N * P


def _cbam_fake(x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, rm, rv, spatial_bn, bn_training,
               bn_eps, mean_first, max_first_index):
    N, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    total, itotal = _saved_sizes(N, C, H * W, w1.shape[0], spatial_bn)
    return (torch.empty_like(x, memory_format=_layout(x)), x.new_empty((total,), dtype=acc),
            x.new_empty((itotal,), dtype=torch.int32))


def _cbam_backward_fake(grad_out, x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, spatial_bn,
                        bn_training, bn_eps, mean_first, max_first_index, saved, saved_idx, needs_input_grad):
    grads = [torch.empty_like(x, memory_format=_layout(x))] if needs_input_grad else []
    present = [w1, w2, conv_weight] + [t for t in (b1, b2, conv_bias) if t is not None]
    if spatial_bn:
        present += [t for t in (bn_weight, bn_bias) if t is not None]
    return grads + [t.new_empty(t.shape) for t in present]


def _layout(x):
    """The memory format the kernels use and return: channels_last only for a channels_last x that is
    not also NCHW-contiguous (csrc/cbam/cbam.cpp: use_channels_last)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _save(ctx, inputs, saved, saved_idx):
    (x, w1, b1, w2, b2, cw, cb, bnw, bnb, _rm, _rv, spatial_bn, bn_training, bn_eps, mean_first,
     max_first_index) = inputs
    ctx.flags = (spatial_bn, bn_training, bn_eps, mean_first, max_first_index)
    ctx.save_for_backward(x, w1, b1, w2, b2, cw, cb, bnw, bnb, saved, saved_idx)
    # no zero-filled gradients for the saved buffers (they are not differentiable)
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_out):
    """The gradients of cbam's 9 tensor inputs (x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight,
    bn_bias), None where absent."""
    if grad_out is None:
        return (None,) * 9
    x, w1, b1, w2, b2, cw, cb, bnw, bnb, saved, saved_idx = ctx.saved_tensors
    spatial_bn, bn_training, bn_eps, mean_first, max_first_index = ctx.flags
    need_x = ctx.needs_input_grad[0]
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    args = (grad_out, x, w1, b1, w2, b2, cw, cb, bnw, bnb, spatial_bn, bn_training, bn_eps, mean_first,
            max_first_index, saved, saved_idx, need_x)
    if torch.is_grad_enabled():  # create_graph=True: through the registered autograd, which refuses
        grads = torch.ops.fastnn.cbam_backward(*args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            grads = torch.ops.fastnn.cbam_backward.default(*args)
    it = iter(grads)
    dx = next(it) if need_x else None
    dw1, dw2, dcw = next(it), next(it), next(it)
    db1 = next(it) if b1 is not None else None
    db2 = next(it) if b2 is not None else None
    dcb = next(it) if cb is not None else None
    dbnw = next(it) if spatial_bn and bnw is not None else None
    dbnb = next(it) if spatial_bn and bnb is not None else None
    return dx, dw1, db1, dw2, db2, dcw, dcb, dbnw, dbnb


def _cbam_setup(ctx, inputs, output):
    _save(ctx, inputs, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _cbam_backward(ctx, grad_out, _grad_saved, _grad_saved_idx):
    return (*_grads(ctx, grad_out), None, None, None, None, None, None, None)


class _CbamFunction(torch.autograd.Function):
    """The eager path of cbam with gradients (see _run): the op below autograd, the same backward."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out, saved, saved_idx = torch.ops.fastnn.cbam.default(*args)
        _save(ctx, args, saved, saved_idx)
        ctx.mark_non_differentiable(saved)
        return out, saved

    @staticmethod
    def backward(ctx, grad_out, _grad_saved):
        return (*_grads(ctx, grad_out), None, None, None, None, None, None, None)


# ---------------------------------------------------------------- the pools on their own


def cbam_channel_pool(x: Tensor, max_ties: str = "first", backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(mean, max) of x [N, C, H, W] over H*W, each [N, C], in one pass over x.

    The results are float32 (float64 for float64 x). max_ties: see the module docstring.
    A window whose sum is NaN (a NaN in it, or both +inf and -inf) gets a NaN max (docs/cbam.md)."""
    _check_x(x)
    _check_choice(max_ties, "max_ties", MAX_TIES)
    b = backends.select("cbam_channel_pool", x.device, backend, why_not=_why_not)
    if b == "reference" or x.shape[0] == 0:
        mean, mx = reference.cbam_channel_pool(x, max_ties=max_ties)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return mean.to(acc), mx.to(acc)
    pooled, _ = torch.ops.fastnn.cbam_channel_pool(x, max_ties == "first")
    return pooled[0], pooled[1]


def cbam_spatial_pool(x: Tensor, max_ties: str = "first", backend: Optional[str] = None) -> Tensor:
    """[mean, max] of x [N, C, H, W] over C, as one [N, 2, H, W] map, in one pass over x.

    The result is float32 (float64 for float64 x). max_ties: see the module docstring.
    A window whose sum is NaN (a NaN in it, or both +inf and -inf) gets a NaN max (docs/cbam.md)."""
    _check_x(x)
    _check_choice(max_ties, "max_ties", MAX_TIES)
    b = backends.select("cbam_spatial_pool", x.device, backend, why_not=_why_not)
    if b == "reference" or x.shape[0] == 0:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.cat(reference.cbam_spatial_pool(x, max_ties=max_ties), 1).to(acc)
    pooled, _ = torch.ops.fastnn.cbam_spatial_pool(x, max_ties == "first")
    return pooled


def _pool_fake(reduce_hw):
    def fake(x, max_first_index):
        N, C, H, W = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if reduce_hw:
            return x.new_empty((2, N, C), dtype=acc), x.new_empty((N, C), dtype=torch.int32)
        return x.new_empty((N, 2, H, W), dtype=acc), x.new_empty((N, H, W), dtype=torch.int32)
    return fake


def _pool_backward_fake(grad_pooled, x, pooled, sel, max_first_index):
    return torch.empty_like(x, memory_format=_layout(x))


def _pool_setup(ctx, inputs, output):
    x, max_first_index = inputs
    ctx.max_first_index = max_first_index
    ctx.save_for_backward(x, *output)
    ctx.mark_non_differentiable(output[1])


def _make_pool_backward(bwd_op):
    def backward(ctx, grad_pooled, _grad_sel):
        x, pooled, sel = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return bwd_op(grad_pooled.contiguous(), x, pooled, sel, ctx.max_first_index), None
    return backward


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise NotImplementedError(f"fastnn.{name}: double backward (create_graph=True through the backward) is not "
                                  f"supported; use the reference backend (backend='reference') for higher-order "
                                  f"gradients")
    return backward


def _noop_setup(ctx, inputs, output):
    pass


# Fake kernels and autograd exist only where the compiled ops do (else everything runs the reference).
_HAVE_OPS = _ext.EXT is not None and hasattr(torch.ops.fastnn, "cbam")
if _HAVE_OPS:
    torch.library.register_fake("fastnn::cbam")(_cbam_fake)
    torch.library.register_fake("fastnn::cbam_backward")(_cbam_backward_fake)
    torch.library.register_autograd("fastnn::cbam", _cbam_backward, setup_context=_cbam_setup)
    torch.library.register_fake("fastnn::cbam_channel_pool")(_pool_fake(True))
    torch.library.register_fake("fastnn::cbam_spatial_pool")(_pool_fake(False))
    torch.library.register_fake("fastnn::cbam_channel_pool_backward")(_pool_backward_fake)
    torch.library.register_fake("fastnn::cbam_spatial_pool_backward")(_pool_backward_fake)
    torch.library.register_autograd("fastnn::cbam_channel_pool",
                                    _make_pool_backward(torch.ops.fastnn.cbam_channel_pool_backward),
                                    setup_context=_pool_setup)
    torch.library.register_autograd("fastnn::cbam_spatial_pool",
                                    _make_pool_backward(torch.ops.fastnn.cbam_spatial_pool_backward),
                                    setup_context=_pool_setup)
    for _name in ("cbam_backward", "cbam_channel_pool_backward", "cbam_spatial_pool_backward"):
        torch.library.register_autograd(f"fastnn::{_name}", _no_double_backward(_name), setup_context=_noop_setup)
