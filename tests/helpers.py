"""Shared test helpers (import as `from helpers import ...`)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Parametrize a test over devices; CUDA cases carry the `cuda` marker (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOWP = [torch.float16, torch.bfloat16]


def assert_lowp_close(out, ref32, torch_lowp, factor=2.0, atol=1e-5, what="output"):
    """flash-attention's rule: a low-precision result passes when its max error against an
    fp32 (or fp64) reference is at most `factor` x PyTorch's own error in the same dtype, + atol."""
    ref = ref32.double()
    err = (out.double() - ref).abs().max().item()
    base = (torch_lowp.double() - ref).abs().max().item()
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), f"{what}: non-finite mismatch"
    assert err <= factor * base + atol, f"{what}: max error {err:.3e} > {factor} x torch's {base:.3e} + {atol:g}"


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    buf = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


def fastnn_home() -> str:
    """The folder holding the fastnn package these tests imported (site-packages after
    `pip install .`, the checkout for an in-place build). Subprocesses run there, so they import
    the same fastnn, never the source tree's unbuilt copy."""
    import os

    import fastnn
    return os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
