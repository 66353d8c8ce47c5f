"""Drop-in torch.nn modules backed by fastnn's kernels."""
from fastnn.nn.attention import MultiheadAttention  # noqa: F401
from fastnn.nn.stochastic_pool import StochasticPool2d  # noqa: F401
from fastnn.nn.conv_bn_relu import ConvBN2d, ConvBNReLU2d, convert_sync_batchnorm, remap_sequential_state_dict  # noqa: F401
from fastnn.nn.cbam import CBAM, ChannelAttention, SpatialAttention  # noqa: F401
from fastnn.nn.drop_block import DropBlock1d, DropBlock2d, DropBlock3d, LinearScheduler  # noqa: F401
