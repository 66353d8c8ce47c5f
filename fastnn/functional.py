"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
from fastnn.ops.conv_bn_relu import batch_norm_relu, conv_bn_relu, conv2d_bias_relu, fold_conv_bn, sync_batch_norm_relu  # noqa: F401
