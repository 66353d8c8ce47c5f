"""Whether a fused block may bypass its submodules.

A fused forward reads its submodules' parameters and never calls the submodules, so hooks registered
on them (torch.nn.utils.prune recomputes a weight in a forward pre-hook, say) would silently not run.
The blocks check this per call and run their submodules instead when it is so."""
from torch import nn

_mm = nn.modules.module


def hooked(*mods) -> bool:
    """Whether calling any of `mods` (None entries skipped) would run hooks: its own or global ones."""
    if (_mm._global_forward_pre_hooks or _mm._global_forward_hooks or _mm._global_backward_pre_hooks
            or _mm._global_backward_hooks):
        return True
    for m in mods:
        if m is not None and (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
                              or m._backward_pre_hooks):
            return True
    return False


def tree_hooked(root: nn.Module) -> bool:
    """Whether any module strictly below `root` has hooks, or global hooks exist (a walk of _modules: a
    few microseconds for a small block, cheaper than root.modules())."""
    if (_mm._global_forward_pre_hooks or _mm._global_forward_hooks or _mm._global_backward_pre_hooks
            or _mm._global_backward_hooks):
        return True
    stack = list(root._modules.values())
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        stack.extend(m._modules.values())
    return False
