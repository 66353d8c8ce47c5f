"""The pure-PyTorch reference of every op.

One reference per op, used by the tests, the benchmarks and the fallback alike.
These favour clarity and exact PyTorch semantics over speed.
"""
import torch
import torch.nn.functional as F  # noqa: F401


# ---------------------------------------------------------------- conv_bn_relu


# ---------------------------------------------------------------- flash_attention


# ---------------------------------------------------------------- cbam
# The tutorial formulation of CBAM in plain PyTorch ops (fastnn.nn.CBAM's default variant):
#   Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))),  x' = x * Mc
#   Ms = sigmoid([BN](conv([mean_c x', max_c x']))),   out = x' * Ms
# Ties of a max: max_ties="first" uses adaptive_max_pool2d / torch.max(dim) (the gradient goes to
# the first maximal element), "split" uses torch.amax (shared evenly among the ties, as timm does).


def cbam_channel_pool(x, max_ties="first"):
    """(mean, max) of x over H*W, each [N, C]."""
    mean = x.mean((2, 3))
    if max_ties == "first":
        mx = F.adaptive_max_pool2d(x, 1).flatten(1)
    else:
        mx = x.amax((2, 3))
    return mean, mx


def cbam_spatial_pool(x, max_ties="first"):
    """(mean, max) of x over C, each [N, 1, H, W]."""
    mean = x.mean(1, keepdim=True)
    if max_ties == "first":
        mx = torch.max(x, 1, keepdim=True)[0]
    else:
        mx = x.amax(1, keepdim=True)
    return mean, mx


def cbam_channel_gate(x, mlp_weight1, mlp_weight2, mlp_bias1=None, mlp_bias2=None, max_ties="first"):
    """sigmoid(MLP(mean_hw x) + MLP(max_hw x)) as [N, C, 1, 1]; weights [out, in] or [out, in, 1, 1]."""
    w1, w2 = mlp_weight1.flatten(1), mlp_weight2.flatten(1)
    mean, mx = cbam_channel_pool(x, max_ties)

    def mlp(v):
        return F.linear(F.relu(F.linear(v, w1, mlp_bias1)), w2, mlp_bias2)

    return torch.sigmoid(mlp(mean) + mlp(mx))[:, :, None, None]


def cbam_spatial_gate(x, conv_weight, conv_bias=None, spatial_bn=False, bn_weight=None, bn_bias=None,
                      bn_running_mean=None, bn_running_var=None, bn_training=False, bn_momentum=0.1, bn_eps=1e-5,
                      spatial_order="mean_max", max_ties="first"):
    """sigmoid([BN](conv(pooled map))) as [N, 1, H, W]; updates the BN running stats in training."""
    mean, mx = cbam_spatial_pool(x, max_ties)
    m = torch.cat([mean, mx] if spatial_order == "mean_max" else [mx, mean], 1)
    y = F.conv2d(m, conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2)
    if spatial_bn:
        y = F.batch_norm(y, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_momentum, bn_eps)
    return torch.sigmoid(y)


def cbam(x, mlp_weight1, mlp_weight2, conv_weight, *, mlp_bias1=None, mlp_bias2=None, conv_bias=None,
         spatial_bn=False, bn_weight=None, bn_bias=None, bn_running_mean=None, bn_running_var=None,
         bn_training=False, bn_momentum=0.1, bn_eps=1e-5, spatial_order="mean_max", max_ties="first"):
    """CBAM block: x' = x * Mc(x); out = x' * Ms(x'). Same arguments as fastnn.ops.cbam.cbam."""
    x = x * cbam_channel_gate(x, mlp_weight1, mlp_weight2, mlp_bias1, mlp_bias2, max_ties)
    return x * cbam_spatial_gate(x, conv_weight, conv_bias, spatial_bn, bn_weight, bn_bias, bn_running_mean,
                                 bn_running_var, bn_training, bn_momentum, bn_eps, spatial_order, max_ties)


# ---------------------------------------------------------------- stochastic_pool


# ---------------------------------------------------------------- drop_block
