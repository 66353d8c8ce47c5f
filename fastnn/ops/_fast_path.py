"""The eager fast path shared by the ops (see docs/adding_an_op.md, "Host time").

On a GPU a small op is bound by its Python work per call, and the autograd wrapper that
torch.library.register_autograd installs is a large part of it. Eager calls therefore run an op's
kernels below the Autograd dispatch key, inside the op's own autograd.Function; torch.compile,
torch.func transforms and tensor subclasses keep the registered op, which they understand."""
import torch

# Runs ops straight to their CPU/CUDA kernels, skipping the Autograd key (the caller does autograd).
below_autograd = torch._C._AutoDispatchBelowAutograd


def in_backward(fn, *args):
    """fn(*args) from a fast-path autograd.Function's backward: below autograd, unless create_graph=True
    (grad mode on), where the ops' own autograd must record the graph."""
    if torch.is_grad_enabled():
        return fn(*args)
    with below_autograd():
        return fn(*args)


def eager_ok(x: torch.Tensor) -> bool:
    """Whether a call on `x` may take the fast path: a plain tensor, eager mode, no torch.func transform."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())
