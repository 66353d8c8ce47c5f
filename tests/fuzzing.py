"""Shared pieces of the property tests (tests/test_fuzz_<op>.py): hypothesis profiles, layout
strategies and the tolerance rule.

Profiles (hypothesis settings, chosen by FASTNN_FUZZ_PROFILE, else "gpu" when CUDA is visible,
else "ci"):
  ci   200 examples per fuzz test, derandomized (the same examples every run), no deadline
  gpu  1000 examples per fuzz test, derandomized
  dev  25 examples, random: quick local iteration (FASTNN_FUZZ_PROFILE=dev)
Every fuzz test counts the examples it ran and fails if that is below the profile's
max_examples, so the figures in docs/robustness.md stay true.

Tolerance rule (the op issues' rule, for every op): an fp32/fp16/bf16 result passes when its max
error against a float64 reference is at most 2x the error of PyTorch's own result in the same
dtype, + ULPS ulps (fp32: 8, fp16/bf16: 2) of the result's magnitude; float64 results must match
to 1e-10 relative. For gradients the magnitude is the largest over the call's gradients (see
magnitude()). Non-finite values must sit in the same places as the reference's.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import torch
from hypothesis import HealthCheck, assume, given, settings  # noqa: F401  (re-exported)
from hypothesis import strategies as st

MIN_EXAMPLES = {"ci": 200, "gpu": 1000}  # the figures in docs/robustness.md

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=MIN_EXAMPLES["ci"], derandomize=True, **_COMMON)
settings.register_profile("gpu", max_examples=MIN_EXAMPLES["gpu"], derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=25, derandomize=False, **_COMMON)


def profile_name() -> str:
    name = os.environ.get("FASTNN_FUZZ_PROFILE")
    if name:
        return name
    return "gpu" if torch.cuda.is_available() else "ci"


PROFILE = profile_name()
PROFILE_SETTINGS = settings.get_profile(PROFILE)


def run(strategy, body: Callable, *, examples: Optional[int] = None, explicit: Sequence = ()):
    """Run body(case) for `strategy`'s examples under the active profile, then the `explicit` cases
    (falsifying examples found earlier, kept as regressions). Fails if fewer examples ran than
    the profile asks for."""
    n = PROFILE_SETTINGS.max_examples if examples is None else examples
    count = [0]

    @settings(PROFILE_SETTINGS, max_examples=n)
    @given(strategy)
    def prop(case):
        count[0] += 1
        body(case)

    for case in explicit:
        body(case)
    t0 = time.perf_counter()
    prop()
    if os.environ.get("FASTNN_FUZZ_TIMING"):
        print(f"\n{getattr(body, '__name__', 'fuzz')}: {count[0]} examples in {time.perf_counter() - t0:.1f} s")
    assert count[0] >= n, f"only {count[0]} of {n} examples ran (hypothesis exhausted the strategy?)"
    return count[0]


# ---------------------------------------------------------------- sizes

PRIMES = (2, 3, 5, 7, 11, 13, 17)


def dim(max_value: int, min_value: int = 1):
    """A size with weight on 1, the bounds and primes."""
    primes = [p for p in PRIMES if min_value <= p <= max_value]
    opts = [st.just(min_value), st.just(max_value), st.integers(min_value, max_value)]
    if min_value <= 1 <= max_value:
        opts.append(st.just(1))
    if primes:
        opts.append(st.sampled_from(primes))
    return st.one_of(*opts)


# ---------------------------------------------------------------- layouts
# A layout turns a (contiguous) tensor into one with the same values and other strides. It is
# differentiable: gradients flow back to the contiguous tensor, so backward can be compared on it.

LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "expanded")


@st.composite
def layouts(draw, ndim: int, allow=LAYOUTS):
    """(name, params) for relayout()."""
    name = draw(st.sampled_from(allow))
    if name == "permuted":
        return name, tuple(draw(st.permutations(range(ndim))))
    if name == "sliced":
        steps = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        offs = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
        return name, (steps, offs)
    if name == "expanded":
        return name, draw(st.integers(0, ndim - 1))
    return name, None


def relayout(t: torch.Tensor, layout) -> torch.Tensor:
    """t's values with the strides `layout` asks for (not "expanded": see make_input)."""
    name, params = layout
    if name == "contiguous":
        return t.contiguous()
    if name == "channels_last":  # (N, C, *sp) stored as (N, *sp, C)
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if name == "permuted":
        perm = params
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        return t.permute(perm).contiguous().permute(inv)
    if name == "sliced":
        steps, offs = params
        big = [s * st_ + o for s, st_, o in zip(t.shape, steps, offs)]
        buf = t.new_zeros(big)
        idx = tuple(slice(o, o + s * st_, st_) for s, st_, o in zip(t.shape, steps, offs))
        buf[idx] = t
        return buf[idx]
    raise ValueError(name)


def make_input(shape, layout, make: Callable[[Sequence[int]], torch.Tensor]) -> tuple:
    """(leaf, x): leaf is contiguous with `shape` (requires grad), x has the same values with the
    layout's strides. "expanded" draws dim d of size 1 and broadcasts it to shape[d] (stride 0),
    so the leaf then has size 1 there and its gradient sums over the broadcast."""
    name, params = layout
    if name == "expanded":
        d = params
        small = list(shape)
        small[d] = 1
        leaf = make(small).requires_grad_(True)
        return leaf, leaf.expand(*shape)
    leaf = make(shape).requires_grad_(True)
    return leaf, relayout(leaf, layout)


# ---------------------------------------------------------------- dtypes and the tolerance rule

ULPS = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.float32: 8.0}


def assert_close_rule(out: torch.Tensor, ref64: torch.Tensor, same: Optional[torch.Tensor], what: str,
                      ulps: Optional[float] = None, factor: float = 2.0, scale: Optional[float] = None,
                      eps_dtype: Optional[torch.dtype] = None):
    """out vs the float64 reference under the tolerance rule; `same` is PyTorch's result in out's
    dtype (the baseline error). float64 outputs are compared to 1e-10 relative. `scale` is the
    magnitude the ulps are taken of (default: max |ref|; pass the magnitude of a related tensor
    where the reference may be ~0 by cancellation, e.g. a gradient that sums to zero). `eps_dtype`:
    the dtype the ulps are of when the computation ran in a lower precision than out's dtype
    (fp32 parameter gradients of a bf16 computation)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    o, r = out.detach().double(), ref64.detach().double()
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    assert torch.equal(fin_o, fin_r), f"{what}: non-finite values differ from the reference's"
    if not fin_r.all():  # NaN where NaN, +-inf where +-inf
        assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN positions differ"
        inf = torch.isinf(r)
        assert torch.equal(o[inf], r[inf]), f"{what}: inf values differ"
    if o.numel() == 0 or not fin_r.any():
        return
    o, r = o[fin_r], r[fin_r]
    scale = max(r.abs().max().item() if scale is None else float(scale), 1e-30)
    err = (o - r).abs().max().item()
    if out.dtype == torch.float64 and eps_dtype in (None, torch.float64):
        assert err <= 1e-10 * scale + 1e-300, f"{what}: float64 max error {err:.3e} (scale {scale:.3e})"
        return
    base = 0.0
    if same is not None:
        base = (same.detach().double()[fin_r] - r).abs().max().item()
    edt = eps_dtype or out.dtype
    u = ULPS[edt] if ulps is None else ulps
    atol = u * torch.finfo(edt).eps * scale
    assert err <= factor * base + atol, (f"{what} ({out.dtype}): max error {err:.3e} > {factor} x torch's {base:.3e} "
                                         f"+ {atol:.3e} ({u:g} ulp of {scale:.3e})")


def magnitude(tensors) -> float:
    """The largest finite |value| over several tensors: the scale for the ulps of a set of gradients.
    A parameter gradient is a sum over the batch of terms as large as the input gradient, and may
    cancel to ~0; its rounding error follows the terms, not the result."""
    m = 0.0
    for t in tensors:
        if t is not None and t.numel():
            t = t.detach()
            fin = t[torch.isfinite(t)]
            if fin.numel():
                m = max(m, fin.abs().max().item())
    return m


def floats_like(dtype, device):
    """A function shape -> standard-normal tensor (drawn in fp32, cast), for make_input."""
    def make(shape):
        return torch.randn(list(shape), device=device).to(dtype)
    return make
