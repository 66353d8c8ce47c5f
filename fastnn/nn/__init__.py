"""Drop-in torch.nn modules backed by fastnn's kernels."""
from fastnn.nn.drop_block import DropBlock1d, DropBlock2d, DropBlock3d, LinearScheduler  # noqa: F401
