"""DropBlock modules and the paper's linear drop_prob schedule."""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch
from torch import nn

from fastnn.ops import drop_block as _ops


class _DropBlockNd(nn.Module):
    _nd = 2
    _fn = staticmethod(_ops.drop_block2d)

    def __init__(self, drop_prob: float = 0.1, block_size: Union[int, Sequence[int]] = 7, gamma_scale: float = 1.0,
                 with_noise: bool = False, couple_channels: bool = False, scale_by_keep: bool = True,
                 valid_only: bool = False, inplace: bool = False):
        super().__init__()
        name = type(self).__name__
        if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real) or not 0 <= drop_prob <= 1:
            raise ValueError(f"{name}: drop_prob must be a number in [0, 1], got {drop_prob!r}")
        _ops._block_tuple(block_size, self._nd, name)
        if isinstance(gamma_scale, bool) or not isinstance(gamma_scale, numbers.Real) or not gamma_scale >= 0:
            raise ValueError(f"{name}: gamma_scale must be a number >= 0, got {gamma_scale!r}")
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.gamma_scale = gamma_scale
        self.with_noise = with_noise
        self.couple_channels = couple_channels
        self.scale_by_keep = scale_by_keep
        self.valid_only = valid_only
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.drop_prob:
            return x
        return self._fn(x, self.drop_prob, self.block_size, self.gamma_scale, self.with_noise, self.couple_channels,
                        self.scale_by_keep, self.valid_only, self.inplace, True)

    def extra_repr(self) -> str:
        s = f"drop_prob={self.drop_prob}, block_size={self.block_size}"
        for k, default in (("gamma_scale", 1.0), ("with_noise", False), ("couple_channels", False),
                           ("scale_by_keep", True), ("valid_only", False), ("inplace", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s


class DropBlock1d(_DropBlockNd):
    """DropBlock on (N, C, L): contiguous blocks of `block_size` steps. See fastnn.ops.drop_block."""
    _nd = 1
    _fn = staticmethod(_ops.drop_block1d)


class DropBlock2d(_DropBlockNd):
    """DropBlock (Ghiasi et al. 2018) on (N, C, H, W). Defaults reproduce timm's DropBlock2d
    distribution except couple_channels (False here: one mask per channel, as in the TF
    reference; timm's default is True). See fastnn.ops.drop_block for the semantics.

    DropBlock2d.from_module(timm.layers.DropBlock2d(...)) copies a timm module, including its
    couple_channels setting."""
    _nd = 2
    _fn = staticmethod(_ops.drop_block2d)

    @classmethod
    def from_module(cls, module: nn.Module) -> "DropBlock2d":
        missing = [a for a in ("drop_prob", "block_size", "gamma_scale", "with_noise", "inplace")
                   if not hasattr(module, a)]
        if missing:
            raise TypeError(f"DropBlock2d.from_module expects a timm DropBlock2d (with drop_prob, block_size, "
                            f"gamma_scale, with_noise, inplace), got {type(module).__name__} without {missing}")
        m = cls(drop_prob=module.drop_prob, block_size=module.block_size, gamma_scale=module.gamma_scale,
                with_noise=module.with_noise, couple_channels=getattr(module, "couple_channels", True),
                scale_by_keep=getattr(module, "scale_by_keep", True), inplace=module.inplace)
        m.train(module.training)
        return m


class DropBlock3d(_DropBlockNd):
    """DropBlock on (N, C, D, H, W): cubes of `block_size` (or one size per axis)."""
    _nd = 3
    _fn = staticmethod(_ops.drop_block3d)


class LinearScheduler(nn.Module):
    """Ramps a DropBlock module's drop_prob linearly, as in the paper (and the `dropblock`
    package): the values are linspace(start_value, stop_value, nr_steps); construction sets the
    first, each step() moves to the next, and after nr_steps - 1 steps it stays at stop_value.
    forward(x) calls the wrapped module. The step count is saved in state_dict."""

    def __init__(self, dropblock: nn.Module, start_value: float, stop_value: float, nr_steps: int):
        super().__init__()
        if not hasattr(dropblock, "drop_prob"):
            raise TypeError(f"LinearScheduler: dropblock must have a drop_prob attribute, "
                            f"got {type(dropblock).__name__}")
        for n, v in (("start_value", start_value), ("stop_value", stop_value)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
                raise ValueError(f"LinearScheduler: {n} must be a number in [0, 1], got {v!r}")
        if isinstance(nr_steps, bool) or not isinstance(nr_steps, numbers.Integral) or nr_steps < 1:
            raise ValueError(f"LinearScheduler: nr_steps must be an int >= 1, got {nr_steps!r}")
        self.dropblock = dropblock
        self.start_value = float(start_value)
        self.stop_value = float(stop_value)
        self.nr_steps = int(nr_steps)
        self.i = 0
        self._set()

    def value(self, i: int) -> float:
        """drop_prob after i steps."""
        i = min(i, self.nr_steps - 1)
        if self.nr_steps == 1:
            return self.stop_value
        return self.start_value + (self.stop_value - self.start_value) * i / (self.nr_steps - 1)

    def _set(self):
        self.dropblock.drop_prob = self.value(self.i)

    def step(self) -> None:
        self.i = min(self.i + 1, self.nr_steps - 1)
        self._set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropblock(x)

    def get_extra_state(self):
        return {"i": self.i}

    def set_extra_state(self, state):
        self.i = int(state["i"])
        self._set()

    def extra_repr(self) -> str:
        return f"start_value={self.start_value}, stop_value={self.stop_value}, nr_steps={self.nr_steps}, i={self.i}"
