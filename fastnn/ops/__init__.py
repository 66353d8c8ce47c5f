"""One module per op: the functional API, autograd and fake registration.

Importing an op module registers it with torch.library and fastnn.backends."""
from fastnn.ops import drop_block  # noqa: F401
