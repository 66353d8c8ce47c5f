"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
from fastnn.ops.stochastic_pool import stochastic_pool2d  # noqa: F401
