"""Builds the one extension module, fastnn._C, with torch.utils.cpp_extension.

The CUDA sources are compiled when torch is a CUDA build and a real nvcc is
found; FASTNN_CUDA=1/0 forces either way. See README "Building" for the knobs.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_nvcc():
    """The real nvcc behind the PATH one: follows symlinks and `exec` wrapper scripts."""
    nvcc = shutil.which("nvcc")
    for _ in range(8):  # a wrapper may exec another wrapper
        if nvcc is None:
            return None
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            return nvcc
        if not head.startswith(b"#!"):
            return nvcc  # a binary: this is the compiler itself
        m = re.search(rb"exec\s+[\"']?([^\s\"']*nvcc)\b", head)
        if not m:
            return nvcc
        nvcc = m.group(1).decode()
    return nvcc


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = _real_nvcc()
    if nvcc and os.path.isfile(nvcc):
        return os.path.dirname(os.path.dirname(nvcc))
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("FASTNN_CUDA")
    have_torch_cuda = torch.version.cuda is not None
    have_nvcc = bool(_cuda_home) and os.path.isfile(os.path.join(_cuda_home, "bin", "nvcc"))
    if forced == "0":
        return False
    if forced == "1":
        if not have_torch_cuda:
            sys.exit(f"FASTNN_CUDA=1 but torch {torch.__version__} is a CPU build; "
                     "install a CUDA build of torch or set FASTNN_CUDA=0.")
        if not have_nvcc:
            sys.exit("FASTNN_CUDA=1 but no nvcc was found (looked at $CUDA_HOME and nvcc on the PATH); "
                     "install the CUDA toolkit, put nvcc on the PATH or set CUDA_HOME, or set FASTNN_CUDA=0.")
        return True
    return have_torch_cuda and have_nvcc


def _nvidia_wheel_dirs(kind):
    """site-packages/nvidia/*/{include,lib}: the CUDA headers/libs shipped in torch's nvidia-* wheels."""
    out = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
               os.path.dirname(os.path.dirname(torch.__file__))}:
        out += sorted(glob.glob(os.path.join(sp, "nvidia", "*", kind)))
    return sorted(set(d for d in out if os.path.isdir(d)))


def _stable(path, name):
    """A fixed path (build/deps/<name>) that points at `path`.

    pip's isolated build env lives under a random /tmp path; compiling through a
    stable symlink keeps compiler command lines identical between builds, so
    ccache hits (see .ci/run)."""
    link = os.path.join(ROOT, "build", "deps", name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) or os.path.exists(link):
        if os.path.realpath(link) == os.path.realpath(path):
            return link
        os.remove(link)
    os.symlink(path, link)
    return link


def _arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    return "8.0;9.0+PTX"


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/cuda/*.cu"))
    archs = _arch_list() if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns this into -gencode flags
    defines = [
        ("FASTNN_TORCH_VERSION", f'"{torch.__version__}"'),
        ("FASTNN_CUDA_VERSION", f'"{torch.version.cuda if with_cuda else ""}"'),
        ("FASTNN_CUDA_ARCHS", f'"{archs}"'),
    ]
    cxx = ["-O3", "-fopenmp"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    if with_cuda:
        defines.append(("FASTNN_WITH_CUDA", "1"))
    ctor = CUDAExtension if with_cuda else CppExtension
    ext = ctor(
        name="fastnn._C",
        sources=sources,
        define_macros=defines,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        library_dirs=_nvidia_wheel_dirs("lib") if with_cuda else [],
    )
    torch_dir = os.path.dirname(torch.__file__)
    stable_torch = _stable(torch_dir, "torch")
    ext.include_dirs = [d.replace(torch_dir, stable_torch, 1) if d.startswith(torch_dir) else d
                        for d in ext.include_dirs]
    if with_cuda:
        # The nvidia-* wheels fill in headers the toolkit may lack (cusparse.h, cublas_v2.h).
        # They go in as -isystem, searched after every -I, so the toolkit's own
        # cuda_runtime_api.h wins: torch 2.15 ships CUDA 13.2 headers, and nvcc 13.0 refuses
        # them ("CUDA compiler and CUDA toolkit headers are incompatible").
        flags = []
        for d in _nvidia_wheel_dirs("include"):
            nv_root = os.path.dirname(d)
            flags += ["-isystem", os.path.join(_stable(nv_root, "nvidia_" + os.path.basename(nv_root)), "include")]
        for key in ("cxx", "nvcc"):
            ext.extra_compile_args[key] = flags + ext.extra_compile_args[key]
    return ext


setup(
    packages=find_packages(include=["fastnn", "fastnn.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
