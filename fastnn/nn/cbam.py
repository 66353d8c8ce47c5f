"""Drop-in CBAM modules: CBAM, ChannelAttention, SpatialAttention.

Three published variants, chosen with `variant=` (each flag can still be set on its own):

  variant     MLP layers  MLP bias  spatial map  spatial BN           max ties
  "tutorial"  1x1 Conv2d  no        [mean, max]  no                   first
  "timm"      1x1 Conv2d  no        [mean, max]  yes (momentum 0.1)   split
  "paper"     Linear      yes       [max, mean]  yes (momentum 0.01)  first

  state_dict keys
  "tutorial"  channel_attention.mlp.{0,2}.weight, spatial_attention.conv.weight
  "timm"      channel.fc{1,2}.weight, spatial.conv.conv.weight, spatial.conv.bn.*
  "paper"     ChannelGate.mlp.{1,3}.{weight,bias}, SpatialGate.spatial.conv.weight, SpatialGate.spatial.bn.*

"tutorial" is the ChannelAttention/SpatialAttention/CBAM sketch found in tutorials, "timm" is
timm.layers.cbam.CbamModule, "paper" is the authors' reference code (ChannelGate/SpatialGate).
Each keeps its source's state_dict keys, so checkpoints load with load_state_dict;
CBAM.from_module converts a tutorial-style module, timm's CbamModule or a paper-style module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from fastnn import backends, reference
from fastnn.nn._hooks import must_run_submodules, parametrized
from fastnn.ops import cbam as _ops

VARIANTS = {
    "tutorial": dict(mlp_bias=False, mlp_linear=False, spatial_order="mean_max", spatial_bn=False, bn_momentum=0.1,
                     max_ties="first"),
    "timm": dict(mlp_bias=False, mlp_linear=False, spatial_order="mean_max", spatial_bn=True, bn_momentum=0.1,
                 max_ties="split"),
    "paper": dict(mlp_bias=True, mlp_linear=True, spatial_order="max_mean", spatial_bn=True, bn_momentum=0.01,
                  max_ties="first"),
}
LAYOUTS = ("tutorial", "timm", "paper")


def _choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"fastnn.nn: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _autocast(x: Tensor) -> bool:
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _hidden(channels, reduction, hidden_channels):
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"fastnn.nn: channels must be a positive int, got {channels!r}")
    if hidden_channels is not None:
        if not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ValueError(f"fastnn.nn: hidden_channels must be a positive int, got {hidden_channels!r}")
        return hidden_channels
    if not isinstance(reduction, (int, float)) or reduction <= 0:
        raise ValueError(f"fastnn.nn: reduction must be a positive number, got {reduction!r}")
    return max(1, int(channels // reduction))


class _ConvBN(nn.Module):
    """conv (+ bn): the container timm's ConvNormAct and the paper's BasicConv use (keys conv.*, bn.*)."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]):
        super().__init__()
        self.conv = conv
        if bn is not None:
            self.bn = bn

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if hasattr(self, "bn") else x


class ChannelAttention(nn.Module):
    """The channel gate Mc(x) = sigmoid(MLP(mean_hw x) + MLP(max_hw x)), returned as [N, C, 1, 1].

    As the tutorial's ChannelAttention (keys mlp.0.weight, mlp.2.weight). The pooling is one fused
    pass over x; the MLP runs as ordinary torch ops in the parameters' dtype.
    """

    def __init__(self, channels: int, reduction: float = 16, *, hidden_channels: Optional[int] = None,
                 mlp_bias: bool = False, mlp_linear: bool = False, max_ties: str = "first",
                 layout: str = "tutorial", backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = channels
        self.hidden_channels = hidden = _hidden(channels, reduction, hidden_channels)
        self.max_ties = _choice(max_ties, "max_ties", _ops.MAX_TIES)
        self.layout = _choice(layout, "layout", LAYOUTS)
        self.backend = backend
        if mlp_linear or layout == "paper":
            fc1 = nn.Linear(channels, hidden, bias=mlp_bias, **dd)
            fc2 = nn.Linear(hidden, channels, bias=mlp_bias, **dd)
        else:
            fc1 = nn.Conv2d(channels, hidden, 1, bias=mlp_bias, **dd)
            fc2 = nn.Conv2d(hidden, channels, 1, bias=mlp_bias, **dd)
        if layout == "tutorial":
            self.mlp = nn.Sequential(fc1, nn.ReLU(inplace=True), fc2)
        elif layout == "timm":
            self.fc1, self.act, self.fc2 = fc1, nn.ReLU(inplace=True), fc2
        else:
            self.mlp = nn.Sequential(nn.Flatten(), fc1, nn.ReLU(), fc2)

    @property
    def layers(self):
        """The MLP's two layers (Conv2d 1x1 or Linear), whatever the key layout."""
        if self.layout == "tutorial":
            return self.mlp[0], self.mlp[2]
        if self.layout == "timm":
            return self.fc1, self.fc2
        return self.mlp[1], self.mlp[3]

    def mlp_params(self):
        """(w1, b1, w2, b2): the parameters, w1 [hidden, C] or [hidden, C, 1, 1] (1x1 convs)."""
        fc1, fc2 = self.layers
        return fc1.weight, fc1.bias, fc2.weight, fc2.bias

    def _fast_layers(self):
        # self.layers through the _modules dicts: nn.Module.__getattr__ and Sequential indexing cost
        # microseconds each, per call of CBAM.forward
        m = self._modules
        if self.layout == "timm":
            return m["fc1"], m["fc2"]
        s = m["mlp"]._modules
        return (s["0"], s["2"]) if self.layout == "tutorial" else (s["1"], s["3"])

    def forward(self, x: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.mlp_params()
        w1, w2 = w1.flatten(1), w2.flatten(1)
        _ops._check_x(x)
        if x.shape[1] != w1.shape[1]:  # else F.linear's "mat1 and mat2 shapes cannot be multiplied"
            raise ValueError(f"fastnn.nn.ChannelAttention: x has {x.shape[1]} channels (shape {tuple(x.shape)}) "
                             f"but the module was built for {w1.shape[1]}")
        # hooks on the MLP's layers (prune, ...) run only if the layers are called
        by_modules = must_run_submodules(_ops.OP, *self._modules.values(), *self._mlp_children())
        b = backends.select("cbam_channel_pool", x.device, self.backend, why_not=_ops._why_not)
        if b == "reference" and not by_modules:
            return reference.cbam_channel_gate(x, w1, w2, b1, b2, self.max_ties)
        if b == "reference":
            mean, mx = reference.cbam_channel_pool(x, max_ties=self.max_ties)
        else:
            mean, mx = _ops.cbam_channel_pool(x, self.max_ties, backend=b)
        v = torch.stack([mean, mx]).to(w1.dtype)
        if by_modules:
            z = self._mlp_by_modules(v)
        else:
            z = F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)
        gate = torch.sigmoid(z[0] + z[1])
        if not _autocast(x):  # under autocast: the MLP's dtype, as the tutorial module's
            gate = gate.to(x.dtype)
        return gate[:, :, None, None]

    def _mlp_children(self):
        """The layers inside the MLP's Sequential (tutorial and paper layouts; timm's are direct children)."""
        mlp = self._modules.get("mlp")
        return tuple(mlp._modules.values()) if mlp is not None else ()

    def _mlp_by_modules(self, v: Tensor) -> Tensor:
        """The MLP on v [2, N, C] by calling its layers (so their hooks run), as the unfused modules do."""
        two, n, c = v.shape
        fc1, _ = self.layers
        t = v.reshape(two * n, c) if isinstance(fc1, nn.Linear) and self.layout != "paper" else \
            v.reshape(two * n, c, 1, 1)
        z = self.fc2(self.act(self.fc1(t))) if self.layout == "timm" else self.mlp(t)
        return z.reshape(two, n, c)

    def extra_repr(self):
        return f"channels={self.channels}, hidden={self.hidden_channels}, max_ties={self.max_ties!r}"


class SpatialAttention(nn.Module):
    """The spatial gate Ms(x) = sigmoid([BN](conv_kxk([mean_c x, max_c x]))), returned as [N, 1, H, W].

    As the tutorial's SpatialAttention (key conv.weight; bn.* with spatial_bn). The pooling is one
    fused pass over x; the conv (and BN) run as ordinary torch ops in the parameters' dtype.
    """

    def __init__(self, kernel_size: int = 7, *, spatial_bn: bool = False, bn_momentum: Optional[float] = 0.1,
                 bn_eps: float = 1e-5, spatial_order: str = "mean_max", max_ties: str = "first",
                 layout: str = "tutorial", backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"fastnn.nn: kernel_size must be a positive odd int (padding k//2 keeps H, W), "
                             f"got {kernel_size!r}")
        dd = dict(device=device, dtype=dtype)
        self.kernel_size = kernel_size
        self.spatial_order = _choice(spatial_order, "spatial_order", _ops.SPATIAL_ORDERS)
        self.max_ties = _choice(max_ties, "max_ties", _ops.MAX_TIES)
        self.layout = _choice(layout, "layout", LAYOUTS)
        self.backend = backend
        conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        bn = nn.BatchNorm2d(1, eps=bn_eps, momentum=bn_momentum, **dd) if spatial_bn else None
        if layout == "tutorial":
            self.conv = conv
            if bn is not None:
                self.bn = bn
        elif layout == "timm":
            self.conv = _ConvBN(conv, bn)
        else:
            self.spatial = _ConvBN(conv, bn)

    @property
    def conv_layer(self) -> nn.Conv2d:
        if self.layout == "tutorial":
            return self.conv
        return self.conv.conv if self.layout == "timm" else self.spatial.conv

    @property
    def bn_layer(self) -> Optional[nn.BatchNorm2d]:
        holder = {"tutorial": self, "timm": getattr(self, "conv", None), "paper": getattr(self, "spatial", None)}
        return getattr(holder[self.layout], "bn", None)

    def _fast_layers(self):
        # (conv_layer, bn_layer) through the _modules dicts (see ChannelAttention._fast_layers)
        m = self._modules
        if self.layout != "tutorial":
            m = m["conv" if self.layout == "timm" else "spatial"]._modules
        return m["conv"], m.get("bn")

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv_layer, self.bn_layer
        b = backends.select("cbam_spatial_pool", x.device, self.backend, why_not=_ops._why_not)
        if b == "reference":
            mean, mx = reference.cbam_spatial_pool(x, self.max_ties)
        else:
            pooled = _ops.cbam_spatial_pool(x, self.max_ties, backend=b).to(conv.weight.dtype)
            mean, mx = pooled[:, :1], pooled[:, 1:]
        m = torch.cat([mean, mx] if self.spatial_order == "mean_max" else [mx, mean], 1)
        y = conv(m)
        if bn is not None:
            y = bn(y)
        gate = torch.sigmoid(y)
        # under autocast: the conv's dtype, as the tutorial module (its conv runs in the autocast dtype)
        return gate if _autocast(x) else gate.to(x.dtype)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, order={self.spatial_order!r}, max_ties={self.max_ties!r}"


_NAMES = {"tutorial": ("channel_attention", "spatial_attention"), "timm": ("channel", "spatial"),
          "paper": ("ChannelGate", "SpatialGate")}


class CBAM(nn.Module):
    """CBAM block: out = x' * Ms(x'), x' = x * Mc(x), fused (fastnn.ops.cbam.cbam).

    CBAM(channels, reduction=16, spatial_kernel=7) is the tutorial's module (state_dict keys
    channel_attention.mlp.0.weight, channel_attention.mlp.2.weight, spatial_attention.conv.weight).
    variant="timm" / "paper" give the other published variants (see the module docstring); the
    flags override single choices:
      hidden_channels  MLP width (default max(1, channels // reduction))
      mlp_bias         biases in the MLP;  mlp_linear: Linear layers instead of 1x1 convs
      spatial_order    "mean_max" or "max_mean" channel order of the spatial map
      spatial_bn       BatchNorm2d(1) after the spatial conv (bn_momentum, bn_eps as BatchNorm2d)
      max_ties         "first" (gradient of a max to the first maximal element) or "split" (shared)
      layout           the state_dict key layout: "tutorial", "timm" or "paper" (default: variant)
      backend          force a fastnn backend ("cpu", "cuda", "reference") for this module
    """

    def __init__(self, channels: int, reduction: float = 16, spatial_kernel: int = 7, *,
                 variant: str = "tutorial", hidden_channels: Optional[int] = None, mlp_bias: Optional[bool] = None,
                 mlp_linear: Optional[bool] = None, spatial_order: Optional[str] = None,
                 spatial_bn: Optional[bool] = None, bn_momentum: Optional[float] = -1.0, bn_eps: float = 1e-5,
                 max_ties: Optional[str] = None, layout: Optional[str] = None, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        cfg = dict(VARIANTS[_choice(variant, "variant", VARIANTS)])
        for k, v in dict(mlp_bias=mlp_bias, mlp_linear=mlp_linear, spatial_order=spatial_order,
                         spatial_bn=spatial_bn, max_ties=max_ties).items():
            if v is not None:
                cfg[k] = v
        if bn_momentum != -1.0:  # None is a valid momentum (cumulative average), so -1 means "variant's"
            cfg["bn_momentum"] = bn_momentum
        self.variant = variant
        self.layout = _choice(layout or variant, "layout", LAYOUTS)
        self.backend = backend
        dd = dict(device=device, dtype=dtype)
        ca = ChannelAttention(channels, reduction, hidden_channels=hidden_channels, mlp_bias=cfg["mlp_bias"],
                              mlp_linear=cfg["mlp_linear"], max_ties=cfg["max_ties"], layout=self.layout,
                              backend=backend, **dd)
        sa = SpatialAttention(spatial_kernel, spatial_bn=cfg["spatial_bn"], bn_momentum=cfg["bn_momentum"],
                              bn_eps=bn_eps, spatial_order=cfg["spatial_order"], max_ties=cfg["max_ties"],
                              layout=self.layout, backend=backend, **dd)
        self._ca_name, self._sa_name = _NAMES[self.layout]
        setattr(self, self._ca_name, ca)
        setattr(self, self._sa_name, sa)

    @property
    def ca(self) -> ChannelAttention:
        return getattr(self, self._ca_name)

    @property
    def sa(self) -> SpatialAttention:
        return getattr(self, self._sa_name)

    @property
    def max_ties(self) -> str:
        return self.ca.max_ties

    def forward(self, x: Tensor) -> Tensor:
        # Lean on purpose (it runs per call, and CUDA calls at ResNet shapes are bound by host time):
        # submodules and parameters come from the _modules/_parameters dicts, x gets the cheap checks
        # here and the parameters are checked by the op itself (csrc/cbam/cbam.cpp: check_params).
        mods = self._modules
        ca, sa = mods[self._ca_name], mods[self._sa_name]
        ties = ca.max_ties
        if ties != sa.max_ties:
            raise ValueError(f"fastnn.nn.CBAM: channel and spatial max_ties differ ({ties!r} vs "
                             f"{sa.max_ties!r}); set both submodules' max_ties to the same value")
        fc1, fc2 = ca._fast_layers()
        conv, bn = sa._fast_layers()
        p1, p2, pc = fc1._parameters, fc2._parameters, conv._parameters
        if parametrized(fc1, fc2, conv, bn) or "weight" not in p1 or "weight" not in p2 or "weight" not in pc or \
                must_run_submodules(_ops.OP, ca, sa, *ca._modules.values(), *ca._mlp_children(), *sa._modules.values(),
                                    conv, bn):  # (fc1/fc2 are among ca's children or its MLP's)
            # a parametrized or pruned parameter (computed on access), or hooks on the submodules: call the
            # submodules, which compute their parameters and run their hooks, as the unfused modules do
            xg = x * ca(x)
            return xg * sa(xg)
        w1, b1, w2, b2 = p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias")
        cw, cb = pc["weight"], pc.get("bias")
        if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype not in _ops._FLOATS or x.numel() == 0:
            _ops._check_x(x)
        if x.device != w1.device:  # else the op's message names w1, which a module user never passed
            raise ValueError(f"fastnn.nn.CBAM: the module's weight is on {w1.device} but x is on {x.device}; "
                             f"move x with x.to('{w1.device}') or the module with .to('{x.device}')")
        if x.shape[1] != w1.shape[1]:
            raise ValueError(f"fastnn.nn.CBAM: x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the module "
                             f"was built for {w1.shape[1]}")
        kw = {}
        if bn is not None:
            # BatchNorm2d.forward's bookkeeping: count batches, pick the momentum, train/eval stats. The BN's
            # own mode decides, not the block's: a BN frozen with bn.eval() inside a training model (fine-tuning)
            # normalizes with its running statistics and leaves them alone, as the unfused module does.
            bn_train = bn.training
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn_train and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            use_batch = bn_train or (bn.running_mean is None and bn.running_var is None)
            track = not bn_train or bn.track_running_stats
            kw.update(spatial_bn=True, bn_weight=bn.weight, bn_bias=bn.bias, bn_training=use_batch,
                      bn_momentum=factor, bn_eps=bn.eps,
                      bn_running_mean=bn.running_mean if track else None,
                      bn_running_var=bn.running_var if track else None)
        b = backends.select(_ops.OP, x.device, self.backend, why_not=_ops._why_not)
        if b == "reference" or x.shape[0] == 0 or (bn is not None and kw["bn_training"] is False
                                                   and kw["bn_running_mean"] is None):
            # the reference, an empty batch and the errors of an unusable BN setup: the checked entry point
            return _ops.cbam(x, w1, w2, cw, mlp_bias1=b1, mlp_bias2=b2, conv_bias=cb, spatial_order=sa.spatial_order,
                             max_ties=ties, backend=b, **kw)
        return _ops._run(x, w1, b1, w2, b2, cw, cb, bn is not None, kw.get("bn_weight"), kw.get("bn_bias"),
                         kw.get("bn_running_mean"), kw.get("bn_running_var"), bool(kw.get("bn_training", False)),
                         kw.get("bn_momentum", 0.0), float(kw.get("bn_eps", 1e-5)), sa.spatial_order == "mean_max",
                         ties == "first")

    def extra_repr(self):
        return f"variant={self.variant!r}, layout={self.layout!r}"

    # ------------------------------------------------------------ conversion

    @classmethod
    def from_module(cls, m: nn.Module, *, spatial_order: Optional[str] = None, max_ties: Optional[str] = None,
                    backend: Optional[str] = None) -> "CBAM":
        """A fastnn CBAM computing what `m` computes, with m's parameters, buffers and state_dict keys.

        m: a tutorial-style module (channel_attention.mlp = [Conv2d|Linear, ReLU, Conv2d|Linear],
        spatial_attention.conv = Conv2d(2, 1, k), optional spatial_attention.bn), timm's CbamModule,
        or a paper-style module (ChannelGate.mlp, SpatialGate.spatial.{conv, bn}). The spatial map
        order and the tie rule default to the source's convention ([mean, max] and "first" for
        tutorial-style, [mean, max] and "split" for timm, [max, mean] and "first" for paper-style);
        pass spatial_order / max_ties to override (e.g. a tutorial variant that pools [max, mean]).
        """
        if isinstance(m, CBAM):
            layout, variant = m.layout, m.variant
            fc1, fc2 = m.ca.layers
            conv, bn = m.sa.conv_layer, m.sa.bn_layer
            order, ties = m.sa.spatial_order, m.ca.max_ties
        elif hasattr(m, "channel") and hasattr(m, "spatial") and hasattr(m.channel, "fc1"):
            layout = variant = "timm"
            ch, sp = m.channel, m.spatial
            _expect(isinstance(getattr(ch, "act", None), nn.ReLU), m, "channel.act must be nn.ReLU")
            _expect(_is_sigmoid(getattr(ch, "gate", None)) and _is_sigmoid(getattr(sp, "gate", None)), m,
                    "the gates must be sigmoids")
            _expect(type(ch).__name__ == "ChannelAttn" and type(sp).__name__ == "SpatialAttn", m,
                    "only timm's ChannelAttn/SpatialAttn (CbamModule) are supported, not the Light variants")
            fc1, fc2 = ch.fc1, ch.fc2
            conv = sp.conv.conv
            bn = getattr(sp.conv, "bn", None)
            if bn is not None and not isinstance(bn, nn.BatchNorm2d):
                bn = None if len(list(bn.children())) == 0 and not list(bn.parameters()) else bn
            if bn is not None:
                _expect(isinstance(bn, nn.BatchNorm2d), m, "spatial.conv.bn must be a BatchNorm2d")
                for name in ("act", "drop"):
                    sub = getattr(bn, name, None)
                    _expect(sub is None or isinstance(sub, nn.Identity), m,
                            f"spatial.conv.bn.{name} must be Identity (no activation after the BN)")
            _expect(getattr(sp.conv, "aa", None) is None or isinstance(sp.conv.aa, nn.Identity), m,
                    "spatial.conv must have no anti-aliasing layer")
            order, ties = "mean_max", "split"
        elif hasattr(m, "channel_attention") and hasattr(m, "spatial_attention"):
            layout = variant = "tutorial"
            seq = getattr(m.channel_attention, "mlp", None)
            _expect(isinstance(seq, nn.Sequential) and len(seq) == 3 and isinstance(seq[1], nn.ReLU), m,
                    "channel_attention.mlp must be Sequential(Conv2d|Linear, ReLU, Conv2d|Linear)")
            fc1, fc2 = seq[0], seq[2]
            conv = getattr(m.spatial_attention, "conv", None)
            bn = getattr(m.spatial_attention, "bn", None)
            order, ties = "mean_max", "first"
        elif hasattr(m, "ChannelGate") and hasattr(m, "SpatialGate"):
            layout = variant = "paper"
            seq = getattr(m.ChannelGate, "mlp", None)
            _expect(isinstance(seq, nn.Sequential) and len(seq) == 4 and isinstance(seq[2], nn.ReLU), m,
                    "ChannelGate.mlp must be Sequential(Flatten, Linear, ReLU, Linear)")
            pools = getattr(m.ChannelGate, "pool_types", ["avg", "max"])
            _expect(sorted(pools) == ["avg", "max"], m, f"ChannelGate.pool_types must be avg and max, got {pools}")
            fc1, fc2 = seq[1], seq[3]
            conv = m.SpatialGate.spatial.conv
            bn = getattr(m.SpatialGate.spatial, "bn", None)
            _expect(getattr(m.SpatialGate.spatial, "relu", None) is None, m, "SpatialGate.spatial.relu must be None")
            order, ties = "max_mean", "first"
        else:
            raise TypeError(f"fastnn.nn.CBAM.from_module: cannot convert {type(m).__name__}; expected a tutorial-style "
                            f"module (channel_attention/spatial_attention), timm's CbamModule or a paper-style "
                            f"module (ChannelGate/SpatialGate)")
        _expect(isinstance(fc1, (nn.Conv2d, nn.Linear)) and isinstance(fc2, type(fc1)), m,
                "the MLP layers must both be 1x1 Conv2d or both Linear")
        if isinstance(fc1, nn.Conv2d):
            _expect(fc1.kernel_size == (1, 1) and fc2.kernel_size == (1, 1) and fc1.groups == 1 and fc2.groups == 1,
                    m, "the MLP convs must be 1x1 with groups=1")
        _expect(isinstance(conv, nn.Conv2d) and conv.in_channels == 2 and conv.out_channels == 1, m,
                "the spatial conv must be Conv2d(2, 1, k)")
        k = conv.kernel_size[0]
        _expect(conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == (k // 2, k // 2)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros", m,
                f"the spatial conv must be k x k with odd k, padding k//2, stride 1 (got {conv})")
        channels = fc1.weight.shape[1]
        hidden = fc1.weight.shape[0]
        p = fc1.weight
        out = cls(channels, spatial_kernel=k, variant=variant, hidden_channels=hidden,
                  mlp_bias=fc1.bias is not None, mlp_linear=isinstance(fc1, nn.Linear),
                  spatial_order=spatial_order or order, spatial_bn=bn is not None,
                  bn_momentum=bn.momentum if bn is not None else 0.1, bn_eps=bn.eps if bn is not None else 1e-5,
                  max_ties=max_ties or ties, layout=layout, backend=backend, device=p.device, dtype=p.dtype)
        if bn is not None and not bn.affine:
            raise ValueError("fastnn.nn.CBAM.from_module: the spatial BatchNorm must be affine")
        if fc2.bias is not None and fc1.bias is None or (fc1.bias is not None and fc2.bias is None):
            # both or neither, as the variants have them
            raise ValueError("fastnn.nn.CBAM.from_module: the MLP layers must both have a bias or neither")
        if conv.bias is not None:
            out.sa.conv_layer.bias = nn.Parameter(torch.empty(1, device=p.device, dtype=conv.weight.dtype))
        if bn is not None and not bn.track_running_stats:
            out.sa.bn_layer.track_running_stats = False
            out.sa.bn_layer.running_mean = out.sa.bn_layer.running_var = None
            out.sa.bn_layer.num_batches_tracked = None
        missing, unexpected = out.load_state_dict(m.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"fastnn.nn.CBAM.from_module: state_dict keys differ from {type(m).__name__}'s: "
                             f"missing {missing}, unexpected {unexpected}")
        out.train(m.training)
        if bn is not None:  # a BN frozen with bn.eval() (or the reverse) keeps its own mode
            out.sa.bn_layer.train(bn.training)
        return out


def _is_sigmoid(mod):
    return mod is not None and (isinstance(mod, nn.Sigmoid) or type(mod).__name__ == "Sigmoid")


def _expect(cond, m, what):
    if not cond:
        raise ValueError(f"fastnn.nn.CBAM.from_module: cannot convert {type(m).__name__}: {what}")
