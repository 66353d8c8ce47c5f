"""fastnn.convert: put fastnn's modules into a model that already exists.

    model = fastnn.convert(model)                 # a converted copy; the input is left as it was
    print(model.fastnn_report)                    # what was replaced, what was not and why

What is replaced (``ops`` selects; the default is all four):

  "conv_bn_relu"  Conv2d -> BatchNorm2d -> ReLU and Conv2d -> BatchNorm2d become ConvBNReLU2d / ConvBN2d.
                  Inside nn.Sequential by walking the modules. In a module whose own forward calls
                  them (torchvision's BasicBlock: self.conv1, self.bn1, self.relu) by tracing that
                  forward with torch.fx (children kept as leaves) and rewriting the graph: only where
                  the conv output has exactly one user (the BatchNorm), and the ReLU (an nn.ReLU
                  module, F.relu, torch.relu or .relu()) is fused only when it is the BatchNorm
                  output's one user (nn.Identity calls between them are skipped over). The call site
                  is rewritten, never a module: a ReLU module used three times in a block stays for
                  its other calls. Such a module keeps its object, state, hooks and methods; its
                  class becomes a subclass of the same name whose forward is the rewritten graph
                  (``type(m)._fastnn_fx_code`` shows it). The fused block takes the conv's
                  attribute and the BatchNorm's becomes nn.Identity, so other methods that run
                  conv -> bn -> relu (timm's forward_features) still give the same values.
  "cbam"          timm's CbamModule and tutorial-style CBAM modules become fastnn.nn.CBAM
                  (CBAM.from_module); each is checked on a probe input before it is swapped in.
  "drop_block"    timm's DropBlock2d becomes fastnn.nn.DropBlock2d (DropBlock2d.from_module).
  "attention"     nn.MultiheadAttention (also inside nn.TransformerEncoderLayer/DecoderLayer)
                  becomes fastnn.nn.MultiheadAttention. Modules that call
                  F.scaled_dot_product_attention themselves are listed in the report with a pointer
                  to fastnn.patch_sdpa().

State. Parameters and buffers are the input's own tensors (inplace=True) or those of a deep copy
(inplace=False), never re-initialised. Fusing moves a conv and its BatchNorm into one block, so
their state_dict keys change: ``conv1.weight`` -> ``conv1.conv.weight`` and ``bn1.*`` ->
``conv1.bn.*``. The report holds the mapping:

    original.load_state_dict(fastnn.conversion.original_state_dict(converted))   # converted -> plain
    fastnn.conversion.load_original_state_dict(converted, original.state_dict()) # plain -> converted

(or ``report.to_original_keys(sd)`` / ``report.from_original_keys(sd)`` on any state dict).
CBAM, DropBlock and MultiheadAttention keep their keys.
"""
from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fastnn.nn._hooks import global_hooks, own_hooks

OPS = ("conv_bn_relu", "cbam", "drop_block", "attention")

__all__ = ["convert", "ConversionReport", "Replacement", "Skipped", "original_state_dict",
           "load_original_state_dict", "OPS"]

_REPORT_ATTR = "fastnn_report"


# ----------------------------------------------------------------------------- the report

@dataclass
class Replacement:
    path: str           # where the new module is, relative to the converted model ("" = the model)
    old: str            # what was there: a type, or "Conv2d -> BatchNorm2d -> ReLU"
    new: str            # the fastnn type
    op: str             # one of OPS
    found_by: str       # "fx" (graph rewrite), "module walk" (nn.Sequential runs, module types)
    detail: str = ""    # e.g. the BatchNorm / ReLU that were folded in


@dataclass
class Skipped:
    path: str
    type: str
    op: str
    reason: str


@dataclass
class ConversionReport:
    """What fastnn.convert did. ``print(report)`` gives a table.

    replacements   Replacement(path, old, new, op, found_by, detail) per new module
    skipped        Skipped(path, type, op, reason) per candidate left as it was
    fallbacks      (path, type, reason): modules whose forward torch.fx could not trace (or that
                   convert would not trace); only the module walk ran there
    rewritten      (path, type): modules whose forward was rewritten with torch.fx
    notes          other things worth knowing (direct SDPA calls, fast paths)
    key_map        converted module path -> original module path, for the fused blocks' state
    """
    ops: Tuple[str, ...] = OPS
    replacements: List[Replacement] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    fallbacks: List[Tuple[str, str, str]] = field(default_factory=list)
    rewritten: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    key_map: Dict[str, str] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        """Number of replacements per new type, e.g. {'ConvBNReLU2d': 9, 'ConvBN2d': 11}."""
        return dict(Counter(r.new for r in self.replacements))

    def __len__(self) -> int:
        return len(self.replacements)

    def __repr__(self) -> str:
        c = ", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items()))
        return f"<ConversionReport: {len(self.replacements)} replacements ({c}), {len(self.skipped)} skipped>"

    # -- state dict keys
    def to_original_keys(self, state_dict, prefix: str = ""):
        """A state dict of the converted model with the original model's keys (same tensors).
        `prefix`: where the converted model sits in the state dict (e.g. "backbone.")."""
        return _remap_keys(state_dict, self.key_map, prefix)

    def from_original_keys(self, state_dict, prefix: str = ""):
        """A state dict of the original (unconverted) model with the converted model's keys."""
        return _remap_keys(state_dict, {v: k for k, v in self.key_map.items()}, prefix)

    # -- printing
    def __str__(self) -> str:
        c = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items())) or "nothing"
        lines = [f"fastnn.convert (ops: {', '.join(self.ops)}): {len(self.replacements)} replacements "
                 f"({c}), {len(self.skipped)} skipped"]
        if self.replacements:
            lines.append("")
            lines += _table(["path", "was", "now", "found by", "detail"],
                            [[r.path or "<model>", r.old, r.new, r.found_by, r.detail] for r in self.replacements])
        if self.rewritten:
            lines.append("")
            lines.append("forwards rewritten with torch.fx: " +
                         ", ".join(f"{p or '<model>'} ({t})" for p, t in self.rewritten))
        if self.skipped:
            lines.append("")
            lines.append("skipped:")
            lines += _table(["path", "type", "op", "reason"],
                            [[s.path or "<model>", s.type, s.op, s.reason] for s in self.skipped])
        if self.fallbacks:
            lines.append("")
            lines.append("not traced (module walk only there):")
            lines += _table(["path", "type", "reason"], [[p or "<model>", t, r] for p, t, r in self.fallbacks])
        if self.notes:
            lines.append("")
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        if self.key_map:
            lines.append("")
            lines.append(f"state_dict: {len(self.key_map)} module paths differ from the original's; "
                         f"fastnn.conversion.original_state_dict(model) gives the original keys")
        return "\n".join(lines)


def _table(header, rows, width=60):
    rows = [[str(c) if len(str(c)) <= width else str(c)[:width - 3] + "..." for c in r] for r in rows]
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  " + "  ".join("{:<%d}" % n for n in w)
    return [fmt.format(*header).rstrip(), fmt.format(*["-" * n for n in w]).rstrip()] + \
           [fmt.format(*r).rstrip() for r in rows]


def _remap_keys(state_dict, mapping: Dict[str, str], prefix: str):
    # A parameter/buffer key is <module path>.<name>; only exact module paths are mapped, so
    # remapping an already remapped dict changes nothing.
    out = type(state_dict)() if isinstance(state_dict, dict) else {}
    for k, v in state_dict.items():
        if k.startswith(prefix) and "." in k[len(prefix):]:
            mod, name = k[len(prefix):].rsplit(".", 1)
            if mod in mapping:
                k = prefix + mapping[mod] + "." + name
        out[k] = v
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        new_meta = type(meta)()
        for k, v in meta.items():
            if k.startswith(prefix) and k[len(prefix):] in mapping:
                k = prefix + mapping[k[len(prefix):]]
            new_meta[k] = v
        out._metadata = new_meta
    return out


def _report_of(model: nn.Module) -> ConversionReport:
    rep = getattr(model, _REPORT_ATTR, None)
    if not isinstance(rep, ConversionReport):
        raise ValueError("model has no fastnn_report: pass a model returned by fastnn.convert "
                         "(or call report.to_original_keys(state_dict) with its report)")
    return rep


def original_state_dict(model: nn.Module, *args, **kwargs):
    """``model.state_dict()`` of a fastnn.convert-ed model, with the unconverted model's keys:
    ``original.load_state_dict(original_state_dict(converted))`` works."""
    return _report_of(model).to_original_keys(model.state_dict(*args, **kwargs))


def load_original_state_dict(model: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """Load a state dict of the unconverted model (e.g. a checkpoint) into a fastnn.convert-ed one."""
    return model.load_state_dict(_report_of(model).from_original_keys(state_dict), strict=strict, assign=assign)


# ----------------------------------------------------------------------------- convert

def convert(model: nn.Module, *, ops: Optional[Iterable[str]] = None, inplace: bool = False,
            trace: bool = True, return_report: bool = False):
    """Replace the parts of `model` that fastnn has modules for (see the module docstring).

    ops            a subset of {"conv_bn_relu", "cbam", "drop_block", "attention"}; None: all.
    inplace        False (default): convert a deep copy; `model` is not changed. True: change
                   `model` itself and return it (unless `model` itself is a module that gets
                   replaced, e.g. an nn.MultiheadAttention) and keep its parameter tensors (an
                   optimizer made before still holds the right ones).
    trace          False: no torch.fx (only nn.Sequential runs and module types are converted).
    return_report  also return the report: ``model, report = convert(m, return_report=True)``.

    The result carries the report as ``result.fastnn_report`` (a ConversionReport).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnn.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    ops = _check_ops(ops)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:  # noqa: BLE001 - say what to do instead
            raise RuntimeError(f"fastnn.convert: could not deep-copy the model ({type(e).__name__}: {e}); "
                               f"pass inplace=True to convert it in place") from e
    report = ConversionReport(ops=ops)
    model = _swap_modules(model, ops, report)
    if "attention" in ops:
        _find_sdpa_calls(model, report)
    if "conv_bn_relu" in ops:
        occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        if trace:
            _fx_pass(model, report, occurrences)
        _sequential_pass(model, report, occurrences)
    prev = getattr(model, _REPORT_ATTR, None)
    if isinstance(prev, ConversionReport) and prev.key_map:  # converted before: keys map back to the first model
        moved = set(report.key_map.values())
        report.key_map = {**{k: v for k, v in prev.key_map.items() if k not in moved},
                          **{k: prev.key_map.get(v, v) for k, v in report.key_map.items()}}
    order = {p: i for i, (p, _) in enumerate(_walk(model))}
    report.replacements.sort(key=lambda r: order.get(r.path, len(order)))
    setattr(model, _REPORT_ATTR, report)
    return (model, report) if return_report else model


def _check_ops(ops) -> Tuple[str, ...]:
    if ops is None:
        return OPS
    if isinstance(ops, str):
        ops = [ops]
    try:
        ops = list(ops)
    except TypeError:
        raise TypeError(f"fastnn.convert: ops must be None or an iterable of names from {OPS}, "
                        f"got {type(ops).__name__}") from None
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"fastnn.convert: unknown op(s) {bad}; valid ops are {list(OPS)} (ops=None: all)")
    return tuple(o for o in OPS if o in ops)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_fastnn(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "fastnn"


def _tname(m) -> str:
    return type(m).__name__


def _walk(module: nn.Module, prefix: str = ""):
    """(path, module) for every module not inside a fastnn module (fastnn's own blocks are done)."""
    yield prefix, module
    if _is_fastnn(module):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, _join(prefix, name))


def _has_hooks(m: nn.Module) -> bool:
    # (the *_with_kwargs dicts only flag hooks that are in _forward_hooks / _forward_pre_hooks too)
    return own_hooks(m)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path`, keeping the child's position."""
    parent_path, _, name = path.rpartition(".")
    _get(root, parent_path)._modules[name] = new


# ----------------------------------------------------------------------------- module swaps

def _swap_modules(root: nn.Module, ops, report: ConversionReport) -> nn.Module:
    done: Dict[int, nn.Module] = {}  # a module shared at several places becomes one new module
    seen = set()

    def visit(module: nn.Module, prefix: str):
        if _is_fastnn(module) or id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = _join(prefix, name)
            new = done.get(id(child))
            if new is None:
                new = _convert_one(child, path, ops, report)
                if new is not None:
                    done[id(child)] = new
            if new is not None:
                module._modules[name] = new
            else:
                visit(child, path)

    new_root = _convert_one(root, "", ops, report)  # e.g. convert(nn.MultiheadAttention(...))
    if new_root is not None:
        return new_root
    visit(root, "")
    return root


def _convert_one(m: nn.Module, path: str, ops, report: ConversionReport) -> Optional[nn.Module]:
    import fastnn.nn as fnn
    tn = _tname(m)
    if _is_fastnn(m):
        return None
    if "attention" in ops and isinstance(m, nn.MultiheadAttention):
        if type(m) is not nn.MultiheadAttention:
            report.skipped.append(Skipped(path, tn, "attention", "a subclass of nn.MultiheadAttention "
                                          "(its forward may differ); only nn.MultiheadAttention itself is converted"))
            return None
        if _has_hooks(m):
            report.skipped.append(Skipped(path, tn, "attention", "has forward/backward hooks"))
            return None
        new = _rebind_class(m, fnn.MultiheadAttention)
        report.replacements.append(Replacement(path, tn, "MultiheadAttention", "attention", "module walk",
                                               "same parameters and keys"))
        _mha_notes(report)
        return new
    if "cbam" in ops and _looks_like_cbam(m):
        return _convert_cbam(m, path, report)
    if "drop_block" in ops and re.search(r"drop_?block(_?[123]d)?$", tn.lower()):
        if not (tn == "DropBlock2d" and type(m).__module__.startswith("timm.")):
            report.skipped.append(Skipped(path, tn, "drop_block", "not timm's DropBlock2d: its sampling is not known, "
                                          "so it is left as it is (fastnn.nn.DropBlock2d can replace it by hand)"))
            return None
        if _has_hooks(m):
            report.skipped.append(Skipped(path, tn, "drop_block", "has forward/backward hooks"))
            return None
        try:
            new = fnn.DropBlock2d.from_module(m)
        except (TypeError, ValueError) as e:
            report.skipped.append(Skipped(path, tn, "drop_block", str(e)))
            return None
        report.replacements.append(Replacement(path, tn, "DropBlock2d", "drop_block", "module walk",
                                               f"drop_prob={m.drop_prob}, block_size={m.block_size}"))
        return new
    return None


def _rebind_class(m: nn.Module, cls):
    """A `cls` instance with m's state (same parameter/buffer/child objects); m is left unchanged."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in m.__dict__.items()})
    return new


def _mha_notes(report: ConversionReport) -> None:
    note = ("fastnn.nn.MultiheadAttention runs fastnn's attention for need_weights=False calls without "
            "key_padding_mask or a general attn_mask (what nn.TransformerEncoderLayer does); other calls, "
            "and TransformerEncoderLayer's inference fast path (eval, no grad, batch_first), run torch's "
            "own kernels, with the same results")
    if note not in report.notes:
        report.notes.append(note)


def _looks_like_cbam(m: nn.Module) -> bool:
    if _is_fastnn(m):
        return False
    return (_tname(m).lower().endswith(("cbam", "cbammodule"))
            or (hasattr(m, "channel_attention") and hasattr(m, "spatial_attention"))
            or (hasattr(m, "ChannelGate") and hasattr(m, "SpatialGate")))


def _convert_cbam(m: nn.Module, path: str, report: ConversionReport) -> Optional[nn.Module]:
    import fastnn.nn as fnn
    tn = _tname(m)
    hooked = [n for n, sub in m.named_modules() if _has_hooks(sub)]
    if hooked:  # the new module would not carry them (and the probe below would run them)
        where = "it" if hooked == [""] else ", ".join(n or "itself" for n in hooked)
        report.skipped.append(Skipped(path, tn, "cbam", f"has forward/backward hooks ({where})"))
        return None
    try:
        new = fnn.CBAM.from_module(m)
    except (TypeError, ValueError, AttributeError) as e:
        report.skipped.append(Skipped(path, tn, "cbam", f"CBAM.from_module: {e}"))
        return None
    # The layout says which modules hold the weights, not what m's forward does with them (a
    # tutorial's CBAM may pool [max, mean], or return the gates): compare on a probe input.
    why = _probe_differs(m, new)
    if why and new.layout == "tutorial":
        other = "max_mean" if new.sa.spatial_order == "mean_max" else "mean_max"
        alt = fnn.CBAM.from_module(m, spatial_order=other)
        if not _probe_differs(m, alt):
            new, why = alt, None
    if why:
        report.skipped.append(Skipped(path, tn, "cbam", why))
        return None
    _share_state(new, m)
    report.replacements.append(Replacement(path, tn, "CBAM", "cbam", "module walk",
                                           f"layout={new.layout}, spatial_order={new.sa.spatial_order}"))
    return new


def _probe_differs(old: nn.Module, new: nn.Module) -> Optional[str]:
    """None when old and new give the same eval output on a random input, else why not."""
    p = next(iter(new.parameters()), None)
    if p is None or p.device.type == "meta":
        return None if type(old).__module__.startswith("timm.") else "cannot check its forward (no data)"
    modes = [(mod, mod.training) for mod in list(old.modules()) + list(new.modules())]
    g = torch.Generator().manual_seed(1234)  # keeps the global RNG stream untouched
    x = torch.randn(2, new.ca.channels, 5, 7, generator=g).to(device=p.device, dtype=p.dtype)
    try:
        old.eval()
        new.eval()
        with torch.no_grad():
            a, b = old(x.clone()), new(x.clone())
    except Exception as e:  # noqa: BLE001 - any failure means "do not swap"
        return f"probe forward failed ({type(e).__name__}: {e})"
    finally:
        for mod, t in modes:
            mod.training = t
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return "its forward returns something else than CBAM's output (probe input)"
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
        err = (a.float() - b.float()).abs().max().item()
        return f"its forward differs from fastnn.nn.CBAM's on a probe input (max abs diff {err:.2e})"
    return None


def _share_state(new: nn.Module, old: nn.Module) -> None:
    """Make new's parameters/buffers the very tensors old has under the same names (from_module
    copies them), so the converted model keeps the input's tensors."""
    olds = dict(old.named_parameters(remove_duplicate=False))
    olds.update(old.named_buffers(remove_duplicate=False))
    for mod_path, mod in new.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                o = olds.get(_join(mod_path, name))
                if t is not None and o is not None and type(o) is type(t) and o.shape == t.shape \
                        and o.dtype == t.dtype and o.device == t.device:
                    store[name] = o


# ----------------------------------------------------------------------------- SDPA calls

def _find_sdpa_calls(root: nn.Module, report: ConversionReport) -> None:
    by_type: Dict[type, List[str]] = {}
    src_has: Dict[type, bool] = {}
    for path, m in _walk(root):
        t = type(m)
        if _is_fastnn(m) or t.__module__.startswith("torch.") or getattr(m, "fused_attn", True) is False:
            continue
        if t not in src_has:
            try:
                src_has[t] = "scaled_dot_product_attention" in inspect.getsource(t.forward)
            except (OSError, TypeError):
                src_has[t] = False
        if src_has[t]:
            by_type.setdefault(t, []).append(path or "<model>")
    for t, paths in by_type.items():
        where = ", ".join(paths[:3]) + (f", ... ({len(paths)} modules)" if len(paths) > 3 else "")
        report.notes.append(f"{t.__module__}.{t.__qualname__} calls F.scaled_dot_product_attention in its "
                            f"forward ({where}): fastnn.patch_sdpa() routes those calls through fastnn's "
                            f"FlashAttention (`with fastnn.patch_sdpa(): ...`)")


# ----------------------------------------------------------------------------- Conv-BN(-ReLU)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _is_bn_like(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in _tname(m)


def _pair_problems(conv: nn.Module, bn: nn.Module, occurrences: Counter) -> Optional[str]:
    """Why conv -> bn cannot become one fastnn block (None: it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{_tname(conv)} is not nn.Conv2d (a subclass may change the forward)"
    if type(bn) is not nn.BatchNorm2d:
        return f"{_tname(bn)} is not nn.BatchNorm2d (a subclass or another norm has its own forward)"
    if conv.out_channels != bn.num_features:
        return f"conv.out_channels {conv.out_channels} != bn.num_features {bn.num_features}"
    for m in (conv, bn):
        if _has_hooks(m):
            return f"the {_tname(m)} has forward/backward hooks"
        if occurrences[id(m)] > 1:
            return f"the {_tname(m)} is used at {occurrences[id(m)]} places in the model"
    return None


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> nn.Module:
    from fastnn.nn import ConvBN2d, ConvBNReLU2d
    block = (ConvBNReLU2d if relu else ConvBN2d).from_modules(conv, bn)  # shares conv's and bn's tensors
    block.train(bn.training)
    return block


def _mode_state():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"))


class _ShallowTracer(torch.fx.Tracer):
    """Traces only the module's own forward: every submodule call is a leaf (call_module). A grad or
    autocast mode change while tracing (a no_grad block, in forward or in a helper it calls) raises:
    fx records no mode, so the rewrite would drop it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def trace(self, root, *args, **kwargs):
        self._fastnn_modes = _mode_state()
        return super().trace(root, *args, **kwargs)

    def create_node(self, *args, **kwargs):
        if _mode_state() != self._fastnn_modes:
            raise RuntimeError("the forward changes the grad/autocast mode (no_grad, autocast, ...)")
        return super().create_node(*args, **kwargs)


def _fx_candidates(root: nn.Module) -> List[str]:
    """Modules whose own forward may call a Conv2d and a BatchNorm (direct children, or elements
    of a ModuleList/ModuleDict child). nn.Sequential is left to the module walk."""
    out = []
    for path, m in _walk(root):
        if _is_fastnn(m) or isinstance(m, (nn.Sequential,) + _CONTAINERS):
            continue
        kids = [c for _, c in _called_children(m)]
        if any(isinstance(c, nn.Conv2d) for c in kids) and any(_is_bn_like(c) for c in kids):
            out.append(path)
    return out


def _called_children(m: nn.Module):
    """(name, module): m's direct children and the elements of its ModuleList/ModuleDict children."""
    for name, c in m._modules.items():
        if isinstance(c, _CONTAINERS):
            for n2, c2 in c._modules.items():
                if c2 is not None:
                    yield f"{name}.{n2}", c2
        elif c is not None:
            yield name, c


# Words in a forward's source that change or read the grad/autocast mode: symbolic tracing records none
# of it (a `with torch.no_grad():` block or an autocast region would be dropped from the rewrite).
_MODE_WORDS = ("no_grad", "enable_grad", "inference_mode", "grad_enabled", "autocast")


def _untraceable_reason(m: nn.Module) -> Optional[str]:
    fwd = type(m).forward
    if getattr(fwd, "__wrapped__", None) is not None:
        return "its forward is decorated (torch.fx would drop the decorator, e.g. @torch.no_grad())"
    try:
        sig = inspect.signature(m.forward)
    except (TypeError, ValueError):
        return "its forward has no readable signature"
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):
        return "its forward's source is unavailable (cannot check it for grad/autocast mode changes)"
    for word in _MODE_WORDS:
        if word in src:
            return f"its forward uses {word} (torch.fx records no grad/autocast mode change)"
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            return (f"forward has an optional or variadic argument ({p.name}); torch.fx would fix its value "
                    f"at conversion")
        if "Optional" in str(p.annotation) or "None" in str(p.annotation) or re.search(
                rf"\b{re.escape(p.name)}\s+is\s+(not\s+)?None\b|isinstance\(\s*{re.escape(p.name)}\b", src):
            return (f"forward tests its argument {p.name} (None or a type); torch.fx would fix the branch "
                    f"at conversion")
    return None


def _trace(m: nn.Module) -> torch.fx.Graph:
    """m.forward as an fx graph; raises _NotTraced when that fails or depends on m.training."""
    modes = [(mod, mod.training) for mod in m.modules()]
    try:
        graphs = []
        for mode in (True, False):
            mc = copy.copy(m)  # attributes the forward sets while traced land on the copy, not the model
            mc.train(mode)
            before = dict(mc.__dict__)
            with torch.enable_grad(), torch.autocast("cpu", enabled=False):
                graphs.append(_ShallowTracer().trace(mc))
            _check_no_state_writes(before, mc.__dict__)
    except _NotTraced:
        raise
    except Exception as e:  # noqa: BLE001 - whatever stops fx, fall back to the module walk
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _NotTraced(f"torch.fx: {type(e).__name__}: {msg[:160]}") from None
    finally:
        for mod, t in modes:
            mod.training = t
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise _NotTraced("its forward depends on self.training (a traced graph would freeze the mode)")
    return graphs[0] if m.training else graphs[1]


class _NotTraced(Exception):
    pass


def _check_no_state_writes(before: dict, after: dict) -> None:
    """A forward that stores something on self (a feature tap, a call counter) does it at trace time only:
    fx records no attribute write, so the rewrite would drop it. Raises _NotTraced when an attribute was
    added or rebound, or a container attribute (shared with the model by the shallow copy) got a traced
    value."""
    changed = [k for k in after if k not in before or after[k] is not before[k]]
    proxied = [k for k, v in after.items() if isinstance(v, (list, dict, tuple, set)) and any(
        isinstance(e, torch.fx.Proxy) for e in (v.values() if isinstance(v, dict) else v))]
    if changed or proxied:
        names = ", ".join(sorted(set(changed + proxied)))
        raise _NotTraced(f"its forward sets attributes ({names}), which a traced graph would not")


def _relu_user(node: torch.fx.Node, mods: Dict[str, nn.Module]):
    """(identity nodes, relu node, description) when node's value flows only into a ReLU through
    zero or more nn.Identity calls; relu node None otherwise."""
    chain = []
    cur = node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u.args[:1] != (cur,) or any(isinstance(a, torch.fx.Node) for a in u.args[1:]):
            break
        if u.op == "call_module":
            mod = mods.get(u.target)
            if type(mod) is nn.Identity and not u.kwargs and len(u.args) == 1 and not _has_hooks(mod):
                chain.append(u)
                cur = u
                continue
            if type(mod) is nn.ReLU and not u.kwargs and len(u.args) == 1 and not _has_hooks(mod):
                return chain, u, f"{u.target} (nn.ReLU)"
        elif u.op == "call_function" and u.target in _RELU_FUNCTIONS and set(u.kwargs) <= {"inplace"}:
            return chain, u, f"{getattr(u.target, '__module__', '')}.{u.target.__name__}".lstrip(".")
        elif u.op == "call_method" and u.target in ("relu", "relu_") and len(u.args) == 1 and not u.kwargs:
            return chain, u, f".{u.target}()"
        break
    return [], None, ""


def _slot_problem(m: nn.Module, target: str) -> Optional[str]:
    """A fused block can replace `target` only where nothing else calls it: directly on m, or in a
    ModuleList/ModuleDict child (not inside another module, whose own forward may use it)."""
    parts = target.split(".")
    cur = m
    for p in parts[:-1]:
        cur = cur._modules.get(p)
        if not isinstance(cur, _CONTAINERS):
            return f"{target} is inside {_tname(cur)}, not a direct child or a ModuleList/ModuleDict element"
    return None


def _fx_pass(root: nn.Module, report: ConversionReport, occurrences: Counter) -> None:
    paths = _fx_candidates(root)
    paths.sort(key=lambda p: -p.count(".") - bool(p))  # deepest first (paths stay valid)
    for path in paths:
        m = _get(root, path)
        tn = _tname(m)
        why = _untraceable_reason(m)
        graph = None
        if why is None:
            try:
                graph = _trace(m)
            except _NotTraced as e:
                why = str(e)
        if why is not None:
            report.fallbacks.append((path, tn, why))
            for name, c in _called_children(m):
                if isinstance(c, nn.Conv2d):
                    report.skipped.append(Skipped(_join(path, name), _tname(c), "conv_bn_relu",
                                                  f"called from {tn}.forward, which was not traced"))
            continue
        _rewrite(m, path, graph, report, occurrences)


def _rewrite(m: nn.Module, path: str, graph: torch.fx.Graph, report: ConversionReport,
             occurrences: Counter) -> None:
    mods = dict(m.named_modules(remove_duplicate=False))
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
    tn = _tname(m)
    sites = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        bn_users = [u for u in users if u.op == "call_module" and _is_bn_like(mods.get(u.target))]
        if not bn_users:
            continue
        conv = mods[node.target]
        where = _join(path, node.target)
        if len(users) != 1:
            report.skipped.append(Skipped(where, _tname(conv), "conv_bn_relu",
                                          f"the conv output has {len(users)} users in {tn}.forward "
                                          f"(fused only when the BatchNorm is its one user)"))
            continue
        bn_node = users[0]
        bn = mods[bn_node.target]
        why = _pair_problems(conv, bn, occurrences)
        if why is None:
            if bn_node.args != (node,) or bn_node.kwargs:
                why = "the BatchNorm is called with more than the conv output"
            elif calls[node.target] > 1 or calls[bn_node.target] > 1:
                why = f"the conv or the BatchNorm is called more than once in {tn}.forward"
            elif any(a.startswith(node.target + ".") or a.startswith(bn_node.target + ".") for a in attrs):
                why = f"{tn}.forward reads the conv's or the BatchNorm's attributes"
            else:
                why = _slot_problem(m, node.target) or _slot_problem(m, bn_node.target)
        if why is not None:
            report.skipped.append(Skipped(where, f"{_tname(conv)} -> {_tname(bn)}", "conv_bn_relu", why))
            continue
        chain, relu_node, relu_desc = _relu_user(bn_node, mods)
        sites.append((node, bn_node, chain, relu_node, relu_desc))
    if not sites:
        return

    for node, bn_node, chain, relu_node, relu_desc in sites:
        conv, bn = mods[node.target], mods[bn_node.target]
        fused = _fuse(conv, bn, relu_node is not None)
        with graph.inserting_before(node):
            new_node = graph.call_module(node.target, node.args, node.kwargs)
        end = relu_node if relu_node is not None else bn_node
        end.replace_all_uses_with(new_node)
        for n in reversed([node, bn_node] + chain + ([relu_node] if relu_node is not None else [])):
            graph.erase_node(n)
        _set(m, node.target, fused)
        _set(m, bn_node.target, nn.Identity().train(bn.training))  # (containers keep their indices)
        report.key_map[_join(path, node.target, "conv")] = _join(path, node.target)
        report.key_map[_join(path, node.target, "bn")] = _join(path, bn_node.target)
        old = "Conv2d -> BatchNorm2d" + (" -> ReLU" if relu_node is not None else "")
        detail = f"{bn_node.target}" + (f" + {relu_desc}" if relu_node is not None else "") + f" in {tn}.forward"
        report.replacements.append(Replacement(_join(path, node.target), old, _tname(fused), "conv_bn_relu",
                                               "fx", detail))
    graph.lint()
    m.__class__ = _rewritten_class(type(m), graph)
    report.rewritten.append((path, tn))


# A rewritten module keeps its object, state, hooks and methods; only its class changes, to a
# subclass (same name) whose forward is the rewritten graph's code. The fused block takes the
# conv's attribute and the BatchNorm's becomes nn.Identity, so other methods that run
# conv -> bn -> relu (timm's forward_features) still compute the same values (ReLU twice is ReLU).
# The code comes from a GraphModule over placeholders, which is also what pickling stores.
_REWRITTEN: Dict[Tuple[type, str], type] = {}


def _rewritten_class(base: type, graph_or_stub) -> type:
    if isinstance(graph_or_stub, torch.fx.GraphModule):
        stub = graph_or_stub
    else:
        stub = torch.fx.GraphModule(_placeholders(graph_or_stub), graph_or_stub, class_name=base.__name__)
    key = (base, stub.code)
    cls = _REWRITTEN.get(key)
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": type(stub).forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": base.__doc__, "__reduce_ex__": _rewritten_reduce_ex,
            "_fastnn_fx_base": base, "_fastnn_fx_stub": stub, "_fastnn_fx_code": stub.code})
        _REWRITTEN[key] = cls
    return cls


def _placeholders(graph: torch.fx.Graph) -> nn.Module:
    """Empty modules (and tensors) at the graph's targets: enough to generate, pickle and re-trace
    the code, which only names them."""
    root = nn.Module()
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            *parents, leaf = n.target.split(".")
            cur = root
            for p in parents:
                if p not in cur._modules:
                    cur._modules[p] = nn.Module()
                cur = cur._modules[p]
            if n.op == "get_attr":
                cur.register_buffer(leaf, torch.empty(0))
            elif leaf not in cur._modules:
                cur._modules[leaf] = nn.Module()
    return root


def _rewritten_reduce_ex(self, protocol):
    # pickle / deepcopy: the base class by reference, the code through GraphModule's own pickling
    cls = type(self)
    return (_rebuild_rewritten, (cls._fastnn_fx_base, cls._fastnn_fx_stub), self.__dict__)


def _rebuild_rewritten(base: type, stub: torch.fx.GraphModule):
    cls = _rewritten_class(base, stub)
    return cls.__new__(cls)  # the state comes next, through nn.Module.__setstate__


def _sequential_pass(root: nn.Module, report: ConversionReport, occurrences: Counter) -> None:
    """Conv-BN(-ReLU) runs inside plain nn.Sequentials. The elements stay the original modules; the
    Sequential's class becomes a subclass whose forward runs each run as one fused block (sharing the
    modules' tensors). So code that calls the elements one by one (a feature tap, `seq[:2]`) and the
    state_dict see exactly the original model; only the whole-Sequential call is fused."""
    for path, seq in list(_walk(root)):
        if not isinstance(seq, nn.Sequential) or _is_fastnn(seq) or "_fastnn_plan" in seq.__dict__:
            continue
        items = list(seq._modules.items())
        custom = getattr(type(seq), "_fastnn_seq_base", type(seq)).forward is not nn.Sequential.forward
        plan = {}
        i = 0
        while i < len(items) - 1:
            (n0, a), (n1, b) = items[i], items[i + 1]
            if not (isinstance(a, nn.Conv2d) and _is_bn_like(b)):
                i += 1
                continue
            where = _join(path, n0)
            why = _pair_problems(a, b, occurrences)
            if why is None and custom:
                why = f"{_tname(seq)} is an nn.Sequential with its own forward"
            if why is None and _has_hooks(seq):
                why = f"the {_tname(seq)} has forward/backward hooks"
            if why is not None:
                report.skipped.append(Skipped(where, f"{_tname(a)} -> {_tname(b)}", "conv_bn_relu", why))
                i += 1
                continue
            relu = None
            if i + 2 < len(items):
                c = items[i + 2][1]
                if type(c) is nn.ReLU and not _has_hooks(c):
                    relu = c
            fused = _fuse(a, b, relu is not None)
            plan[i] = (fused, a, b, relu)
            old = "Conv2d -> BatchNorm2d" + (" -> ReLU" if relu is not None else "")
            after = ""
            if relu is None and i + 2 < len(items):
                after = f"; followed by {_tname(items[i + 2][1])} (not fused)"
            last = items[i + 2][0] if relu is not None else n1
            report.replacements.append(Replacement(where, old, _tname(fused), "conv_bn_relu", "module walk",
                                                   f"{_tname(seq)} items {n0}-{last}, fused when the "
                                                   f"{_tname(seq)} is called whole" + after))
            i += 3 if relu is not None else 2
        if plan:
            seq.__class__ = _fused_sequential_class(type(seq))
            seq.__dict__["_fastnn_plan"] = plan


_FUSED_SEQUENTIAL: Dict[type, type] = {}
# True inside torch.fx.symbolic_trace (create_feature_extractor, ...), not under torch.compile/export
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", lambda: False)
_SEQUENTIAL_FORWARD = nn.Sequential.forward


def _fused_sequential_class(base: type) -> type:
    """`base` (an nn.Sequential class with the default forward) with _fused_sequential_forward."""
    base = getattr(base, "_fastnn_seq_base", base)  # a slice of a converted Sequential has the subclass
    cls = _FUSED_SEQUENTIAL.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": _fused_sequential_forward, "__module__": base.__module__,
            "__qualname__": base.__qualname__, "__doc__": base.__doc__,
            "__reduce_ex__": _fused_sequential_reduce_ex, "_fastnn_seq_base": base})
        _FUSED_SEQUENTIAL[base] = cls
    return cls


def _fused_sequential_forward(self, input):
    # _fastnn_plan: {index of a run's conv: (fused block, its conv, its bn, the run's nn.ReLU or None)}. The
    # plan holds while the elements at those indices are still that conv and bn (and that ReLU) and nobody
    # hooked them since; else (the Sequential was edited, hooks were added, a DataParallel replica) and
    # under fx tracing (the block is no submodule) everything runs unfused.
    plan = self.__dict__.get("_fastnn_plan")
    mods = list(self._modules.values())
    if not plan or _fx_symbolic_tracing() or not _plan_holds(plan, mods):
        return _SEQUENTIAL_FORWARD(self, input)
    i, n = 0, len(mods)
    while i < n:
        run = plan.get(i)
        if run is None:
            input = mods[i](input)
            i += 1
        else:
            input = run[0](input)
            i += 2 if run[3] is None else 3
    return input


def _plan_holds(plan, mods) -> bool:
    if global_hooks():
        return False
    for i, (_, conv, bn, relu) in plan.items():
        end = i + (2 if relu is None else 3)
        if end > len(mods) or mods[i] is not conv or mods[i + 1] is not bn or \
                (relu is not None and mods[i + 2] is not relu) or own_hooks(conv, bn, relu):
            return False
    return True


def _fused_sequential_reduce_ex(self, protocol):
    # pickle / deepcopy: the base class by reference; the plan travels in __dict__
    return (_rebuild_fused_sequential, (type(self)._fastnn_seq_base,), self.__dict__)


def _rebuild_fused_sequential(base: type):
    cls = _fused_sequential_class(base)
    return cls.__new__(cls)
