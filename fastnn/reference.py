"""The pure-PyTorch reference of every op.

One reference per op, used by the tests, the benchmarks and the fallback alike.
These favour clarity and exact PyTorch semantics over speed.
"""
import torch
import torch.nn.functional as F  # noqa: F401


# ---------------------------------------------------------------- conv_bn_relu

def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5, relu=True):
    """BatchNorm (F.batch_norm semantics, running statistics updated in place) then ReLU."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(y) if relu else y


def conv_bn_relu(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training=False,
                 momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """Conv2d -> BatchNorm2d -> ReLU as PyTorch's modules run them (zero padding)."""
    y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    return batch_norm_relu(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, relu)


def fold_conv_bn(conv_weight, conv_bias, running_mean, running_var, eps, bn_weight=None, bn_bias=None):
    """BatchNorm folded into the conv before it: the formula of torch.nn.utils.fusion.fuse_conv_bn_weights.

    w' = w * gamma / sqrt(var + eps) (per output channel), b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in the conv weight's dtype, or float32 if that is lower; differentiable."""
    dt = conv_weight.dtype
    ct = torch.promote_types(dt, torch.float32)
    if conv_bias is None:
        conv_bias = torch.zeros_like(running_mean, dtype=ct)
    if bn_weight is None:
        bn_weight = torch.ones_like(running_mean, dtype=ct)
    if bn_bias is None:
        bn_bias = torch.zeros_like(running_mean, dtype=ct)
    scale = bn_weight.to(ct) * torch.rsqrt(running_var.to(ct) + eps)
    shape = [-1] + [1] * (conv_weight.dim() - 1)
    w = (conv_weight.to(ct) * scale.reshape(shape)).to(dt)
    b = ((conv_bias.to(ct) - running_mean.to(ct)) * scale + bn_bias.to(ct)).to(dt)
    return w, b


def bn_relu_stats(input):
    """Per-channel mean and biased variance (float64 internally; float32, or float64 for float64 input)."""
    sd = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, input.dim()))
    x = input.double()
    if input.numel() == 0:
        z = input.new_zeros(input.shape[1], dtype=sd)
        return z, z.clone()
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean.to(sd), var.to(sd)


def _bn_view(t, input):
    return t.reshape([1, -1] + [1] * (input.dim() - 2))


def bn_relu_apply(input, mean, var, weight=None, bias=None, eps=1e-5, relu=True):
    """relu?((x - mean) / sqrt(var + eps) * weight + bias), computed in the statistics dtype."""
    sd = mean.dtype
    invstd = torch.rsqrt(var.to(sd) + eps)
    alpha = invstd if weight is None else weight.to(sd) * invstd
    y = (input.to(sd) - _bn_view(mean, input)) * _bn_view(alpha, input)
    if bias is not None:
        y = y + _bn_view(bias.to(sd), input)
    if relu:
        y = F.relu(y)
    return y.to(input.dtype)


def bn_relu_backward(grad_out, input, mean, var, weight=None, bias=None, eps=1e-5, relu=True, count=None,
                     sums=None):
    """Training-mode BatchNorm(+ReLU) backward in float64: (grad_input, grad_weight, grad_bias).

    `sums` = (sum_dz, sum_dz_xmu) to use instead of the local ones (SyncBatchNorm), with `count`
    the values per channel they were taken over."""
    x = input.double()
    m = _bn_view(mean.double(), input)
    invstd = torch.rsqrt(var.double() + eps)
    w = torch.ones_like(invstd) if weight is None else weight.double()
    pre = (x - m) * _bn_view(w * invstd, input)
    if bias is not None:
        pre = pre + _bn_view(bias.double(), input)
    dz = grad_out.double()
    if relu:
        dz = torch.where(pre > 0, dz, torch.zeros_like(dz))
    dims = [0] + list(range(2, input.dim()))
    sum_dz = dz.sum(dims)
    sum_dz_xmu = (dz * (x - m)).sum(dims)
    gw, gb = sum_dz_xmu * invstd, sum_dz
    if sums is None:
        sums = (sum_dz, sum_dz_xmu)
        count = input.numel() // input.shape[1]
    s1, s2 = (s.double() for s in sums)
    k1 = w * invstd
    dx = _bn_view(k1, input) * (dz - _bn_view(s1 / count, input)
                                - (x - m) * _bn_view(invstd * invstd * s2 / count, input))
    return dx.to(input.dtype), gw, gb


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
# The tutorial formulation of CBAM in plain PyTorch ops (fastnn.nn.CBAM's default variant):
#   Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))),  x' = x * Mc
#   Ms = sigmoid([BN](conv([mean_c x', max_c x']))),   out = x' * Ms
# Ties of a max: max_ties="first" uses adaptive_max_pool2d / torch.max(dim) (the gradient goes to
# the first maximal element), "split" uses torch.amax (shared evenly among the ties, as timm does).


def cbam_channel_pool(x, max_ties="first"):
    """(mean, max) of x over H*W, each [N, C]."""
    mean = x.mean((2, 3))
    if max_ties == "first":
        mx = F.adaptive_max_pool2d(x, 1).flatten(1)
    else:
        mx = x.amax((2, 3))
    return mean, mx


def cbam_spatial_pool(x, max_ties="first"):
    """(mean, max) of x over C, each [N, 1, H, W]."""
    mean = x.mean(1, keepdim=True)
    if max_ties == "first":
        mx = torch.max(x, 1, keepdim=True)[0]
    else:
        mx = x.amax(1, keepdim=True)
    return mean, mx


def cbam_channel_gate(x, mlp_weight1, mlp_weight2, mlp_bias1=None, mlp_bias2=None, max_ties="first"):
    """sigmoid(MLP(mean_hw x) + MLP(max_hw x)) as [N, C, 1, 1]; weights [out, in] or [out, in, 1, 1]."""
    w1, w2 = mlp_weight1.flatten(1), mlp_weight2.flatten(1)
    mean, mx = cbam_channel_pool(x, max_ties)

    def mlp(v):
        return F.linear(F.relu(F.linear(v, w1, mlp_bias1)), w2, mlp_bias2)

    return torch.sigmoid(mlp(mean) + mlp(mx))[:, :, None, None]


def cbam_spatial_gate(x, conv_weight, conv_bias=None, spatial_bn=False, bn_weight=None, bn_bias=None,
                      bn_running_mean=None, bn_running_var=None, bn_training=False, bn_momentum=0.1, bn_eps=1e-5,
                      spatial_order="mean_max", max_ties="first"):
    """sigmoid([BN](conv(pooled map))) as [N, 1, H, W]; updates the BN running stats in training."""
    mean, mx = cbam_spatial_pool(x, max_ties)
    m = torch.cat([mean, mx] if spatial_order == "mean_max" else [mx, mean], 1)
    y = F.conv2d(m, conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2)
    if spatial_bn:
        y = F.batch_norm(y, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_momentum, bn_eps)
    return torch.sigmoid(y)


def cbam(x, mlp_weight1, mlp_weight2, conv_weight, *, mlp_bias1=None, mlp_bias2=None, conv_bias=None,
         spatial_bn=False, bn_weight=None, bn_bias=None, bn_running_mean=None, bn_running_var=None,
         bn_training=False, bn_momentum=0.1, bn_eps=1e-5, spatial_order="mean_max", max_ties="first"):
    """CBAM block: x' = x * Mc(x); out = x' * Ms(x'). Same arguments as fastnn.ops.cbam.cbam."""
    x = x * cbam_channel_gate(x, mlp_weight1, mlp_weight2, mlp_bias1, mlp_bias2, max_ties)
    return x * cbam_spatial_gate(x, conv_weight, conv_bias, spatial_bn, bn_weight, bn_bias, bn_running_mean,
                                 bn_running_var, bn_training, bn_momentum, bn_eps, spatial_order, max_ties)


# ---------------------------------------------------------------- stochastic_pool


def stochastic_pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Output length of one spatial dim, as nn.MaxPool2d (dilation 1); < 1 means no valid window."""
    num = size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)
    out = num // stride + 1  # floor division, like ATen's div_rtn
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _stochastic_pool_windows(input, kernel_size, stride, padding, ceil_mode):
    """Unfolded windows (N, C, kh*kw, L), their in-bounds mask (1, 1, kh*kw, L) and (OH, OW).

    Padded positions read 0 and are masked out. Bottom/right are padded (or cropped) so that the
    ceil_mode windows exist."""
    n, c, h, w = input.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh = stochastic_pool_output_size(h, kh, sh, ph, ceil_mode)
    ow = stochastic_pool_output_size(w, kw, sw, pw, ceil_mode)
    hp, wp = (oh - 1) * sh + kh, (ow - 1) * sw + kw  # extent the windows cover, padding included
    pads = (pw, wp - w - pw, ph, hp - h - ph)  # F.pad crops where an entry is negative
    x = F.pad(input, pads)
    ones = F.pad(torch.ones(1, 1, h, w, dtype=input.dtype, device=input.device), pads)
    cols = F.unfold(x, (kh, kw), stride=(sh, sw)).view(n, c, kh * kw, oh * ow)
    mask = F.unfold(ones, (kh, kw), stride=(sh, sw)).view(1, 1, kh * kw, oh * ow) > 0
    return cols, mask, oh, ow


def stochastic_pool2d(input, kernel_size, stride, padding, ceil_mode=False, mode="activation", training=True,
                      generator=None):
    """Stochastic pooling (Zeiler & Fergus 2013), unfold-based and vectorised.

    kernel_size, stride, padding: pairs. mode='activation': p_i = a_i / sum(a) (input >= 0);
    mode='softmax': p = softmax(a) over the window. Training returns one sampled element per
    window (the gradient flows to it alone); eval returns sum(p_i * a_i). An all-zero window gives
    0 (training takes its first in-bounds element, which is 0). Padded positions have p = 0.
    Samples come from torch.rand(generator=...), so they differ from the kernels' Philox draws."""
    if mode not in ("activation", "softmax"):
        raise ValueError(f"mode must be 'activation' or 'softmax', got {mode!r}")
    compiling = torch.compiler.is_compiling()
    # meta tensors have no values to check (shape inference, e.g. a model built on the meta device)
    if mode == "activation" and not compiling and input.device.type != "meta" and bool((input < 0).any()):
        raise ValueError("fastnn.stochastic_pool2d: mode='activation' samples with p_i = a_i / sum(a) and needs "
                         "input >= 0, but the input has negative values; apply a ReLU first (e.g. F.relu(x)) or "
                         "use mode='softmax'")
    n, c = input.shape[:2]
    cols, mask, oh, ow = _stochastic_pool_windows(input, kernel_size, stride, padding, ceil_mode)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    a = cols.to(acc)
    if mode == "activation":
        weights = a  # padded entries are 0
        total = weights.sum(2, keepdim=True)
        if not training:
            # sum a^2 / sum a, with sum a^2 scaled by 1 / max a so that it neither overflows (a ~ 1e20) nor
            # underflows (a ~ 1e-30) in float32; the scale is a constant for autograd
            m = a.detach().amax(2, keepdim=True)
            m = torch.where(m > 0, m, torch.ones_like(m))
            s2 = (a * (a / m)).sum(2, keepdim=True)
            # an all-zero window gives 0; a NaN (or inf / inf) window gives NaN, as the kernels
            zero = total == 0
            safe_total = torch.where(zero, torch.ones_like(total), total)
            out = torch.where(zero, torch.zeros_like(total), m * (s2 / safe_total))
    else:
        p = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=2)
        if not training:
            # zero-probability entries (padding, a = -inf) add 0, not 0 * -inf = NaN (as the kernels)
            out = torch.where(p == 0, torch.zeros_like(a), p * a).sum(2, keepdim=True)
        weights, total = p, None
    if training:
        # Inverse-CDF draw in float64: u * total < total, so a zero-weight entry is never picked.
        cdf = weights.detach().double().cumsum(2)
        total = cdf[:, :, -1:]
        u = torch.rand(total.shape, generator=generator, device=input.device, dtype=torch.float32).double()
        idx = (cdf <= u * total).sum(2, keepdim=True)
        first_valid = mask.to(torch.uint8).argmax(2, keepdim=True).expand_as(idx)
        finite = torch.isfinite(total)
        idx = torch.where(finite & (total > 0), idx, first_valid)
        out = torch.gather(cols, 2, idx)
        # NaN for a NaN total, or an inf one (an inf in activation mode: p = inf / inf), as the kernels
        out = torch.where(finite, out, torch.full_like(out, float("nan")))
    if mode == "activation" and compiling:  # no data-dependent raise in a graph: NaN, as the kernels
        out = torch.where((cols < 0).any(2, keepdim=True), torch.full_like(out, float("nan")), out)
    out = out.to(input.dtype).view(n, c, oh, ow)
    if input.dim() == 4 and input.stride(1) < input.stride(3):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# ---------------------------------------------------------------- drop_block
# DropBlock as timm 1.0.31's drop_block_2d computes it, generalized to 1-D/3-D, with the
# paper's valid_only variant. A block around a seed at s covers [s - k // 2, s + (k - 1) // 2]
# per axis (timm's convention: centred for odd k, one further back for even k), clipped to
# the map.
from typing import Optional, Sequence, Tuple, Union  # noqa: E402


def drop_block_clip(block_size: Union[int, Sequence[int]], spatial: Sequence[int]) -> Tuple[int, ...]:
    """The block size per spatial axis, clipped to the map (as timm does)."""
    bs = (block_size,) * len(spatial) if isinstance(block_size, int) else tuple(block_size)
    return tuple(min(int(b), int(s)) for b, s in zip(bs, spatial))


def drop_block_gamma(drop_prob: float, gamma_scale: float, spatial: Sequence[int], block: Sequence[int]) -> float:
    """Seed rate: gamma_scale * p * prod(size) / prod(k) / prod(size - k + 1) (timm's formula per axis),
    at most 1 (every position a seed; gamma_scale > 1 can push the formula past it, where torch's
    bernoulli_ would raise)."""
    num, den = float(gamma_scale * drop_prob), 1.0
    for s, k in zip(spatial, block):
        num *= s
        den *= k * (s - k + 1)
    return min(num / den, 1.0)


def drop_block_seeds(x: torch.Tensor, gamma: float, block: Sequence[int], couple_channels: bool = False,
                     valid_only: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bernoulli(gamma) seeds of shape (N, C or 1, *spatial), in x's dtype (timm draws them so).

    valid_only: seeds only where the whole block fits (drawn on that sub-grid, torchvision style)."""
    spatial = x.shape[2:]
    shape = (x.shape[0], 1 if couple_channels else x.shape[1])
    if not valid_only:
        return torch.empty(shape + tuple(spatial), dtype=x.dtype, device=x.device).bernoulli_(gamma, generator=generator)
    sub = torch.empty(shape + tuple(s - k + 1 for s, k in zip(spatial, block)), dtype=x.dtype,
                      device=x.device).bernoulli_(gamma, generator=generator)
    pad = []
    for s, k in reversed(list(zip(spatial, block))):
        pad += [k // 2, (k - 1) // 2]
    return F.pad(sub, pad)


def drop_block_dilate(seeds: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """1 where a unit is inside some seed's block: a stride-1 max-pool with padding k // 2, minus the
    first index of each even axis (timm's even-size fix)."""
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(block)]
    m = pool(seeds.float(), kernel_size=tuple(block), stride=1, padding=tuple(k // 2 for k in block))
    idx = (Ellipsis,) + tuple(slice((k + 1) % 2, None) for k in block)
    return m[idx].to(seeds.dtype)


def drop_block_scale(numel: int, kept: int) -> torch.Tensor:
    """numel / (kept + 1e-7) in float32, exactly as timm computes it (int / tensor is
    tensor.reciprocal() * int in torch)."""
    return numel / (torch.tensor(float(kept), dtype=torch.float32) + 1e-7)


def drop_block_from_seeds(x: torch.Tensor, seeds: torch.Tensor, block: Sequence[int], with_noise: bool = False,
                          scale_by_keep: bool = True, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DropBlock of x given its seed mask. Kept units are scaled in float32 (float64 for float64 x)
    and rounded once; with_noise puts `noise` (default N(0, 1) of the seeds' shape, so shared by
    coupled channels) into the dropped units, unscaled."""
    plane = drop_block_dilate(seeds, block).to(torch.bool)  # (N, C or 1, *spatial), as timm's mask
    dropped = plane.expand(x.shape)
    keep = (~dropped).to(x.dtype)
    if with_noise:
        if noise is None:
            noise = torch.randn(seeds.shape, dtype=x.dtype, device=x.device)
        return x * keep + noise.expand(x.shape) * dropped.to(x.dtype)
    if not scale_by_keep:
        return x * keep
    s = drop_block_scale(plane.numel(), int((~plane).sum()))
    op = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(op) * (keep.to(op) * s.to(device=x.device, dtype=op))).to(x.dtype)


def drop_block(x: torch.Tensor, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7,
               gamma_scale: float = 1.0, with_noise: bool = False, couple_channels: bool = False,
               scale_by_keep: bool = True, valid_only: bool = False, training: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DropBlock of an (N, C, *spatial) tensor with 1-3 spatial axes. With couple_channels=True,
    valid_only=False and a float32 input this equals timm's drop_block_2d under the same RNG state."""
    if not training or drop_prob == 0:
        return x
    block = drop_block_clip(block_size, x.shape[2:])
    gamma = drop_block_gamma(drop_prob, gamma_scale, x.shape[2:], block)
    with torch.no_grad():
        seeds = drop_block_seeds(x, gamma, block, couple_channels, valid_only, generator)
        noise = None
        if with_noise:  # timm draws it with the mask's shape: shared across coupled channels
            noise = torch.empty(seeds.shape, dtype=x.dtype, device=x.device).normal_(generator=generator)
    return drop_block_from_seeds(x, seeds, block, with_noise, scale_by_keep, noise)
