"""Stochastic pooling (Zeiler & Fergus 2013): functional API, validation, fake kernels, autograd.

    y = fastnn.functional.stochastic_pool2d(F.relu(x), 2)                     # training: samples
    y = fastnn.functional.stochastic_pool2d(x, 3, 2, 1, mode="softmax", training=False)

Backends: the C++/CUDA kernels (torch.ops.fastnn.stochastic_pool2d / _backward) and the
unfold-based reference (fastnn.reference.stochastic_pool2d).
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from fastnn import backends, reference
from fastnn.ops import _fast_path

__all__ = ["stochastic_pool2d"]

OP = "stochastic_pool2d"
MODES = ("activation", "softmax")
MAX_WINDOW = 256  # the sampled offset is stored in one byte per output
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

IntPair = Union[int, Sequence[int]]

backends.register_op(OP, cuda=("cuda",), cpu=("cpu",),
                     doc="stochastic pooling: sample one element per window with p = a/sum(a) or softmax(a)")


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"stochastic_pool2d: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"stochastic_pool2d: {name} must be an int or a pair of ints, got {value!r}")


def check_window_args(kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair, mode: str):
    """Validates the input-independent arguments; returns (kernel, stride, padding) as pairs."""
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    p = _pair(padding, "padding")
    if min(k) <= 0:
        raise ValueError(f"stochastic_pool2d: kernel_size must be positive, got {k}")
    if min(s) <= 0:
        raise ValueError(f"stochastic_pool2d: stride must be positive, got {s}; pass stride=None to use kernel_size")
    if min(p) < 0:
        raise ValueError(f"stochastic_pool2d: padding must be >= 0, got {p}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"stochastic_pool2d: padding {p} must be at most half of kernel_size {k} (as in "
                         f"nn.MaxPool2d); use a larger kernel_size or less padding")
    if k[0] * k[1] > MAX_WINDOW:
        raise ValueError(f"stochastic_pool2d: kernel_size {k} has {k[0] * k[1]} elements; at most {MAX_WINDOW} are "
                         f"supported (the sampled position is stored in one byte per output)")
    if mode not in MODES:
        raise ValueError(f"stochastic_pool2d: mode must be 'activation' or 'softmax', got {mode!r}")
    return k, s, p


def _check_input(input, k, s, p, ceil_mode, generator):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"stochastic_pool2d: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        fix = ("add the batch dimension with input.unsqueeze(0)" if input.dim() == 3
               else "pass a batch of images shaped (N, C, H, W)")
        raise ValueError(f"stochastic_pool2d: input must be 4-D (N, C, H, W), got {input.dim()}-D with shape "
                         f"{tuple(input.shape)}; {fix}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"stochastic_pool2d: input must be float32, float16, bfloat16 or float64, got {input.dtype}; "
                        f"convert it with input.float()")
    h, w = input.shape[-2:]
    oh = reference.stochastic_pool_output_size(h, k[0], s[0], p[0], ceil_mode)
    ow = reference.stochastic_pool_output_size(w, k[1], s[1], p[1], ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"stochastic_pool2d: kernel_size {k} is larger than the padded input ({h} + 2*{p[0]}, "
                         f"{w} + 2*{p[1]}); use a smaller kernel_size or more padding")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"stochastic_pool2d: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator.device.type != input.device.type:
            raise ValueError(f"stochastic_pool2d: generator is on {generator.device} but input is on {input.device}; "
                             f"create it with torch.Generator(device=input.device)")


def _why_not(backend: str, input: torch.Tensor) -> Optional[str]:
    if backend == "cuda" and input.dtype == torch.float64:
        return "the CUDA kernels take float32/float16/bfloat16, not float64"
    if backend in ("cpu", "cuda") and not hasattr(torch.ops.fastnn, OP):
        return "torch.ops.fastnn.stochastic_pool2d is not registered (extension built without it)"
    return None


def stochastic_pool2d(input: torch.Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None,
                      padding: IntPair = 0, ceil_mode: bool = False, mode: str = "activation",
                      training: bool = True, generator: Optional[torch.Generator] = None, *,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Stochastic pooling over (N, C, H, W).

    mode='activation' (the paper): p_i = a_i / sum(a) over each window; the input must be >= 0 (apply
    a ReLU first). mode='softmax': p = softmax(a) over the window. training=True samples one element
    per window (the gradient flows to it alone); training=False returns sum(p_i * a_i). An all-zero
    window gives 0. kernel_size/stride/padding/ceil_mode and the output size are as nn.MaxPool2d
    (stride=None means kernel_size); padded positions are never chosen. Randomness comes from
    `generator` (default: the device's default generator, so torch.manual_seed reproduces it).
    The output keeps the input's memory format (channels_last or contiguous).

    Negative inputs in mode='activation' raise ValueError. On CUDA the kernel flags them and the
    flag is read back once per call (a 4-byte copy and a stream sync); set the environment variable
    FASTNN_STOCHASTIC_POOL_CHECK=nan to skip that sync (the offending windows then output NaN)."""
    k, s, p = check_window_args(kernel_size, stride, padding, mode)
    ceil_mode, training = bool(ceil_mode), bool(training)
    _check_input(input, k, s, p, ceil_mode, generator)
    b = backends.select(OP, input.device, backend, why_not=lambda name: _why_not(name, input))
    if b == "reference":
        return reference.stochastic_pool2d(input, k, s, p, ceil_mode, mode, training, generator)
    args = (list(k), list(s), list(p), ceil_mode, mode, training, generator)
    if not _eager_ok(input):
        return torch.ops.fastnn.stochastic_pool2d(input, *args)[0]
    if torch.is_grad_enabled() and input.requires_grad:
        return _StochasticPoolFn.apply(input, args)
    with _below_autograd():
        return torch.ops.fastnn.stochastic_pool2d(input, *args)[0]


# ------------------------------------------------------------------ eager fast path
# (fastnn.ops._fast_path: the torch.library autograd wrapper costs ~20 us of Python per training step)
_below_autograd = _fast_path.below_autograd
_eager_ok = _fast_path.eager_ok


class _StochasticPoolFn(torch.autograd.Function):
    """The op's registered autograd (_setup_context / _backward below), with the kernels called below
    the autograd key."""

    @staticmethod
    def forward(ctx, input, args):
        with _below_autograd():
            out = torch.ops.fastnn.stochastic_pool2d(input, *args)
        _setup_context(ctx, (input, *args), out)
        return out[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _fast_path.in_backward(_backward, ctx, grad_out, None)[0], None


# ------------------------------------------------------------------ torch.library: fake + autograd
def _layout(x: torch.Tensor) -> torch.memory_format:
    # The kernels' rule (stochastic_pool.cpp): channels_last iff stride(1) < stride(3).
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def _fake_forward(input, kernel_size, stride, padding, ceil_mode, mode, training, generator=None):
    n, c, h, w = input.shape
    oh = reference.stochastic_pool_output_size(h, kernel_size[0], stride[0], padding[0], ceil_mode)
    ow = reference.stochastic_pool_output_size(w, kernel_size[1], stride[1], padding[1], ceil_mode)
    fmt = _layout(input)
    out = torch.empty((n, c, oh, ow), dtype=input.dtype, device=input.device, memory_format=fmt)
    if training:
        offsets = torch.empty((n, c, oh, ow), dtype=torch.uint8, device=input.device, memory_format=fmt)
    else:
        offsets = torch.empty((0,), dtype=torch.uint8, device=input.device)
    return out, offsets


def _fake_backward(grad_output, input, offsets, kernel_size, stride, padding, ceil_mode, mode, training):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_layout(input))


def _setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, ceil_mode, mode, training, _generator = inputs
    ctx.save_for_backward(input, output[1])
    ctx.args = (kernel_size, stride, padding, ceil_mode, mode, training)


def _backward(ctx, grad_out, _grad_offsets):
    input, offsets = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        grad_in = _create_graph_backward(grad_out, input, offsets, ctx.args)
    else:
        grad_in = torch.ops.fastnn.stochastic_pool2d_backward(grad_out, input, offsets, *ctx.args)
    return grad_in, None, None, None, None, None, None, None


def _create_graph_backward(grad_out, input, offsets, args):
    """The input gradient for higher-order gradients. Training: grad_out scattered to each window's sampled
    element (the kernel), linear in grad_out, whose derivative gathers at the same elements. Eval: the
    reference recomputed and differentiated with create_graph (the output depends smoothly on the input)."""
    kernel_size, stride, padding, ceil_mode, mode, training = args
    if training:
        return _ScatterToSampled.apply(grad_out, input, offsets, args)
    with torch.enable_grad():
        out = reference.stochastic_pool2d(input, kernel_size, stride, padding, ceil_mode, mode, False)
        (grad_in,) = torch.autograd.grad(out, input, grad_out, create_graph=True)
    return grad_in


class _ScatterToSampled(torch.autograd.Function):
    """The training backward (grad_out to each window's sampled element) as a function of grad_out."""

    @staticmethod
    def forward(ctx, grad_out, input, offsets, args):
        ctx.save_for_backward(offsets)
        ctx.args = args
        with _below_autograd():
            return torch.ops.fastnn.stochastic_pool2d_backward(grad_out, input, offsets, *args)

    @staticmethod
    def backward(ctx, gg):
        (offsets,) = ctx.saved_tensors
        kernel_size, stride, padding, ceil_mode = ctx.args[:4]
        cols, _, oh, ow = reference._stochastic_pool_windows(gg, kernel_size, stride, padding, ceil_mode)
        n, c = gg.shape[:2]
        idx = offsets.long().reshape(n, c, 1, oh * ow)
        return torch.gather(cols, 2, idx).view(n, c, oh, ow), None, None, None


if hasattr(torch.ops.fastnn, OP):
    torch.library.register_fake("fastnn::stochastic_pool2d")(_fake_forward)
    torch.library.register_fake("fastnn::stochastic_pool2d_backward")(_fake_backward)
    torch.library.register_autograd("fastnn::stochastic_pool2d", _backward, setup_context=_setup_context)
