"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
from fastnn.ops.cbam import cbam, cbam_channel_pool, cbam_spatial_pool  # noqa: F401
