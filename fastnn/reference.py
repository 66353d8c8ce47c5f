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
