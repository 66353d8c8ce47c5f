"""Which backend runs an op, and why.

Backends: "cuda" (C++/CUDA kernels in fastnn._C), "triton" (fastnn.triton_kernels),
"cpu" (C++/OpenMP kernels in fastnn._C) and "reference" (fastnn.reference, pure PyTorch).

Each op registers, per device type, the backends it implements in order of
preference. The choice for a call is, first match wins:
  1. the op's `backend=` argument;
  2. `with fastnn.use_backend(...)` (per-op, then global);
  3. the FASTNN_BACKEND environment variable (per-op, then global);
  4. the first backend in the op's order that can run the call.
A backend asked for in 1-3 that cannot run the call raises, with the reason.
When the automatic choice has to skip a preferred backend and lands on the
reference, it warns once per (op, reason).

FASTNN_BACKEND / use_backend accept a global name ("reference"), per-op
entries ("conv_bn_relu=cpu,flash_attention=reference"), or both.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from fastnn import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")

# per-call limits of a backend: returns None if it can run the call, else the reason
WhyNot = Callable[[str], Optional[str]]


@dataclass
class OpInfo:
    name: str
    order: Dict[str, Tuple[str, ...]]  # device type -> backends in preference order
    doc: str = ""

    @property
    def backends(self) -> Tuple[str, ...]:
        seen = []
        for bs in self.order.values():
            seen += [b for b in bs if b not in seen]
        return tuple(b for b in BACKENDS if b in seen)


_OPS: Dict[str, OpInfo] = {}
_local = threading.local()
_warned: set = set()
_last: Dict[str, Tuple[str, str]] = {}


def register_op(name: str, *, cuda: Sequence[str], cpu: Sequence[str], doc: str = "") -> OpInfo:
    """Declare an op's backends per device type, best first. "reference" is always allowed last."""
    order = {}
    for dev, bs in (("cuda", cuda), ("cpu", cpu)):
        bs = tuple(bs)
        bad = [b for b in bs if b not in BACKENDS]
        if bad:
            raise ValueError(f"unknown backend(s) {bad} for op {name}")
        if "reference" not in bs:
            bs = bs + ("reference",)
        order[dev] = bs
    info = OpInfo(name, order, doc)
    _OPS[name] = info
    return info


def ops() -> Dict[str, OpInfo]:
    return dict(_OPS)


# Looked up once (cheap, does not import triton): Dynamo in torch 2.11 refuses to trace
# importlib.util.find_spec, and select() runs inside torch.compile'd code.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> Optional[str]:
    """None if triton can be imported, else the reason."""
    if not _TRITON_FOUND:
        return "triton missing (pip install triton)"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why `backend` cannot run on `device` (None if it can).

    With device=None: whether it can run on this machine at all (for `fastnn info`)."""
    dev = None if device is None else torch.device(device).type
    if backend == "reference":
        return None
    if backend == "cuda":
        if _ext.EXT is None:
            return _ext.EXT_REASON
        if not _ext.cuda_compiled():
            return "extension built without CUDA (CPU-only torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "CUDA kernels compiled, no GPU visible"
        if dev is not None and dev != "cuda":
            return f"input is on {dev}; the CUDA kernels need CUDA tensors"
        return None
    if backend == "cpu":
        if _ext.EXT is None:
            return _ext.EXT_REASON
        if dev is not None and dev != "cpu":
            return f"input is on {dev}; the CPU kernels need CPU tensors"
        return None
    if backend == "triton":
        r = triton_available()
        if r:
            return r
        if dev == "cuda" or (dev is None and torch.cuda.is_available()):
            return None if torch.cuda.is_available() else "no GPU visible"
        if triton_interpreted():
            return None
        if dev is None:
            return "no GPU visible (TRITON_INTERPRET=1 runs Triton kernels on the CPU, slowly)"
        return f"input is on {dev}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def _parse(spec: Optional[str]) -> Tuple[Optional[str], Dict[str, str]]:
    glob, per = None, {}
    if not spec:
        return glob, per
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = (s.strip() for s in part.split("=", 1))
            per[k] = v
        else:
            glob = part
    for b in [glob, *per.values()]:
        if b is not None and b not in BACKENDS:
            raise ValueError(f"FASTNN_BACKEND/use_backend: unknown backend {b!r}; choose from {BACKENDS}")
    return glob, per


def _requested(op: str) -> Tuple[Optional[str], str]:
    for glob, per in reversed(getattr(_local, "stack", [])):
        if op in per:
            return per[op], "use_backend"
        if glob is not None:
            return glob, "use_backend"
    glob, per = _parse(os.environ.get("FASTNN_BACKEND"))
    if op in per:
        return per[op], "FASTNN_BACKEND"
    return glob, "FASTNN_BACKEND"


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str):
    """`with use_backend("reference"):` or `with use_backend(conv_bn_relu="cpu"):`."""
    glob, per = _parse(backend)
    per.update(_parse(",".join(f"{k}={v}" for k, v in per_op.items()))[1])
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((glob, per))
    try:
        yield
    finally:
        stack.pop()


def warn_once(op: str, msg: str) -> None:
    key = (op, msg)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastnn.{op}: {msg}", RuntimeWarning, stacklevel=3)


def select(op: str, device, backend: Optional[str] = None, why_not: Optional[WhyNot] = None) -> str:
    """The backend that runs this call of `op` on `device`. See the module docstring."""
    info = _OPS[op]
    dev = torch.device(device).type
    source = "backend="
    if backend is None:
        backend, source = _requested(op)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"fastnn.{op}: unknown backend {backend!r} (from {source}); choose from {BACKENDS}")
        if backend not in info.backends:
            raise RuntimeError(f"fastnn.{op}: backend {backend!r} (from {source}) is not implemented for this op; "
                               f"it has {info.backends}. Name the op, e.g. FASTNN_BACKEND='{op}=reference'.")
        # `is not None`, not truthiness: Dynamo (torch 2.11) cannot branch on a closure's truth value
        reason = unavailable(backend, device) or (why_not(backend) if why_not is not None else None)
        if reason:
            raise RuntimeError(f"fastnn.{op}: backend {backend!r} was requested (from {source}) but cannot run "
                               f"this call: {reason}")
        _last[op] = (backend, f"requested by {source}")
        return backend
    order = info.order.get(dev, ("reference",))
    skipped = []
    for b in order:
        reason = unavailable(b, device) or (why_not(b) if why_not is not None and b != "reference" else None)
        if reason is None:
            if b == "reference" and skipped:
                warn_once(op, f"falling back to the PyTorch reference because {'; '.join(skipped)}")
            _last[op] = (b, "auto" + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
            return b
        skipped.append(f"{b}: {reason}")
    raise AssertionError("unreachable: reference always runs")


def last_choice(op: str) -> Optional[Tuple[str, str]]:
    """(backend, why) of the op's most recent call in this process, for reports and tests."""
    return _last.get(op)


def table(device=None) -> Dict[str, Dict[str, str]]:
    """op -> backend -> "available" / "unavailable: reason" / "not implemented"."""
    out = {}
    for name, info in sorted(_OPS.items()):
        row = {}
        for b in BACKENDS:
            if b not in info.backends:
                row[b] = "not implemented"
            else:
                r = unavailable(b, device)
                row[b] = "available" if r is None else f"unavailable: {r}"
        out[name] = row
    return out
