#pragma once
// CPU kernels of the fused BatchNorm(+ReLU). Inputs: dense activations in the layout of `g`
// (see conv_bn_relu_kernels.h), float32/float64/float16/bfloat16; outputs preallocated by the
// caller with the same layout; per-channel tensors in the statistics dtype.
#include "conv_bn_relu/conv_bn_relu_kernels.h"

namespace fastnn {
namespace cbr {

// mean/var (biased) of each channel.
void stats_cpu(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var);
// y = relu?((x - mean) * w / sqrt(var + eps) + b) with the statistics in p.
void apply_cpu(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y);
// stats_cpu into p.mean/p.var, then apply_cpu; one channel at a time while it is in cache (NCHW).
void train_cpu(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y);
// sum_dz = sum(dz), sum_dz_xmu = sum(dz * (x - mean)), dz the gradient through the ReLU.
void backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu);
// dx from the (possibly all-reduced) sums; inv_count = 1 / values per channel over all ranks.
void backward_elemt_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                        const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, double inv_count,
                        const at::Tensor& dx);
// backward_reduce_cpu then backward_elemt_cpu with inv_count = 1 / (N*S), fused per channel (NCHW);
// also grad_weight = sum_dz_xmu / sqrt(var + eps).
void backward_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                  const at::Tensor& dx, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                   const at::Tensor& grad_weight);

}  // namespace cbr
}  // namespace fastnn
