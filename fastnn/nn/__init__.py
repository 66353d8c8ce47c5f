"""Drop-in torch.nn modules backed by fastnn's kernels."""
from fastnn.nn.cbam import CBAM, ChannelAttention, SpatialAttention  # noqa: F401
