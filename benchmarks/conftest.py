"""Benchmark setup: device choice, CUDA-synchronized timing, the --fastnn-full sweep.

Also: collects benchmarks/bench_*.py under `pytest benchmarks`, records the device, software and
the measured commit (FASTNN_COMMIT, for copies without .git) in the benchmark JSON, and offers
the `cuda_only` fixture for references that exist only on a GPU.
"""
import os
import pathlib
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--fastnn-full", action="store_true", default=False,
                     help="run the larger benchmark sweep (also FASTNN_BENCH_FULL=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a visible CUDA GPU")


_HERE = pathlib.Path(__file__).resolve().parent


def pytest_collect_file(file_path, parent):
    # pytest's default python_files (test_*.py) misses bench_<op>.py: collect them when this folder
    # is named (`pytest benchmarks`), not on a bare `pytest` from the root (that would time them all).
    # Files named on the command line are collected by pytest itself (no duplicate here).
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.name != "bench_utils.py"
            and parent.session.isinitpath(_HERE) and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a visible CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def full_sweep(request):
    return request.config.getoption("--fastnn-full") or os.environ.get("FASTNN_BENCH_FULL") == "1"


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def cuda_only(device):
    """Request it in a benchmark that only makes sense on a GPU (e.g. an SDPA flash backend)."""
    if device != "cuda":
        pytest.skip("CUDA-only reference; this run is on the CPU")
    return device


def _software():
    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "",
            "commit": os.environ.get("FASTNN_COMMIT", "")}
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        info["device"] = torch.cuda.get_device_name(i)
    else:
        info["device"] = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import importlib.metadata as md
        info["triton"] = md.version("triton")
    except Exception:
        pass
    try:
        import fastnn
        from fastnn import _ext
        info["fastnn"] = os.path.dirname(fastnn.__file__)
        info["extension"] = ("built against torch {}, CUDA kernels {}".format(
            _ext.BUILD_INFO.get("torch_version"), "compiled" if _ext.cuda_compiled() else "not compiled")
            if _ext.EXT is not None else f"unusable: {_ext.EXT_REASON}")
    except Exception as e:  # the report still works; the header says why
        info["extension"] = f"fastnn does not import: {type(e).__name__}: {e}"
    return info


def pytest_report_header(config):
    s = _software()
    return [f"fastnn: {s.get('fastnn', '?')} | extension {s.get('extension')} | device {s['device']}"]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastnn"] = _software()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info):
    # a copy of the tree without .git (e.g. on a lent GPU machine) names its commit this way
    if os.environ.get("FASTNN_COMMIT"):
        commit_info.clear()
        commit_info.update({"id": os.environ["FASTNN_COMMIT"], "source": "FASTNN_COMMIT"})
