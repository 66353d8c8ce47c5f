"""FlashAttention: `flash_attn_func` (flash-attn's API), `scaled_dot_product_attention` (torch's API)
and `patch_sdpa` (route torch.nn.functional.scaled_dot_product_attention through fastnn).

Backends: "triton" (fastnn.triton_kernels.flash_attention, CUDA tensors; CPU tensors only under
TRITON_INTERPRET=1) and "reference" (torch's own SDPA, which already has a CPU flash kernel; used for
every CPU call and for the cases the kernel does not cover, such as a general attn_mask).

The Triton kernels are registered as torch.library.triton_op's (torch.ops.fastnn.flash_attn_fwd /
flash_attn_bwd) so torch.compile traces into them. Registering them imports triton and part of
torch._inductor (about a second), so it happens on the first call, not at `import fastnn`;
`register_ops()` does it eagerly (tests, opcheck).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastnn import backends, reference

OP = "flash_attention"
backends.register_op(OP, cuda=("triton",), cpu=(),
                     doc="FlashAttention-2 forward/backward (Triton); CPU tensors use torch's SDPA")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- op registration

_registered = False


def register_ops() -> None:
    """Define torch.ops.fastnn.flash_attn_fwd / flash_attn_bwd (idempotent)."""
    global _registered
    if _registered:
        return
    from torch.library import triton_op

    @triton_op("fastnn::flash_attn_fwd", mutates_args=())
    def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, seed: Optional[Tensor], dropout_p: float,
                       softmax_scale: float, causal: bool, bottom_right: bool) -> Tuple[Tensor, Tensor]:
        """q (B, Sq, H, D), k/v (B, Sk, Hkv, D), head-dim stride 1 -> out (B, Sq, H, D), lse (B, H, Sq)."""
        from fastnn.triton_kernels import flash_attention as K
        _check_raw_args("flash_attn_fwd", q, k, v, seed, dropout_p)
        shift = k.shape[1] - q.shape[1] if bottom_right else 0
        return K.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, causal_shift=shift,
                         dropout_p=dropout_p, seed=seed)

    @triton_op("fastnn::flash_attn_bwd", mutates_args=())
    def flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       dlse: Optional[Tensor], seed: Optional[Tensor], dropout_p: float, softmax_scale: float,
                       causal: bool, bottom_right: bool) -> Tuple[Tensor, Tensor, Tensor]:
        from fastnn.triton_kernels import flash_attention as K
        _check_raw_args("flash_attn_bwd", q, k, v, seed, dropout_p)
        B, Sq, H, D = q.shape
        for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (B, H, Sq)),
                               ("dlse", dlse, (B, H, Sq))):
            if t is None:
                continue
            if tuple(t.shape) != tuple(shape) or t.device != q.device:
                raise ValueError(f"flash_attn_bwd: {name} must have shape {tuple(shape)} on {q.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
            if t.dtype != (torch.float32 if name in ("lse", "dlse") else q.dtype):
                raise TypeError(f"flash_attn_bwd: {name} has dtype {t.dtype}")
        if dout.numel() and ((D > 1 and (dout.stride(-1) != 1 or out.stride(-1) != 1)) or not lse.is_contiguous()
                             or (dlse is not None and not dlse.is_contiguous())):
            raise ValueError("flash_attn_bwd: dout/out need a unit head-dim stride and lse/dlse must be contiguous")
        shift = k.shape[1] - q.shape[1] if bottom_right else 0
        return K.backward(dout, q, k, v, out, lse, dlse, softmax_scale=softmax_scale, causal=causal,
                          causal_shift=shift, dropout_p=dropout_p, seed=seed)

    # Explicit fake kernels: shapes only, no Triton tracing (and they run where Triton cannot).
    @flash_attn_fwd.register_fake
    def _fwd_fake(q, k, v, seed, dropout_p, softmax_scale, causal, bottom_right):
        B, Sq, H, D = q.shape
        return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)

    @flash_attn_bwd.register_fake
    def _bwd_fake(dout, q, k, v, out, lse, dlse, seed, dropout_p, softmax_scale, causal, bottom_right):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))

    def setup_context(ctx, inputs, output):
        q, k, v, seed, dropout_p, softmax_scale, causal, bottom_right = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, seed)
        ctx.args = (dropout_p, softmax_scale, causal, bottom_right)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dropout_p, softmax_scale, causal, bottom_right = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        if dlse is not None and not dlse.is_contiguous():
            dlse = dlse.contiguous()
        dq, dk, dv = torch.ops.fastnn.flash_attn_bwd(dout, q, k, v, out, lse, dlse, seed, dropout_p,
                                                     softmax_scale, causal, bottom_right)
        return dq, dk, dv, None, None, None, None, None

    flash_attn_fwd.register_autograd(backward, setup_context=setup_context)
    _registered = True


def _ops_ready() -> bool:
    # Under torch.compile this runs once at trace time (its result is a constant), so the ops exist
    # before Dynamo looks them up, without a graph break.
    register_ops()
    return True


# = torch.compiler.assume_constant_result(_ops_ready), which imports torch._dynamo (~2 s) at
# `import fastnn`; the tests check that the decorator still sets exactly this attribute.
_ops_ready._dynamo_marked_constant = True


# ----------------------------------------------------------------------------- dropout RNG

def draw_dropout_seed(device) -> Tensor:
    """The Philox seed a dropout call draws from torch's generator for `device` (one int64 tensor).

    Calls with dropout draw exactly this, first, so tests can replay it with torch.manual_seed."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_mask(seed: Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float) -> Tensor:
    """Test hook: the bool keep-mask (batch, nheads, seqlen_q, seqlen_k) the Triton kernels use for
    this seed tensor (see draw_dropout_seed). Kept entries are scaled by 1 / (1 - dropout_p)."""
    from fastnn.triton_kernels import flash_attention as K
    return K.dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, dropout_p)


# ----------------------------------------------------------------------------- validation

def _check_bshd(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"flash_attn_func: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attn_func: {name} must be 4-D (batch, seqlen, nheads, headdim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attn_func: q, k, v are on different devices ({q.device}, {k.device}, {v.device}); "
                         "move them to one device")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attn_func: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if q.dtype not in _DTYPES + (torch.float64,):
        raise TypeError(f"flash_attn_func: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_func: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attn_func: batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attn_func: head dims differ: q has {q.shape[3]}, k/v have {k.shape[3]}")
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attn_func: head dim {d} is out of range; it must be in [1, {MAX_HEAD_DIM}]")
    h, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or h % hkv:
        raise ValueError(f"flash_attn_func: q has {h} heads and k/v {hkv}; the q heads must be a multiple of the "
                         "k/v heads (GQA/MQA)")


def _check_raw_args(who: str, q, k, v, seed, dropout_p) -> None:
    """The Triton ops' own checks (cheap, shapes only): called directly, torch.ops.fastnn.flash_attn_*
    must raise on arguments the kernels would read out of bounds with, not return garbage."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must be 4-D (batch, seqlen, heads, headdim), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise TypeError(f"{who}: q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, "
                            f"{k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"{who}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} needs a unit stride along the head dim (call .contiguous())")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{who}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "(same batch and head dim, k and v alike)")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"{who}: head dim {q.shape[3]} is out of range [1, {MAX_HEAD_DIM}]")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{who}: q heads ({q.shape[2]}) must be a multiple of the k/v heads ({k.shape[2]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{who}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64
                            or seed.device != q.device):
        raise ValueError(f"{who}: dropout needs a one-element int64 seed tensor on {q.device} "
                         "(see draw_dropout_seed)")


def _check_dropout(dropout_p, who: str) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{who}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_scale(scale, d: int, who: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{who}: the softmax scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _triton_why_not(q, k, v) -> Optional[str]:
    """Limits of the Triton kernel beyond the API's checks (None: it can run)."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype}: the Triton kernel takes float16, bfloat16 or float32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


# ----------------------------------------------------------------------------- core

def _why_not_fn(why: Optional[str]):
    # None when the kernel can run: backends.select then never branches on a function object,
    # which Dynamo in torch 2.11 cannot trace
    return None if why is None else (lambda _backend: why)


def _run_triton(q, k, v, dropout_p: float, scale: float, causal: bool, bottom_right: bool):
    """(B, S, H, D) views in, (out, lse) out, through the registered op (autograd included)."""
    _ops_ready()
    # the kernels need a unit stride along the head dim; any other layout is fine
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    return torch.ops.fastnn.flash_attn_fwd(q, k, v, seed, dropout_p, scale, causal, bottom_right)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, return_lse: bool = False, *, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes=None, deterministic: bool = False, backend: Optional[str] = None):
    """flash-attn's `flash_attn_func`: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D).

    causal: bottom-right aligned when Sq != Sk (flash-attn >= 2.1): query i sees keys j <= i + Sk - Sq;
    a query that sees no key gets 0. return_lse: also return the log-sum-exp (B, H, Sq), fp32, natural log.
    GQA/MQA: H % Hkv == 0, K/V are not repeated. The backward is deterministic (no atomics).
    window_size, softcap and alibi_slopes exist for signature compatibility; only their defaults are
    supported. backend: "triton" or "reference" (see fastnn.backends)."""
    _check_bshd(q, k, v)
    p = _check_dropout(dropout_p, "flash_attn_func")
    scale = _check_scale(softmax_scale, q.shape[-1], "flash_attn_func")
    if tuple(window_size) != (-1, -1) or softcap != 0.0 or alibi_slopes is not None:
        raise NotImplementedError("flash_attn_func: window_size, softcap and alibi_slopes are not supported by fastnn; "
                                  "leave them at their defaults")
    b = backends.select(OP, q.device, backend, why_not=_why_not_fn(_triton_why_not(q, k, v)))
    if b == "triton":
        out, lse = _run_triton(q, k, v, p, scale, bool(causal), True)
    else:
        return reference.flash_attention(q, k, v, dropout_p=p, softmax_scale=scale, causal=bool(causal),
                                         return_lse=bool(return_lse))
    return (out, lse) if return_lse else out


def _sdpa_why_not(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """Why the Triton kernel cannot run this SDPA call exactly as torch would (None: it can)."""
    if attn_mask is not None:
        return "attn_mask is given (the kernel covers is_causal only); torch's SDPA runs it"
    if not all(isinstance(t, Tensor) for t in (query, key, value)):
        return "inputs are not tensors"
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        return "inputs are not 4-D (batch, heads, seqlen, headdim) or 3-D"
    if not (query.device == key.device == value.device):
        return "inputs are on different devices"
    if not (query.dtype == key.dtype == value.dtype):
        return "input dtypes differ"
    if key.shape != value.shape:
        return "key and value shapes differ (e.g. a value head dim that differs)"
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        return "batch sizes or head dims differ"
    if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} is out of the kernel's range [1, {MAX_HEAD_DIM}]"
    if query.dim() == 4:
        h, hkv = query.shape[1], key.shape[1]
        if h != hkv and (not enable_gqa or hkv == 0 or h % hkv):
            return "query and key/value head counts differ without enable_gqa (or do not divide)"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return f"dropout_p={dropout_p!r}"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return "scale is not a float"
    return _triton_why_not(query, key, value)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention with torch's semantics, (B, H, L, E) layout.

    is_causal is top-left aligned (query i sees keys j <= i), as in torch. Calls the kernel does not
    cover (an attn_mask, a value head dim that differs, float64, ...) run torch's own SDPA;
    fastnn.backends reports that choice (fastnn.backends.last_choice("flash_attention"))."""
    dev = query.device if isinstance(query, Tensor) else torch.device("cpu")
    why = _sdpa_why_not(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    b = backends.select(OP, dev, backend, why_not=_why_not_fn(why))
    if b != "triton":
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return reference.torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                    is_causal=is_causal, scale=scale, **kw)
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    sc = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out, _ = _run_triton(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         float(dropout_p), sc, bool(is_causal), False)
    out = out.transpose(1, 2)
    return out.squeeze(1) if squeeze else out


# ----------------------------------------------------------------------------- patch_sdpa

class patch_sdpa:
    """Route torch.nn.functional.scaled_dot_product_attention through fastnn (for models that call
    SDPA directly: HF transformers, timm ViTs, torch.nn.MultiheadAttention).

        with fastnn.patch_sdpa():      # for a block
            model(x)
        fastnn.patch_sdpa()            # from now on, process-wide
        fastnn.unpatch_sdpa()          # back to torch's

    Code that imported the function itself (`from torch.nn.functional import
    scaled_dot_product_attention`) before the patch keeps torch's. Calls fastnn's kernel does not
    cover run torch's original SDPA."""

    def __init__(self):
        import torch.nn.functional as F
        self._prev = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _patched_sdpa
        self._active = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self) -> None:
        if self._active:
            import torch.nn.functional as F
            F.scaled_dot_product_attention = self._prev
            self._active = False


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def unpatch_sdpa() -> None:
    """Restore torch's scaled_dot_product_attention (undoes every patch_sdpa still active)."""
    import torch.nn.functional as F
    F.scaled_dot_product_attention = reference.torch_sdpa


def sdpa_patched() -> bool:
    import torch.nn.functional as F
    return F.scaled_dot_product_attention is _patched_sdpa
