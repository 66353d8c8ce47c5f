"""The pure-PyTorch reference of every op.

One reference per op, used by the tests, the benchmarks and the fallback alike.
These favour clarity and exact PyTorch semantics over speed.
"""
import torch
import torch.nn.functional as F  # noqa: F401


# ---------------------------------------------------------------- conv_bn_relu


# ---------------------------------------------------------------- flash_attention
import math  # noqa: E402

# torch's own SDPA, kept even while fastnn.patch_sdpa() routes F.scaled_dot_product_attention to fastnn
torch_sdpa = F.scaled_dot_product_attention


def attention_math(q, k, v, *, scale=None, causal=False, causal_shift=0, attn_mask=None, keep=None, dropout_p=0.0):
    """softmax(q k^T * scale [+ mask]) [* keep / (1 - p)] v, materialized, in the inputs' dtype
    (pass float32/float64 for a reference). Layout (B, H, S, D); GQA by repeating k/v heads.

    causal: key j is visible to query i iff j <= i + causal_shift (0: top-left, Sk - Sq: bottom-right).
    attn_mask: bool (True = visible) or additive float, broadcastable to (B, H, Sq, Sk).
    keep: bool dropout keep-mask (B, H, Sq, Sk). Rows with no visible key give 0 and lse -inf.
    Returns (out (B, H, Sq, Dv), lse (B, H, Sq))."""
    h, hkv = q.shape[-3], k.shape[-3]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=-3)
        v = v.repeat_interleave(h // hkv, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_shift, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)[..., None]
    p = torch.where(empty, torch.zeros_like(s), torch.exp(s - lse[..., None]))
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, v), lse


def flash_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_lse=False):
    """flash_attn_func's semantics in (B, S, H, D) layout: bottom-right causal, GQA, optional lse.

    Runs torch's SDPA (its CPU flash kernel) when it can; the log-sum-exp and the rows a
    bottom-right mask leaves empty take the materialized path. Dropout uses torch's RNG."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if return_lse or (causal and sq > sk):
        keep = None
        if dropout_p > 0.0:
            keep = torch.rand(q.shape[0], q.shape[2], sq, sk, device=q.device) >= dropout_p
        out, lse = attention_math(qt, kt, vt, scale=scale, causal=causal, causal_shift=sk - sq, keep=keep,
                                  dropout_p=dropout_p)
        out = out.transpose(1, 2).to(q.dtype)
        return (out, lse.float()) if return_lse else out
    mask = None
    if causal and sq != sk:  # bottom-right: an explicit mask (top-left, torch's is_causal, when sq == sk)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    kw = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    out = torch_sdpa(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                     is_causal=causal and sq == sk, **kw)
    return out.transpose(1, 2)



# ---------------------------------------------------------------- cbam


# ---------------------------------------------------------------- stochastic_pool


# ---------------------------------------------------------------- drop_block
