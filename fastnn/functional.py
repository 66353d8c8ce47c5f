"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
from fastnn.ops.flash_attention import flash_attn_func, scaled_dot_product_attention  # noqa: F401
from fastnn.ops.stochastic_pool import stochastic_pool2d  # noqa: F401
from fastnn.ops.conv_bn_relu import batch_norm_relu, conv_bn_relu, conv2d_bias_relu, fold_conv_bn, sync_batch_norm_relu  # noqa: F401
from fastnn.ops.cbam import cbam, cbam_channel_pool, cbam_spatial_pool  # noqa: F401
from fastnn.ops.drop_block import drop_block1d, drop_block2d, drop_block3d, drop_block_seed_mask  # noqa: F401
