#pragma once
// CBAM on the GPU. The passes over x (csrc/cbam/cuda/cbam_cuda.cu) have the same contract as the CPU
// kernels (csrc/cbam/cpu/cbam_cpu.h), on CUDA tensors of one device, run on the current stream; the
// generic orchestration in cbam.cpp uses them with FASTNN_CBAM_CUDA_LEGACY=1 and for the pool ops.
// forward / backward (csrc/cbam/cuda/cbam_cuda_fast.cu) run the whole op in custom kernels.
//
// Assumptions, checked by the caller (csrc/cbam/cbam.cpp):
//   x, dout, out, dx: [N, C, H, W], one dtype (float, double, half, bfloat16), contiguous in NCHW
//     (cl = false) or channels_last (cl = true); dout/out/dx in the same layout as x.
//   small tensors: contiguous, accumulation dtype (double for double x, else float):
//     g [N, C], s [N, P], pooled_c [2, N, C], pooled_s [N, 2, P]; sel_* int32.
// The math per element is in cbam_math.h (shared with the CPU kernels).
#include <ATen/core/Tensor.h>

#include <vector>

#include "cbam/cbam_params.h"

namespace fastnn {
namespace cbam {
namespace cuda {

#include "cbam/cbam_passes.inc"

// ---- the whole op in custom kernels (cbam_cuda_fast.cu), the default on CUDA
// forward: x contiguous in its layout (cl); out like x; saved / saved_idx allocated as laid out in
// cbam_saved.h (the accumulation type / int32). Fills all three and returns true, or returns false
// having done nothing for what it does not take (N > 65535, a spatial kernel above 31): the caller
// then runs the generic orchestration, whose saved buffers mean the same.
bool forward(const at::Tensor& x, bool cl, const OpParams& p, at::Tensor& out, at::Tensor& saved,
             at::Tensor& saved_idx);
// backward: dout in x's layout; sets `grads` to the gradients in the order of the cbam_backward
// schema (csrc/cbam/cbam.cpp), each in its input's dtype and shape, and returns true; or false as
// above (also for saved buffers not 64-byte aligned).
bool backward(const at::Tensor& dout, const at::Tensor& x, bool cl, const OpParams& p, const at::Tensor& saved,
              const at::Tensor& saved_idx, bool needs_input_grad, std::vector<at::Tensor>& grads);

}  // namespace cuda
}  // namespace cbam
}  // namespace fastnn
