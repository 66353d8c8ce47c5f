"""StochasticPool2d: a drop-in pooling module (Zeiler & Fergus 2013)."""
from typing import Optional

import torch

from fastnn.ops.stochastic_pool import IntPair, check_window_args, stochastic_pool2d

__all__ = ["StochasticPool2d"]


class StochasticPool2d(torch.nn.Module):
    """Samples one element per window in training (p = a / sum(a) in mode='activation', the
    paper, which needs input >= 0; p = softmax(a) in mode='softmax'); in eval returns the
    probability-weighted average sum(p * a). Arguments and output size as nn.MaxPool2d.

        pool = fastnn.nn.StochasticPool2d(2)          # after a ReLU
        pool = fastnn.nn.StochasticPool2d(3, 2, 1, mode="softmax")
    """

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                 ceil_mode: bool = False, mode: str = "activation"):
        super().__init__()
        check_window_args(kernel_size, stride, padding, mode)  # fail at construction, not first call
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = bool(ceil_mode)
        self.mode = mode

    def forward(self, input: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return stochastic_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.mode,
                                 training=self.training, generator=generator)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, mode={self.mode!r}")
