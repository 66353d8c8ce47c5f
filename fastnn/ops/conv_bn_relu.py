"""Fused Conv-BatchNorm-ReLU: the functional API.

Training: the convolution is PyTorch's (cuDNN / oneDNN through F.conv2d); the BatchNorm and the
ReLU after it are one fused op, ``torch.ops.fastnn.bn_relu_train``, whose backward
(``bn_relu_backward``) folds the ReLU mask into the BatchNorm backward. Only the conv output and
the per-channel mean/var are saved for the backward (eager PyTorch also keeps the ReLU output).

Inference: the BatchNorm is folded into the conv weight and bias (``fold_conv_bn``, the formula of
``torch.nn.utils.fusion.fuse_conv_bn_weights``) and the conv runs with a fused bias+ReLU epilogue
(``conv2d_bias_relu``): cuDNN's conv-bias-activation on CUDA, oneDNN's conv+ReLU on the CPU.

Ops registered here (schemas in csrc/conv_bn_relu/conv_bn_relu.cpp):
    fastnn::bn_relu_stats, bn_relu_apply, bn_relu_train,
    fastnn::bn_relu_backward, bn_relu_backward_reduce, bn_relu_backward_elemt,
    fastnn::bn_relu_update_running (BatchNorm's running-statistics bookkeeping, in place)

Host overhead: on a fast GPU a training step of these small per-channel ops is bound by the Python
work per call, not by the kernels. Eager calls therefore take a lean path (`_BNReLUTrain`, an
autograd.Function that calls the ops below the autograd dispatch key and updates the running
statistics with one C++ op); under torch.compile the same ops run through their torch.library
registrations (register_fake / register_autograd), which dynamo and AOTAutograd trace.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnn import _ext, backends, reference
from fastnn.ops import _fast_path

OP = "conv_bn_relu"
backends.register_op(OP, cuda=("cuda",), cpu=("cpu",),
                     doc="fused BatchNorm(+ReLU) after a conv; eval: BN folded into the conv, fused bias+ReLU")

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _ops_loaded() -> bool:
    try:
        torch.ops.fastnn.bn_relu_train.default
    except (AttributeError, RuntimeError):
        return False
    return True


HAVE_OPS = _ops_loaded()


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_layout(x: Tensor) -> torch.memory_format:
    """The layout the C++ op writes its output in (see `dense`/`new_like` in conv_bn_relu.cpp)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    from torch._prims_common import suggest_memory_format
    fmt = suggest_memory_format(x)
    if fmt == torch.channels_last:  # copied to channels_last: NHWC unless that is also contiguous
        t = torch.empty(x.shape, device="meta", memory_format=fmt)
        return torch.contiguous_format if t.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def _empty_act(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x))


def _empty_stat(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=_stat_dtype(x))


def _create_graph_backward(grad_out, input, weight, bias, eps, relu, running=None):
    """BatchNorm(+ReLU)'s backward as differentiable PyTorch ops, for create_graph=True (higher-order
    gradients, e.g. a gradient penalty): the forward is recomputed with the reference (batch statistics, or
    the given running (mean, var)) and differentiated with create_graph. The kernels' backward ops have no
    derivative of their own. Returns (dx, dweight, dbias), None where that input needs no gradient."""
    wrt = [t for t in (input, weight, bias) if t is not None and t.requires_grad]
    if not wrt:
        return None, None, None
    with torch.enable_grad():
        if running is None:
            y = reference.batch_norm_relu(input, None, None, weight, bias, True, 0.0, eps, relu)
        else:
            y = reference.batch_norm_relu(input, running[0], running[1], weight, bias, False, 0.0, eps, relu)
        grads = iter(torch.autograd.grad(y, wrt, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in (input, weight, bias))


if HAVE_OPS:
    _lib = torch.ops.fastnn

    @torch.library.register_fake("fastnn::bn_relu_stats")
    def _fake_stats(input):
        return _empty_stat(input), _empty_stat(input)

    @torch.library.register_fake("fastnn::bn_relu_apply")
    def _fake_apply(input, mean, var, weight, bias, eps, relu):
        return _empty_act(input)

    @torch.library.register_fake("fastnn::bn_relu_train")
    def _fake_train(input, weight, bias, eps, relu):
        return _empty_act(input), _empty_stat(input), _empty_stat(input)

    @torch.library.register_fake("fastnn::bn_relu_backward_reduce")
    def _fake_backward_reduce(grad_out, input, mean, var, weight, bias, eps, relu):
        return _empty_stat(input), _empty_stat(input)

    @torch.library.register_fake("fastnn::bn_relu_backward_elemt")
    def _fake_backward_elemt(grad_out, input, mean, var, weight, bias, sum_dz, sum_dz_xmu, count, eps, relu):
        return _empty_act(input)

    @torch.library.register_fake("fastnn::bn_relu_backward")
    def _fake_backward(grad_out, input, mean, var, weight, bias, eps, relu):
        gw = _empty_stat(input) if weight is None else input.new_empty((input.shape[1],), dtype=weight.dtype)
        gb = _empty_stat(input) if bias is None else input.new_empty((input.shape[1],), dtype=bias.dtype)
        return _empty_act(input), gw, gb

    # -- autograd of bn_relu_train: the fused training backward
    def _train_setup(ctx, inputs, output):
        input, weight, bias, eps, relu = inputs
        _, mean, var = output
        ctx.save_for_backward(input, mean, var, weight, bias)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, var)

    def _train_backward(ctx, grad_out, _gm, _gv):
        input, mean, var, weight, bias = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            dx, gw, gb = _create_graph_backward(grad_out, input, weight, bias, ctx.eps, ctx.relu)
        else:
            dx, gw, gb = _lib.bn_relu_backward(grad_out, input, mean, var, weight, bias, ctx.eps, ctx.relu)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, gw if weight is not None and need[1] else None,
                gb if bias is not None and need[2] else None, None, None)

    torch.library.register_autograd("fastnn::bn_relu_train", _train_backward, setup_context=_train_setup)

    # -- autograd of bn_relu_apply: statistics are constants (eval mode, running statistics)
    def _apply_setup(ctx, inputs, output):
        input, mean, var, weight, bias, eps, relu = inputs
        ctx.save_for_backward(input, mean, var, weight, bias)
        ctx.eps, ctx.relu = eps, relu

    def _apply_backward(ctx, grad_out):
        input, mean, var, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            dx, gw, gb = _create_graph_backward(grad_out, input, weight, bias, ctx.eps, ctx.relu, (mean, var))
            return (dx if need[0] else None, None, None, gw if need[3] else None, gb if need[4] else None,
                    None, None)
        dx = gw = gb = None
        if need[0]:
            zero = torch.zeros_like(mean)  # no batch-statistics terms: dx = dz * w * invstd
            dx = _lib.bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, zero, zero, 1.0, ctx.eps,
                                             ctx.relu)
        if (weight is not None and need[3]) or (bias is not None and need[4]):
            sum_dz, sum_dz_xmu = _lib.bn_relu_backward_reduce(grad_out, input, mean, var, weight, bias, ctx.eps,
                                                              ctx.relu)
            if weight is not None and need[3]:
                gw = (sum_dz_xmu * torch.rsqrt(var + ctx.eps)).to(weight.dtype)
            if bias is not None and need[4]:
                gb = sum_dz.to(bias.dtype)
        return dx, None, None, gw, gb, None, None

    torch.library.register_autograd("fastnn::bn_relu_apply", _apply_backward, setup_context=_apply_setup)

    @torch.library.register_fake("fastnn::bn_relu_update_running")
    def _fake_update_running(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        return None

    _train_op = _lib.bn_relu_train.default
    _backward_op = _lib.bn_relu_backward.default
    _update_op = _lib.bn_relu_update_running.default


# Runs ops below the Autograd dispatch key (fastnn.ops._fast_path; the caller handles autograd).
_below_autograd = _fast_path.below_autograd


class _BNReLUTrain(torch.autograd.Function):
    """Eager training forward/backward of BatchNorm(+ReLU): bn_relu_train, the running-statistics update
    (one C++ op), and bn_relu_backward. The same computation as bn_relu_train's torch.library autograd,
    with a fraction of its Python work per call: one differentiable output (no zero gradients
    materialized for mean/var), no argument re-packing, the ops called below the autograd key."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu):
        with _below_autograd():
            out, mean, var = _train_op(input, weight, bias, eps, relu)
            if running_mean is not None:
                _update_op(running_mean, running_var, num_batches_tracked, mean, var,
                           float(input.numel() // input.shape[1]), momentum)
        ctx.save_for_backward(input, mean, var, weight, bias)
        ctx.eps, ctx.relu = eps, relu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, mean, var, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dx, gw, gb = _create_graph_backward(grad_out, input, weight, bias, ctx.eps, ctx.relu)
        else:
            with _below_autograd():
                dx, gw, gb = _backward_op(grad_out, input, mean, var, weight, bias, ctx.eps, ctx.relu)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                None, None, None, None, None, None)


def _train_eager(input, running_mean, running_var, num_batches_tracked, weight, bias, momentum, eps, relu):
    """Training BatchNorm(+ReLU) with the kernels, outside torch.compile; arguments already checked,
    input non-empty. num_batches_tracked (or None) is incremented with the running statistics."""
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _BNReLUTrain.apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                  momentum, eps, relu)
    with _below_autograd():
        out, mean, var = _train_op(input, weight, bias, eps, relu)
        if running_mean is not None:
            _update_op(running_mean, running_var, num_batches_tracked, mean, var,
                       float(input.numel() // input.shape[1]), momentum)
    return out


# ---------------------------------------------------------------- argument checks

def _check_bn_args(input, running_mean, running_var, weight, bias, training, eps, *, spatial_dims=None):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    ndim = input.dim()
    if spatial_dims is not None and ndim != 2 + spatial_dims:
        raise ValueError(f"expected {2 + spatial_dims}D input (got {ndim}D input); "
                         f"pass a batch of shape (N, C, H, W)")
    if ndim < 2:
        raise ValueError(f"input must have shape (N, C, ...) with at least 2 dims, got {tuple(input.shape)}")
    if input.dtype not in _FLOATS:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}; "
                        f"convert it with input.float()")
    shape = input.shape
    C = shape[1]
    device = input.device
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},), one value per channel of input (dim 1), "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input is on {device}; move them to the same device")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are needed when training=False (evaluation uses them); "
                         "pass them, or use training=True to normalize with the batch statistics")
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if training:
        _check_batch_size(input)


def _check_batch_size(input: Tensor) -> None:
    shape = input.shape
    size_prods = shape[0]
    for s in shape[2:]:
        size_prods *= s
    if size_prods == 1:  # same check and message as torch.nn.functional.batch_norm
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def _check_channel_params(C: int, device, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},), one value per output channel of the conv, "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input is on {device}; move them to the same device")


def _why_not(x: Tensor):
    def why(b: str) -> Optional[str]:
        if not HAVE_OPS:
            return "the fastnn::bn_relu_* ops are not registered (extension not loaded)"
        if b == "cuda" and x.device.type != "cuda":
            return f"input is on {x.device}"
        if b == "cpu" and x.device.type != "cpu":
            return f"input is on {x.device}"
        return None
    return why


# The automatic choice per device type, with what backends.last_choice reports for it. It depends only
# on what is built and visible, which does not change within a process, so it is looked up once (the
# full selection costs several microseconds per call, paid twice per training step). Calls with a
# request (backend=, use_backend, FASTNN_BACKEND) go through backends.select every time.
_auto_choice: dict = {}


def _backend(x: Tensor, backend: Optional[str]) -> str:
    if torch.compiler.is_compiling():
        # backends.select reads thread-locals and the environment, which dynamo cannot trace;
        # under torch.compile the kernels run whenever they can, else the reference.
        if backend is not None:
            return backend
        if HAVE_OPS and _ext.EXT is not None and (x.device.type == "cpu" or
                                                   (x.device.type == "cuda" and _ext.cuda_compiled())):
            return x.device.type
        return "reference"
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, jacrev, ...): the kernels' autograd.Functions have no vmap rules; the
        # reference is plain PyTorch, which every transform understands
        return "reference"
    if backend is None and backends._requested(OP)[0] is None:
        dev = x.device.type
        hit = _auto_choice.get(dev)
        if hit is None:
            b = backends.select(OP, x.device, None, _why_not(x))
            hit = _auto_choice[dev] = (b, backends.last_choice(OP))
        else:
            backends._last[OP] = hit[1]
        return hit[0]
    return backends.select(OP, x.device, backend, _why_not(x))


# ---------------------------------------------------------------- BatchNorm(+ReLU)

@torch.no_grad()
def _update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update r = (1 - m) * r + m * batch (as r + m * (batch - r)), with the unbiased batch
    variance for running_var. One foreach kernel for both buffers (fewer launches on CUDA)."""
    unbiased = var * (count / (count - 1))
    torch._foreach_lerp_([running_mean, running_var],
                         [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], float(momentum))


def batch_norm_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, relu: bool = True, *,
                    backend: Optional[str] = None) -> Tensor:
    """``relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``
    with the same semantics (running statistics updated in place in training), fused.

    input: (N, C, *) float32/float64/float16/bfloat16, contiguous or channels_last (other strides are
    copied). Statistics are accumulated in float32 (float64 for float64 input). relu=False gives
    plain BatchNorm.
    """
    _check_bn_args(input, running_mean, running_var, weight, bias, training, eps)
    b = _backend(input, backend)
    if b == "reference" or input.numel() == 0:
        # empty batches: F.batch_norm's own handling (output of the right shape, statistics untouched)
        return reference.batch_norm_relu(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         relu)
    if training:
        if not torch.compiler.is_compiling():
            return _train_eager(input, running_mean, running_var, None, weight, bias, momentum, eps, relu)
        out, mean, var = torch.ops.fastnn.bn_relu_train(input, weight, bias, eps, relu)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
        return out
    sd = _stat_dtype(input)
    return torch.ops.fastnn.bn_relu_apply(input, running_mean.to(sd), running_var.to(sd), weight, bias, eps, relu)


def _module_train(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  momentum: float, eps: float, relu: bool, backend: Optional[str]) -> Tensor:
    """The training BatchNorm(+ReLU) of the fastnn.nn blocks: batch_norm_relu(training=True) that also
    increments num_batches_tracked (if given) and skips the Python argument checks the block makes
    redundant. `input` is the block's conv output (4-D floating point); the parameters and buffers are
    the block's own, and the C++ ops check their shapes, dtypes and devices."""
    if input.numel() == 0 or torch.compiler.is_compiling() or _backend(input, backend) == "reference":
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return batch_norm_relu(input, running_mean, running_var, weight, bias, True, momentum, eps, relu,
                               backend=backend)
    try:
        _check_batch_size(input)
    except ValueError:
        if num_batches_tracked is not None:  # nn.BatchNorm2d counts the batch before F.batch_norm raises
            num_batches_tracked.add_(1)
        raise
    if running_mean is None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return _train_eager(input, running_mean, running_var, num_batches_tracked, weight, bias, momentum, eps, relu)


# ---------------------------------------------------------------- SyncBatchNorm(+ReLU)

class _SyncBNReLU(torch.autograd.Function):
    """BatchNorm(+ReLU) over the batch of all ranks of a process group, with nn.SyncBatchNorm's semantics:
    statistics and the input gradient use the global batch; weight/bias gradients are the local ones
    (DistributedDataParallel averages them). Each all-reduce carries per-channel sums:
    forward (sum, sum of squares, count) in float64, backward (sum_dz, sum_dz_xmu) in float32."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, relu, process_group):
        import torch.distributed as dist
        C = input.shape[1]
        n_local = input.numel() // C if C else 0
        if n_local > 0:
            mean_l, var_l = torch.ops.fastnn.bn_relu_stats(input)
        else:
            mean_l = var_l = input.new_zeros((C,), dtype=_stat_dtype(input))
        # sums in float64: var = E[x^2] - mean^2 then loses only ~1e-16 * mean^2 / var (relative)
        m, v = mean_l.double(), var_l.double()
        packed = torch.cat([m * n_local, (v + m * m) * n_local, m.new_full((1,), float(n_local))])
        dist.all_reduce(packed, group=process_group)
        count = float(packed[2 * C].item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}"
                             f" ({int(count)} value(s) per channel over the process group)")
        mean64 = packed[:C] / count
        var64 = (packed[C:2 * C] / count - mean64 * mean64).clamp_min(0)
        sd = _stat_dtype(input)
        mean, var = mean64.to(sd), var64.to(sd)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        ctx.save_for_backward(input, mean, var, weight, bias)
        ctx.eps, ctx.relu, ctx.count, ctx.group = eps, relu, count, process_group
        if n_local == 0:
            return input.clone()
        return torch.ops.fastnn.bn_relu_apply(input, mean, var, weight, bias, eps, relu)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as nn.SyncBatchNorm: no higher-order gradients
    def backward(ctx, grad_out):
        import torch.distributed as dist
        input, mean, var, weight, bias = ctx.saved_tensors
        C = input.shape[1]
        if input.numel() > 0:
            with _below_autograd():  # once_differentiable: no graph to record
                sum_dz, sum_dz_xmu = torch.ops.fastnn.bn_relu_backward_reduce(grad_out, input, mean, var, weight,
                                                                              bias, ctx.eps, ctx.relu)
        else:
            sum_dz = sum_dz_xmu = mean.new_zeros((C,))
        need = ctx.needs_input_grad
        gw = (sum_dz_xmu * torch.rsqrt(var + ctx.eps)).to(weight.dtype) if weight is not None and need[1] else None
        gb = sum_dz.to(bias.dtype) if bias is not None and need[2] else None
        dx = None
        if need[0]:
            both = torch.cat([sum_dz, sum_dz_xmu])
            dist.all_reduce(both, group=ctx.group)
            if input.numel() > 0:
                with _below_autograd():
                    dx = torch.ops.fastnn.bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, both[:C],
                                                                 both[C:], ctx.count, ctx.eps, ctx.relu)
            else:
                dx = torch.zeros_like(input)
        return dx, gw, gb, None, None, None, None, None, None


def sync_batch_norm_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, momentum: float = 0.1,
                         eps: float = 1e-5, relu: bool = True, process_group=None) -> Tensor:
    """Training-mode BatchNorm(+ReLU) with statistics over all ranks of `process_group` (default: WORLD).

    Semantics of nn.SyncBatchNorm followed by ReLU. Needs an initialized torch.distributed and the
    fastnn kernels; every rank must call it (it all-reduces)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_batch_norm_relu needs torch.distributed initialized "
                           "(torch.distributed.init_process_group); use batch_norm_relu on a single process")
    _check_bn_args(input, running_mean, running_var, weight, bias, True, eps)
    if not HAVE_OPS:
        raise RuntimeError("sync_batch_norm_relu needs the fastnn::bn_relu_* ops; build the extension "
                           "(pip install --no-build-isolation .)")
    if input.device.type == "cuda" and not _ext.cuda_compiled():
        raise RuntimeError("sync_batch_norm_relu on CUDA needs the extension built with CUDA kernels")
    group = process_group if process_group is not None else dist.group.WORLD
    return _SyncBNReLU.apply(input, weight, bias, running_mean, running_var, eps, momentum, relu, group)


# ---------------------------------------------------------------- inference: BN folded, fused epilogue

fold_conv_bn = reference.fold_conv_bn

# How the CPU runs conv + bias + ReLU in eval (chosen by measuring both on the development
# machine, see benchmarks/bench_conv_bn_relu.py): "mkldnn" = oneDNN's conv with a ReLU post-op
# (torch.ops.mkldnn._convolution_pointwise), "aten" = F.conv2d then an in-place ReLU.
# FASTNN_CBR_CPU_EVAL=mkldnn|aten overrides.
CPU_EVAL_IMPL = os.environ.get("FASTNN_CBR_CPU_EVAL", "mkldnn")
# The same choice on CUDA: "cudnn" = torch.cudnn_convolution_relu (cuDNN's conv-bias-activation),
# "aten" = F.conv2d then an in-place ReLU. FASTNN_CBR_CUDA_EVAL=cudnn|aten overrides.
CUDA_EVAL_IMPL = os.environ.get("FASTNN_CBR_CUDA_EVAL", "cudnn")
_cudnn_relu_failed: set = set()


def _as_list2(v, name) -> list:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return [v[0], v[1]]  # nn.Conv2d's own attributes: the common case, checked cheaply
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return v * 2
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


_MKLDNN_STATIC: dict = {}  # dtype -> whether oneDNN's fused conv+ReLU exists for it in this build/CPU (fixed)


def _mkldnn_pointwise_ok(x: Tensor, w: Tensor) -> bool:
    if CPU_EVAL_IMPL != "mkldnn" or w.dtype != x.dtype or not torch.backends.mkldnn.enabled:
        return False
    ok = _MKLDNN_STATIC.get(x.dtype)
    if ok is None:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        if x.dtype == torch.bfloat16:  # oneDNN's bf16 convolution needs AVX-512 (BF16) on this CPU
            check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
            ok = ok and check is not None and bool(check())
        elif x.dtype != torch.float32:
            ok = False
        _MKLDNN_STATIC[x.dtype] = ok
    return ok


_CUDNN_RELU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def conv2d_bias_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride=1,
                     padding: Union[int, Sequence[int], str] = 0, dilation=1, groups: int = 1,
                     relu: bool = True) -> Tensor:
    """``relu(F.conv2d(input, weight, bias, ...))`` with the ReLU fused into the convolution's epilogue
    where the backend offers it (cuDNN conv-bias-activation; oneDNN conv with a ReLU post-op), else
    F.conv2d followed by an in-place ReLU. Differentiable when gradients are needed (then unfused)."""
    if not relu:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    if needs_grad or isinstance(padding, str) or input.dim() != 4 or input.numel() == 0 \
            or torch.compiler.is_compiling():
        return F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups))
    dev = input.device.type
    autocast = torch.is_autocast_enabled(dev) and input.is_floating_point()
    if not autocast and (input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype)):
        # PyTorch's own error for mixed dtypes (integer input included), as F.conv2d raises it
        return F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups))
    if autocast and input.dtype == torch.float64 and weight.dtype != torch.float64:
        return F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups))  # autocast's own error
    if autocast and input.dtype != torch.float64:  # the fused ops are not autocast-aware: cast as F.conv2d
        input = input.to(torch.get_autocast_dtype(dev))  # would (autocast leaves float64 alone)
    dt = input.dtype
    if weight.dtype != dt:
        weight = weight.to(dt)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    st, pd, dl = _as_list2(stride, "stride"), _as_list2(padding, "padding"), _as_list2(dilation, "dilation")
    if dev == "cuda":
        if CUDA_EVAL_IMPL == "cudnn" and dt in _CUDNN_RELU_DTYPES and torch.backends.cudnn.enabled \
                and torch.backends.cudnn.is_available():
            key = None
            if _cudnn_relu_failed:  # the key is only needed once something failed
                key = _cudnn_key(input, weight, st, pd, dl, groups)
            if key is None or key not in _cudnn_relu_failed:
                try:
                    if autocast:
                        with torch.autocast("cuda", enabled=False):
                            return torch.cudnn_convolution_relu(input, weight, bias, st, pd, dl, groups)
                    return torch.cudnn_convolution_relu(input, weight, bias, st, pd, dl, groups)
                except RuntimeError as e:  # no cuDNN engine for this fused graph: remember, run it unfused
                    key = _cudnn_key(input, weight, st, pd, dl, groups)
                    _cudnn_relu_failed.add(key)
                    backends.warn_once(OP, f"cudnn_convolution_relu cannot run {key} ({str(e)[:120]}); "
                                           "using conv + ReLU")
    elif dev == "cpu" and _mkldnn_pointwise_ok(input, weight):
        if autocast:
            with torch.autocast("cpu", enabled=False):
                return torch.ops.mkldnn._convolution_pointwise(input, weight, bias, pd, st, dl, groups, "relu", [],
                                                               "")
        return torch.ops.mkldnn._convolution_pointwise(input, weight, bias, pd, st, dl, groups, "relu", [], "")
    if autocast:
        with torch.autocast(dev, enabled=False):
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups).relu_()
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups).relu_()


def _cudnn_key(input, weight, st, pd, dl, groups):
    return (input.dtype, tuple(input.shape[1:]), tuple(weight.shape), tuple(st), tuple(pd), tuple(dl), groups,
            input.is_contiguous(memory_format=torch.channels_last))


# ---------------------------------------------------------------- Conv + BN + ReLU

def conv_bn_relu(input: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = True, *, backend: Optional[str] = None) -> Tensor:
    """Conv2d -> BatchNorm2d -> ReLU (zero padding) with F.batch_norm's semantics.

    training=True, or no running statistics: F.conv2d then the fused BatchNorm(+ReLU) kernels (running
    statistics updated in place). training=False: the BatchNorm is folded into the conv weight and bias,
    and the conv runs with a fused bias+ReLU epilogue (the fold is recomputed each call here; the
    modules cache it)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("conv_weight must be a 4-D tensor (out_channels, in_channels/groups, kH, kW)")
    C = conv_weight.shape[0]
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        return batch_norm_relu(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps, relu,
                               backend=backend)
    _check_channel_params(C, input.device, running_mean=running_mean, running_var=running_var, bn_weight=bn_weight,
                          bn_bias=bn_bias, conv_bias=conv_bias)
    if _backend(input, backend) == "reference":
        return reference.conv_bn_relu(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                      False, momentum, eps, stride, padding, dilation, groups, relu)
    w, b = fold_conv_bn(conv_weight, conv_bias, running_mean, running_var, eps, bn_weight, bn_bias)
    return conv2d_bias_relu(input, w, b, stride, padding, dilation, groups, relu)
