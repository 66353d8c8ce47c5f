"""The foundation: extension loading, build info, backend selection, `fastnn info`."""
import subprocess
import sys
import warnings

import pytest
import torch

import fastnn
from fastnn import _ext, backends
from helpers import fastnn_home


def test_extension_loads_and_matches_torch():
    assert _ext.EXT is not None, _ext.EXT_REASON
    info = _ext.EXT.build_info()
    assert info["torch_version"] == torch.__version__
    for key in ("cuda_version", "cuda_archs", "compiler", "with_cuda", "openmp"):
        assert key in info
    # CUDA kernels are compiled exactly when torch is a CUDA build (CI forces nothing)
    if torch.version.cuda is None:
        assert not info["with_cuda"]


def test_build_info_op_through_dispatcher():
    entries = dict(kv.split("=", 1) for kv in torch.ops.fastnn.build_info())
    assert entries["torch_version"] == torch.__version__


def test_info_lists_ops_and_reasons():
    out = subprocess.run([sys.executable, "-m", "fastnn", "info"], capture_output=True, text=True, check=True,
                         cwd=fastnn_home()).stdout
    assert f"torch {torch.__version__}" in out
    for op in backends.ops():
        assert op in out
    if _ext.cuda_compiled() and not torch.cuda.is_available():
        assert "CUDA kernels compiled, no GPU visible" in out
    if not _ext.cuda_compiled():
        assert "extension built without CUDA" in out or not any(
            "cuda" in i.backends for i in backends.ops().values())


@pytest.fixture
def toy_op():
    backends.register_op("_toy", cuda=("cuda",), cpu=("cpu",))
    yield "_toy"
    backends._OPS.pop("_toy")
    backends._warned.clear()


def test_auto_selection_cpu(toy_op):
    assert backends.select(toy_op, "cpu") == "cpu"
    assert backends.last_choice(toy_op)[0] == "cpu"


def test_auto_fallback_warns_once(toy_op):
    limit = lambda b: "toy limit" if b == "cpu" else None  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"fastnn\._toy: falling back to the PyTorch reference because cpu: toy limit"):
        assert backends.select(toy_op, "cpu", why_not=limit) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select(toy_op, "cpu", why_not=limit) == "reference"  # no second warning


def test_explicit_request_that_cannot_run_raises(toy_op):
    with pytest.raises(RuntimeError, match="backend 'triton'.*not implemented"):
        backends.select(toy_op, "cpu", backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="requested.*cannot run this call"):
            backends.select(toy_op, "cpu", backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.select(toy_op, "cpu", backend="fast")


def test_context_manager_and_env(toy_op, monkeypatch):
    with fastnn.use_backend("reference"):
        assert backends.select(toy_op, "cpu") == "reference"
        with fastnn.use_backend(_toy="cpu"):
            assert backends.select(toy_op, "cpu") == "cpu"
    monkeypatch.setenv("FASTNN_BACKEND", "cpu,_toy=reference")
    assert backends.select(toy_op, "cpu") == "reference"
    monkeypatch.setenv("FASTNN_BACKEND", "_other=cpu")
    assert backends.select(toy_op, "cpu") == "cpu"
    monkeypatch.setenv("FASTNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.select(toy_op, "cpu")


def test_table_reasons(toy_op):
    row = backends.table()["_toy"]
    assert row["triton"] == "not implemented"
    assert row["cpu"] == "available"
    if not torch.cuda.is_available():
        assert row["cuda"].startswith("unavailable: ")


def test_triton_reason_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backends.triton_available() is None:
        assert "TRITON_INTERPRET=1" in backends.unavailable("triton", torch.device("cpu"))
