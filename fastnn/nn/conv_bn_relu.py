"""Drop-in Conv2d -> BatchNorm2d (-> ReLU) blocks backed by fastnn's fused kernels.

State dict mapping
------------------
Each block holds two submodules, ``conv`` (an ``nn.Conv2d``) and ``bn`` (an ``nn.BatchNorm2d``), so the
state dict of ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())`` maps onto it key for key::

    '0.weight'  -> 'conv.weight'          '1.weight'       -> 'bn.weight'
    '0.bias'    -> 'conv.bias'            '1.bias'         -> 'bn.bias'
                                          '1.running_mean' -> 'bn.running_mean'
                                          '1.running_var'  -> 'bn.running_var'
                                          '1.num_batches_tracked' -> 'bn.num_batches_tracked'

i.e. ``'0.*' -> 'conv.*'`` and ``'1.*' -> 'bn.*'`` (the ReLU has no state). ``load_state_dict`` accepts
either naming directly; ``remap_sequential_state_dict`` converts a whole model's state dict.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastnn.nn._hooks import must_run_submodules, own_hooks
from fastnn.ops import conv_bn_relu as _ops

__all__ = ["ConvBNReLU2d", "ConvBN2d", "convert_sync_batchnorm", "remap_sequential_state_dict"]


def remap_sequential_state_dict(state_dict: Dict[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
    """Renames the keys of an ``nn.Sequential(Conv2d, BatchNorm2d[, ReLU])`` found at `prefix`
    (``prefix + '0.*'`` / ``prefix + '1.*'``) to a fastnn block's (``prefix + 'conv.*'`` / ``prefix + 'bn.*'``).

    Other keys are kept. Returns a new dict."""
    out = {}
    pat = re.compile(re.escape(prefix) + r"([01])\.(.+)$")
    for k, v in state_dict.items():
        m = pat.match(k)
        if m:
            k = prefix + ("conv." if m.group(1) == "0" else "bn.") + m.group(2)
        out[k] = v
    return out


def _sequential_keys_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # load_state_dict(nn.Sequential(conv, bn, relu).state_dict()) works directly
    if (prefix + "0.weight") in state_dict and (prefix + "conv.weight") not in state_dict:
        for k in [k for k in state_dict if k.startswith(prefix + "0.") or k.startswith(prefix + "1.")]:
            rest = k[len(prefix):]
            state_dict[prefix + ("conv." if rest[0] == "0" else "bn.") + rest[2:]] = state_dict.pop(k)


class _ConvBNBase(nn.Module):
    _relu = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, padding_mode: str = "zeros", device=None,
                 dtype=None, *, sync_stats: bool = False, process_group=None, backend: Optional[str] = None):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._setup(conv, bn, sync_stats, process_group, backend)

    def _setup(self, conv, bn, sync_stats, process_group, backend):
        self.conv = conv
        self.bn = bn
        self.sync_stats = sync_stats  # all-reduce the batch statistics over process_group (SyncBatchNorm)
        self.process_group = process_group
        self.backend = backend  # None: automatic; "reference" runs plain PyTorch
        self._fold_key = None
        self._fold = None
        self._fold_refs = None
        self._register_load_state_dict_pre_hook(_sequential_keys_hook)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: Optional[nn.Module] = None, *,
                     sync_stats: bool = False, process_group=None):
        """A block around existing modules: it shares (does not copy) their parameters and buffers."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv.out_channels ({conv.out_channels}) must equal bn.num_features ({bn.num_features})")
        if relu is not None:
            if not cls._relu:
                raise ValueError(f"{cls.__name__} has no ReLU; pass relu=None or use ConvBNReLU2d")
            if not isinstance(relu, nn.ReLU):
                raise TypeError(f"relu must be an nn.ReLU or None, got {type(relu).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(conv, bn, sync_stats, process_group, None)
        return self

    def extra_repr(self) -> str:
        s = f"relu={self._relu}"
        if self.sync_stats:
            s += ", sync_stats=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    def invalidate_fold_cache(self) -> None:
        """Forget the folded eval weights. Needed only after changing parameters through ``.data``
        (which bypasses the version counters the cache watches)."""
        self._fold_key = None
        self._fold = None
        self._fold_refs = None

    # -- eval: BN folded into the conv, cached until a parameter or buffer changes
    def _folded(self, c, b, ts, differentiable: bool):
        """The folded (weight, bias). `ts` = (conv weight, conv bias, running_mean, running_var, bn weight,
        bn bias), fetched once by the caller (module attribute lookups are slow on this per-call path)."""
        if differentiable or torch.compiler.is_compiling():
            return _ops.fold_conv_bn(ts[0], ts[1], ts[2], ts[3], b.eps, ts[4], ts[5])
        # In-place updates (optimizer steps, load_state_dict) bump _version; new tensors change data_ptr.
        # One flat list, built without generators: this runs on every eval call.
        key = [b.eps]
        for t in ts:
            if t is None:
                key.append(None)
                continue
            if t.is_inference():  # no version counter to watch: fold every call
                return _ops.fold_conv_bn(ts[0], ts[1], ts[2], ts[3], b.eps, ts[4], ts[5])
            key += (t._version, t.data_ptr(), t.dtype, t.device, t.shape)
        if key != self._fold_key:
            with torch.no_grad():
                self._fold = _ops.fold_conv_bn(ts[0], ts[1], ts[2], ts[3], b.eps, ts[4], ts[5])
            self._fold_key = key
            # Holding the keyed tensors keeps their data_ptr from being reused: a weight computed afresh on
            # each access (a parametrization such as weight_norm) could otherwise land where the last one
            # was freed, with the same version 0, and match a stale key.
            self._fold_refs = ts
        return self._fold

    def _eval_forward(self, input: Tensor, c: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
        if _ops._backend(input, self.backend) == "reference":
            return self._reference_forward(input)
        ts = (c.weight, c.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or any(
            ts[i] is not None and ts[i].requires_grad for i in (0, 1, 4, 5)))
        w, bias = self._folded(c, bn, ts, differentiable=needs_grad)
        padding = c.padding
        if c.padding_mode != "zeros":
            input = nn.functional.pad(input, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            padding = 0
        return _ops.conv2d_bias_relu(input, w, bias, c.stride, padding, c.dilation, c.groups, relu=self._relu)

    def _reference_forward(self, input: Tensor) -> Tensor:
        y = self.bn(self.conv(input))
        return torch.relu(y) if self._relu else y

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 4:  # BatchNorm2d's check and message
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if not input.is_floating_point():  # else F.conv2d's "expected scalar type Long but found Float"
            raise TypeError(f"input must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                            f"got {input.dtype}; convert it with input.float()")
        conv, bn = self.conv, self.bn
        if self.backend == "reference":
            return self._reference_forward(input)
        training = bn.training
        if must_run_submodules(_ops.OP, conv, bn):
            # hooks on the submodules (torch.nn.utils.prune's pre-hook recomputes conv.weight, say) run only
            # when the submodules themselves are called
            if not (self.sync_stats and training and self._world_size() > 1):
                return self._reference_forward(input)  # (one process: plain BN is SyncBatchNorm's result)
            if own_hooks(bn):
                raise NotImplementedError(f"{type(self).__name__}(sync_stats=True) does not run hooks registered on "
                                          f"its bn submodule when it syncs; register them on the block instead")
            # else the synced path below calls self.conv, so the conv's hooks run
        if not training and not (bn.running_mean is None and bn.running_var is None):
            return self._eval_forward(input, conv, bn)
        # BatchNorm2d.forward's bookkeeping, in effect. With a momentum, num_batches_tracked is incremented
        # by the same C++ call that updates the running statistics (cheap on the host); the cumulative
        # average (momentum=None) needs the new count on the host first, as BatchNorm2d does.
        track = training and bn.track_running_stats
        nbt = bn.num_batches_tracked if track else None
        if bn.momentum is None:
            eaf = 0.0
            if nbt is not None:
                nbt.add_(1)
                eaf = 1.0 / float(nbt)
                nbt = None
        else:
            eaf = bn.momentum
        # eval without running statistics normalizes with the batch statistics and updates nothing
        running_mean = bn.running_mean if track else None
        running_var = bn.running_var if track else None
        y = self.conv(input)
        if self.sync_stats and training and self._world_size() > 1:
            if nbt is not None:
                nbt.add_(1)
            return _ops.sync_batch_norm_relu(y, running_mean, running_var, bn.weight, bn.bias, eaf, bn.eps,
                                             self._relu, self.process_group)
        return _ops._module_train(y, running_mean, running_var, nbt, bn.weight, bn.bias, eaf, bn.eps, self._relu,
                                  self.backend)

    def _world_size(self) -> int:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group if self.process_group is not None else dist.group.WORLD)


class ConvBNReLU2d(_ConvBNBase):
    """``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())`` as one fused block.

    Same arguments as nn.Conv2d (``bias`` defaults to False) and nn.BatchNorm2d (eps, momentum, affine,
    track_running_stats), and exactly their semantics in train() and eval(): running statistics with
    momentum (or a cumulative average for ``momentum=None``), unbiased running_var, num_batches_tracked.

    Training: conv (cuDNN/oneDNN), then one fused BatchNorm+ReLU kernel; its backward fuses the ReLU
    mask into the BatchNorm backward, and only the conv output and per-channel statistics are saved.
    Eval: BatchNorm folded into the conv weight/bias (cached, refolded when any parameter or buffer
    changes) and the conv runs with a fused bias+ReLU epilogue.

    ``sync_stats=True`` (or ``convert_sync_batchnorm``) all-reduces the batch statistics over
    ``process_group`` in training, as nn.SyncBatchNorm. See the module docstring for the state-dict mapping.
    """
    _relu = True


class ConvBN2d(_ConvBNBase):
    """``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...))``: ConvBNReLU2d without the ReLU (e.g. the
    last BN of a residual branch, before the add)."""
    _relu = False


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """The analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: fastnn Conv-BN blocks get
    ``sync_stats=True`` (their ``bn`` stays an nn.BatchNorm2d, so state dicts are unchanged) and every
    other BatchNorm layer is converted by ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if isinstance(module, _ConvBNBase):
        module.sync_stats = True
        module.process_group = process_group
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
