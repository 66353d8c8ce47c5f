"""Benchmark setup: device choice, CUDA-synchronized timing, the --fastnn-full sweep."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--fastnn-full", action="store_true", default=False,
                     help="run the larger benchmark sweep (also FASTNN_BENCH_FULL=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a visible CUDA GPU")


@pytest.fixture(scope="session")
def full_sweep(request):
    return request.config.getoption("--fastnn-full") or os.environ.get("FASTNN_BENCH_FULL") == "1"


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
