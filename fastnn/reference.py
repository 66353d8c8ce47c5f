"""The pure-PyTorch reference of every op.

One reference per op, used by the tests, the benchmarks and the fallback alike.
These favour clarity and exact PyTorch semantics over speed.
"""
import torch
import torch.nn.functional as F  # noqa: F401


# ---------------------------------------------------------------- conv_bn_relu

def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5, relu=True):
    """BatchNorm (F.batch_norm semantics, running statistics updated in place) then ReLU."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(y) if relu else y


def conv_bn_relu(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training=False,
                 momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """Conv2d -> BatchNorm2d -> ReLU as PyTorch's modules run them (zero padding)."""
    y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    return batch_norm_relu(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, relu)


def fold_conv_bn(conv_weight, conv_bias, running_mean, running_var, eps, bn_weight=None, bn_bias=None):
    """BatchNorm folded into the conv before it: the formula of torch.nn.utils.fusion.fuse_conv_bn_weights.

    w' = w * gamma / sqrt(var + eps) (per output channel), b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in the conv weight's dtype, or float32 if that is lower; differentiable."""
    dt = conv_weight.dtype
    ct = torch.promote_types(dt, torch.float32)
    if conv_bias is None:
        conv_bias = torch.zeros_like(running_mean, dtype=ct)
    if bn_weight is None:
        bn_weight = torch.ones_like(running_mean, dtype=ct)
    if bn_bias is None:
        bn_bias = torch.zeros_like(running_mean, dtype=ct)
    scale = bn_weight.to(ct) * torch.rsqrt(running_var.to(ct) + eps)
    shape = [-1] + [1] * (conv_weight.dim() - 1)
    w = (conv_weight.to(ct) * scale.reshape(shape)).to(dt)
    b = ((conv_bias.to(ct) - running_mean.to(ct)) * scale + bn_bias.to(ct)).to(dt)
    return w, b


def bn_relu_stats(input):
    """Per-channel mean and biased variance (float64 internally; float32, or float64 for float64 input)."""
    sd = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, input.dim()))
    x = input.double()
    if input.numel() == 0:
        z = input.new_zeros(input.shape[1], dtype=sd)
        return z, z.clone()
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean.to(sd), var.to(sd)


def _bn_view(t, input):
    return t.reshape([1, -1] + [1] * (input.dim() - 2))


def bn_relu_apply(input, mean, var, weight=None, bias=None, eps=1e-5, relu=True):
    """relu?((x - mean) / sqrt(var + eps) * weight + bias), computed in the statistics dtype."""
    sd = mean.dtype
    invstd = torch.rsqrt(var.to(sd) + eps)
    alpha = invstd if weight is None else weight.to(sd) * invstd
    y = (input.to(sd) - _bn_view(mean, input)) * _bn_view(alpha, input)
    if bias is not None:
        y = y + _bn_view(bias.to(sd), input)
    if relu:
        y = F.relu(y)
    return y.to(input.dtype)


def bn_relu_backward(grad_out, input, mean, var, weight=None, bias=None, eps=1e-5, relu=True, count=None,
                     sums=None):
    """Training-mode BatchNorm(+ReLU) backward in float64: (grad_input, grad_weight, grad_bias).

    `sums` = (sum_dz, sum_dz_xmu) to use instead of the local ones (SyncBatchNorm), with `count`
    the values per channel they were taken over."""
    x = input.double()
    m = _bn_view(mean.double(), input)
    invstd = torch.rsqrt(var.double() + eps)
    w = torch.ones_like(invstd) if weight is None else weight.double()
    pre = (x - m) * _bn_view(w * invstd, input)
    if bias is not None:
        pre = pre + _bn_view(bias.double(), input)
    dz = grad_out.double()
    if relu:
        dz = torch.where(pre > 0, dz, torch.zeros_like(dz))
    dims = [0] + list(range(2, input.dim()))
    sum_dz = dz.sum(dims)
    sum_dz_xmu = (dz * (x - m)).sum(dims)
    gw, gb = sum_dz_xmu * invstd, sum_dz
    if sums is None:
        sums = (sum_dz, sum_dz_xmu)
        count = input.numel() // input.shape[1]
    s1, s2 = (s.double() for s in sums)
    k1 = w * invstd
    dx = _bn_view(k1, input) * (dz - _bn_view(s1 / count, input)
                                - (x - m) * _bn_view(invstd * invstd * s2 / count, input))
    return dx.to(input.dtype), gw, gb


# ---------------------------------------------------------------- flash_attention


# ---------------------------------------------------------------- cbam


# ---------------------------------------------------------------- stochastic_pool


# ---------------------------------------------------------------- drop_block
