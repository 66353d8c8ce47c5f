"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
from fastnn.ops.drop_block import drop_block1d, drop_block2d, drop_block3d, drop_block_seed_mask  # noqa: F401
