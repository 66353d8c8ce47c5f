#pragma once
// CBAM's passes over x on the CPU (OpenMP through at::parallel_for).
//
// Assumptions, checked by the caller (csrc/cbam/cbam.cpp):
//   x, dout, out, dx: [N, C, H, W], one dtype (float, double, half, bfloat16), contiguous in NCHW
//     (cl = false) or channels_last (cl = true); dout/out/dx in the same layout as x.
//   small tensors: contiguous, accumulation dtype (double for double x, else float):
//     g [N, C], s [N, P], pooled_c [2, N, C], pooled_s [N, 2, P]; sel_* int32.
// The math per element is in cbam_math.h (shared with the CUDA kernels).
#include <ATen/core/Tensor.h>

namespace fastnn {
namespace cbam {
namespace cpu {

#include "cbam/cbam_passes.inc"

// The spatial gate's conv without bias: y = conv2d(ps, w, padding=k/2) and its two gradients.
// ps [N, 2, H, W], w [1, 2, k, k], y / dy [N, 1, H, W]: contiguous, float or double.
void spatial_conv(const at::Tensor& ps, const at::Tensor& w, at::Tensor& y);
void spatial_conv_backward(const at::Tensor& dy, const at::Tensor& ps, const at::Tensor& w, at::Tensor& dps,
                           at::Tensor& dw);

}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
