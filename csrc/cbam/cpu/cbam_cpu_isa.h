#pragma once
// Headers the CPU kernel bodies (cbam_cpu_kernels.h) need. Included by each instruction-set
// translation unit BEFORE any `#pragma GCC target`, so ATen/c10 inline code keeps the baseline ISA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cbam/cbam_math.h"

namespace fastnn {
namespace cbam {
namespace cpu {
// The kernel entry points of one instruction set (see cbam_cpu.h for the contract).
#define FASTNN_CBAM_DECLARE_ISA(ns)                                                                                \
  namespace ns {                                                                                                   \
  void channel_pool_entry(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c);      \
  void spatial_pool_entry(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,     \
                          at::Tensor& sel_s);                                                                      \
  void apply_gates_entry(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out); \
  void backward_reduce_entry(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,            \
                             const at::Tensor& s, at::Tensor& ds, at::Tensor& dg);                                 \
  void backward_gate_entry(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa,                \
                           const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first,  \
                           at::Tensor& dg2);                                                                       \
  void backward_input_entry(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,             \
                            const at::Tensor& s, const at::Tensor& wa, const at::Tensor& em,                       \
                            const at::Tensor& pooled_s, const at::Tensor& sel_s, const at::Tensor& a2,             \
                            const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c, bool first, \
                            at::Tensor& dx);                                                                       \
  void spatial_conv_entry(const at::Tensor& ps, const at::Tensor& w, at::Tensor& y);                               \
  void spatial_conv_backward_entry(const at::Tensor& dy, const at::Tensor& ps, const at::Tensor& w,                \
                                   at::Tensor& dps, at::Tensor& dw);                                               \
  }
FASTNN_CBAM_DECLARE_ISA(base)
FASTNN_CBAM_DECLARE_ISA(avx2)

// Defines the entry points of the ISA the including translation unit compiled the kernels for.
#define FASTNN_CBAM_DEFINE_ENTRIES()                                                                                \
  void channel_pool_entry(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c) {      \
    channel_pool(x, cl, first, pooled_c, sel_c);                                                                    \
  }                                                                                                                 \
  void spatial_pool_entry(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,     \
                          at::Tensor& sel_s) {                                                                      \
    spatial_pool(x, cl, g, first, pooled_s, sel_s);                                                                 \
  }                                                                                                                 \
  void apply_gates_entry(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out) { \
    apply_gates(x, cl, g, s, out);                                                                                  \
  }                                                                                                                 \
  void backward_reduce_entry(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,            \
                             const at::Tensor& s, at::Tensor& ds, at::Tensor& dg) {                                 \
    backward_reduce(dout, x, cl, g, s, ds, dg);                                                                     \
  }                                                                                                                 \
  void backward_gate_entry(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa,                \
                           const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first,  \
                           at::Tensor& dg2) {                                                                       \
    backward_gate(x, cl, g, wa, em, pooled_s, sel_s, first, dg2);                                                   \
  }                                                                                                                 \
  void backward_input_entry(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,             \
                            const at::Tensor& s, const at::Tensor& wa, const at::Tensor& em,                       \
                            const at::Tensor& pooled_s, const at::Tensor& sel_s, const at::Tensor& a2,             \
                            const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c, bool first, \
                            at::Tensor& dx) {                                                                       \
    backward_input(dout, x, cl, g, s, wa, em, pooled_s, sel_s, a2, e2, pooled_c, sel_c, first, dx);                 \
  }                                                                                                                 \
  void spatial_conv_entry(const at::Tensor& ps, const at::Tensor& w, at::Tensor& y) { spatial_conv(ps, w, y); }     \
  void spatial_conv_backward_entry(const at::Tensor& dy, const at::Tensor& ps, const at::Tensor& w,                \
                                   at::Tensor& dps, at::Tensor& dw) {                                               \
    spatial_conv_backward(dy, ps, w, dps, dw);                                                                      \
  }
}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
