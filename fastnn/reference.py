"""The pure-PyTorch reference of every op.

One reference per op, used by the tests, the benchmarks and the fallback alike.
These favour clarity and exact PyTorch semantics over speed.
"""
import torch
import torch.nn.functional as F  # noqa: F401


# ---------------------------------------------------------------- conv_bn_relu


# ---------------------------------------------------------------- flash_attention


# ---------------------------------------------------------------- cbam


# ---------------------------------------------------------------- stochastic_pool


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
    """Seed rate: gamma_scale * p * prod(size) / prod(k) / prod(size - k + 1) (timm's formula per axis)."""
    num, den = float(gamma_scale * drop_prob), 1.0
    for s, k in zip(spatial, block):
        num *= s
        den *= k * (s - k + 1)
    return num / den


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
