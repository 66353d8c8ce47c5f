"""fastnn: fused CUDA/Triton kernels behind drop-in torch.nn modules.

    import fastnn
    fastnn.info()                      # what runs here, and why
    m = fastnn.nn.ConvBNReLU2d(64, 64, 3, padding=1)
    with fastnn.use_backend("reference"): ...
"""
__version__ = "0.1.0"

from fastnn import _ext  # noqa: F401  (loads fastnn._C: registers torch.ops.fastnn.*)
from fastnn import backends  # noqa: F401
from fastnn.backends import use_backend  # noqa: F401
from fastnn import ops  # noqa: F401  (fake kernels + autograd for torch.library)
from fastnn import reference  # noqa: F401
from fastnn import functional  # noqa: F401
from fastnn import nn  # noqa: F401
from fastnn.info import info  # noqa: F401
from fastnn.ops.flash_attention import patch_sdpa, unpatch_sdpa  # noqa: F401
from fastnn.conversion import convert  # noqa: F401  (fastnn.convert(model): swap fastnn modules in)
from fastnn.conversion import ConversionReport  # noqa: F401
