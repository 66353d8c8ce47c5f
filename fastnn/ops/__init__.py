"""One module per op: the functional API, autograd and fake registration.

Importing an op module registers it with torch.library and fastnn.backends."""
from fastnn.ops import flash_attention  # noqa: F401
from fastnn.ops.stochastic_pool import stochastic_pool2d  # noqa: F401
from fastnn.ops import conv_bn_relu  # noqa: F401
from fastnn.ops import cbam  # noqa: F401
from fastnn.ops import drop_block  # noqa: F401
