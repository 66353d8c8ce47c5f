"""`fastnn.info()` / `python -m fastnn info`: versions, build, device, op x backend table."""
import platform
import sys

import torch

from fastnn import _ext, backends


def _device_line() -> str:
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        return f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), {torch.cuda.device_count()} visible"
    return "no GPU visible (CPU only)"


def report() -> str:
    import fastnn

    lines = [
        f"fastnn {fastnn.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    tr = backends.triton_available()
    if tr is None:
        import importlib.metadata as md
        try:
            tv = md.version("triton")
        except md.PackageNotFoundError:
            tv = "?"
        interp = " (TRITON_INTERPRET=1: kernels run on the CPU)" if backends.triton_interpreted() else ""
        lines.append(f"triton {tv}{interp}")
    else:
        lines.append(tr)
    if _ext.BUILD_INFO:
        bi = _ext.BUILD_INFO
        lines.append("extension fastnn._C: built against torch {} | CUDA kernels {} | CUDA {} | archs {} | {} | "
                     "OpenMP {}".format(bi.get("torch_version"),
                                        "compiled" if bi.get("with_cuda") else "not compiled",
                                        bi.get("cuda_version") or "-", bi.get("cuda_archs") or "-",
                                        bi.get("compiler"), "on" if bi.get("openmp") else "off"))
    if _ext.EXT is None:
        lines.append(f"extension unusable: {_ext.EXT_REASON}")
    lines.append(f"device: {_device_line()}")
    lines.append("backends on this machine:")
    for b in backends.BACKENDS:
        r = backends.unavailable(b)
        lines.append(f"  {b:<9}  {'available' if r is None else 'unavailable: ' + r}")
    lines.append("")
    tab = backends.table()
    if not tab:
        lines.append("(no ops registered)")
        return "\n".join(lines)
    w = max(len(n) for n in tab)
    lines.append("op".ljust(w) + "  backend    status")
    for op, row in tab.items():
        for i, (b, st) in enumerate(row.items()):
            lines.append((op if i == 0 else "").ljust(w) + f"  {b:<9}  {st}")
    return "\n".join(lines)


def info() -> None:
    print(report())
