"""Drop-in torch.nn modules backed by fastnn's kernels."""
from fastnn.nn.attention import MultiheadAttention  # noqa: F401
