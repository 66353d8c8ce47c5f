#pragma once
// CUDA kernels of the fused BatchNorm(+ReLU); same contract as cpu/conv_bn_relu_cpu.h.
#include "conv_bn_relu/conv_bn_relu_kernels.h"

namespace fastnn {
namespace cbr {

void stats_cuda(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var);
void apply_cuda(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y);
void train_cuda(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y);
void backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                          const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu);
void backward_elemt_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, double inv_count,
                         const at::Tensor& dx);
void backward_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                   const at::Tensor& dx, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                   const at::Tensor& grad_weight);

}  // namespace cbr
}  // namespace fastnn
