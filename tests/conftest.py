"""Test setup: Triton's interpreter when no GPU, and the `cuda` marker.

TRITON_INTERPRET must be set before triton is first imported, so this runs
before fastnn (and triton) are imported by any test module.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 comparisons against references are meant at fp32 precision: cuDNN's default TF32
# convolutions (Ampere+) would put both sides ~1e-3 apart. Tests that want TF32 turn it on.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a visible CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
