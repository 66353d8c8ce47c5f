"""Whether a fused block may bypass its submodules.

A fused forward reads its submodules' parameters and never calls the submodules, so hooks registered
on them (torch.nn.utils.prune recomputes a weight in a forward pre-hook, say) would silently not run,
and a parametrized parameter (torch.nn.utils.parametrize) is not in the module's _parameters. The
blocks check this per call (a few dict lookups) and call their submodules instead when it is so."""
from torch import nn

from fastnn import backends

_mm = nn.modules.module


def global_hooks() -> bool:
    """Whether module hooks registered for every module (register_module_forward_hook, ...) exist."""
    return bool(_mm._global_forward_pre_hooks or _mm._global_forward_hooks or _mm._global_backward_pre_hooks
                or _mm._global_backward_hooks)


def own_hooks(*mods) -> bool:
    """Whether any of `mods` (None entries skipped) has hooks of its own."""
    for m in mods:
        if m is not None and (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
                              or m._backward_pre_hooks):
            return True
    return False


def parametrized(*mods) -> bool:
    """Whether any of `mods` has a parametrized parameter (computed on access, not in _parameters)."""
    return any(m is not None and "parametrizations" in m._modules for m in mods)


def must_run_submodules(op: str, *mods) -> bool:
    """Whether a block over `mods` must call them rather than fuse: hooks of their own, or global
    hooks (said once as a warning: every block then runs unfused, slower, so the hooks see its
    submodules)."""
    if own_hooks(*mods):
        return True
    if global_hooks():
        backends.warn_once(op, "global module hooks are registered, so fused blocks call their submodules "
                               "(unfused, slower) for the hooks to see them")
        return True
    return False
