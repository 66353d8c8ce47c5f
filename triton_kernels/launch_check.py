"""Compile Triton launches for a GPU without having one (used by each op's `compile_check`).

CI has no GPU and the interpreter skips Triton's lowering, so type errors there surface only on
a real device. Each op's launchers run on meta tensors with `wrap_triton` swapped for a recorder;
every recorded launch is then compiled with the specialization a real launch would get.
"""
import contextlib
from typing import Dict, List, Tuple

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@contextlib.contextmanager
def record_launches(module, attr: str):
    """Replaces `module.<attr>` (the op's `wrap_triton`) with a recorder for the `with` block;
    yields the list that collects (kernel, args, kwargs) per launch, in order."""
    records: List[tuple] = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: records.append((self.fn, args, kw))

    saved = getattr(module, attr)
    setattr(module, attr, _Recorder)
    try:
        yield records
    finally:
        setattr(module, attr, saved)


def launch_signature(fn, args, kw, float_type: str = "fp32") -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one recorded launch, as Triton's launcher
    specializes it: 16-byte aligned pointers, ints divisible by 16 and ints equal to 1 as
    constants, except for the arguments the kernel marks do_not_specialize. Python floats are
    typed `float_type` (Triton's launcher: fp32; Inductor, for user kernels: fp64)."""
    kw = dict(kw)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    dns = set(getattr(fn, "do_not_specialize", ()))
    sig: Dict[str, str] = {}
    consts: dict = {}
    attrs: dict = {}
    for i, name in enumerate(fn.arg_names):
        v = kw[name] if name in kw else args[i]
        specialize = name not in dns and i not in dns
        if name in kw:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + _TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = float_type
        elif v == 1 and specialize:
            sig[name], consts[(i,)] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0 and specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, opts


def ast_source(fn, sig: dict, consts: dict, attrs: dict):
    from triton.compiler import ASTSource
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def gpu_target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def error_chain(e: BaseException) -> str:
    """The error and its causes (Triton chains the errors of nested calls)."""
    chain = []
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\n".join(chain)
