#pragma once
// CBAM's passes over x on the GPU (csrc/cbam/cuda/cbam_cuda.cu): the same contract as the CPU
// kernels (csrc/cbam/cpu/cbam_cpu.h), on CUDA tensors of one device, run on the current stream.
//
// Assumptions, checked by the caller (csrc/cbam/cbam.cpp):
//   x, dout, out, dx: [N, C, H, W], one dtype (float, double, half, bfloat16), contiguous in NCHW
//     (cl = false) or channels_last (cl = true); dout/out/dx in the same layout as x.
//   small tensors: contiguous, accumulation dtype (double for double x, else float):
//     g [N, C], s [N, P], pooled_c [2, N, C], pooled_s [N, 2, P]; sel_* int32.
// The math per element is in cbam_math.h (shared with the CPU kernels).
#include <ATen/core/Tensor.h>

namespace fastnn {
namespace cbam {
namespace cuda {

// pooled_c[0] = mean over H*W, pooled_c[1] = max over H*W; sel_c = first index (first) or ties.
void channel_pool(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c);
// pooled_s[:, 0] = mean_c x*g, pooled_s[:, 1] = max_c x*g; sel_s as above.
void spatial_pool(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,
                  at::Tensor& sel_s);
// out = (x*g[c])*s[p]
void apply_gates(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out);
// ds[n,p] = sum_c dout*x*g[c];  dg[n,c] = sum_p dout*x*s[p]
void backward_reduce(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                     at::Tensor& ds, at::Tensor& dg);
// dg2[n,c] = sum_p cbam_gate_term(x, wa[p], at max_c, em[p]); wa, em: [N, P]
void backward_gate(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa, const at::Tensor& em,
                   const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first, at::Tensor& dg2);
// dx = cbam_dx(...); a2, e2: [N, C]. Parts may be absent (undefined tensors): dout (then s too),
// the spatial part (wa, em, pooled_s, sel_s) or the channel part (a2, e2, pooled_c, sel_c).
// g undefined means g = 1.
void backward_input(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                    const at::Tensor& wa, const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s,
                    const at::Tensor& a2, const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c,
                    bool first, at::Tensor& dx);

// The whole forward in one launch (one block per sample) for small samples, with the spatial BN
// absent or in eval mode. Small tensors in the accumulation type, contiguous: w1 [Cr, C], w2
// [C, Cr], wc [1, 2, k, k] in [mean, max] order; b1, b2, cb, bn_* may be undefined. Writes what
// the multi-kernel forward writes (out, the gates, the pooled maps, conv_out, sel_*). Returns
// false, doing nothing, when the sample is too large for it (or FASTNN_CBAM_FUSED=0).
bool fused_forward(const at::Tensor& x, bool cl, bool first, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& wc, const at::Tensor& cb,
                   const at::Tensor& bn_mean, const at::Tensor& bn_var, const at::Tensor& bn_w, const at::Tensor& bn_b,
                   double bn_eps, at::Tensor& out, at::Tensor& gate_c, at::Tensor& gate_s, at::Tensor& pooled_c,
                   at::Tensor& pooled_s, at::Tensor& conv_out, at::Tensor& sel_c, at::Tensor& sel_s);

}  // namespace cuda
}  // namespace cbam
}  // namespace fastnn
