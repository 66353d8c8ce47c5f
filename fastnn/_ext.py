"""Loads the compiled extension fastnn._C and checks it matches the running torch.

Importing _C runs the C++ TORCH_LIBRARY registrations (torch.ops.fastnn.*).
`EXT` is the module, or None; `EXT_REASON` says why it is missing.
"""
import warnings

import torch

EXT = None
EXT_REASON = None
BUILD_INFO: dict = {}

_FIX = "reinstall fastnn against this torch with `pip install --no-build-isolation .`"

try:
    from fastnn import _C as _mod
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    msg = str(e)
    if "undefined symbol" in msg or "version" in msg.lower():
        EXT_REASON = f"extension fastnn._C does not load with torch {torch.__version__} ({msg}); {_FIX}"
    else:
        EXT_REASON = f"extension fastnn._C is not built ({msg}); build it with `pip install .`"
        import os
        _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(_root, "setup.py")):  # a checkout that shadows the installed fastnn
            EXT_REASON += (f". This fastnn is the unbuilt source tree at {_root} (Python puts the current "
                           f"folder first on sys.path): run from another folder to use the installed fastnn, "
                           f"or build here with `python setup.py build_ext --inplace`")
else:
    BUILD_INFO = dict(_mod.build_info())
    built = BUILD_INFO.get("torch_version")
    if built != torch.__version__:
        EXT_REASON = (f"extension fastnn._C was built against torch {built} but torch {torch.__version__} "
                      f"is running; {_FIX}")
        warnings.warn(f"fastnn: {EXT_REASON}. Using the pure-PyTorch reference instead.", RuntimeWarning)
    else:
        EXT = _mod


def cuda_compiled() -> bool:
    return EXT is not None and bool(BUILD_INFO.get("with_cuda"))
