// CPU entry points: the baseline x86-64 (or other architecture) build of the kernels, and the
// run-time choice of the AVX2 build (cbam_cpu_avx2.cpp) where the CPU supports it.
#include "cbam/cpu/cbam_cpu.h"

#include "cbam/cpu/cbam_cpu_isa.h"

#define FASTNN_CBAM_ISA base
#include "cbam/cpu/cbam_cpu_kernels.h"

namespace fastnn {
namespace cbam {
namespace cpu {
namespace base {
FASTNN_CBAM_DEFINE_ENTRIES()
}  // namespace base

namespace {
bool use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}
}  // namespace

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTNN_CBAM_CALL(fn, ...) (use_avx2() ? avx2::fn##_entry(__VA_ARGS__) : base::fn##_entry(__VA_ARGS__))
#else
#define FASTNN_CBAM_CALL(fn, ...) base::fn##_entry(__VA_ARGS__)
#endif

void channel_pool(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c) {
  FASTNN_CBAM_CALL(channel_pool, x, cl, first, pooled_c, sel_c);
}
void spatial_pool(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,
                  at::Tensor& sel_s) {
  FASTNN_CBAM_CALL(spatial_pool, x, cl, g, first, pooled_s, sel_s);
}
void apply_gates(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out) {
  FASTNN_CBAM_CALL(apply_gates, x, cl, g, s, out);
}
void backward_reduce(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                     at::Tensor& ds, at::Tensor& dg) {
  FASTNN_CBAM_CALL(backward_reduce, dout, x, cl, g, s, ds, dg);
}
void backward_gate(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa, const at::Tensor& em,
                   const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first, at::Tensor& dg2) {
  FASTNN_CBAM_CALL(backward_gate, x, cl, g, wa, em, pooled_s, sel_s, first, dg2);
}
void backward_input(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                    const at::Tensor& wa, const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s,
                    const at::Tensor& a2, const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c,
                    bool first, at::Tensor& dx) {
  FASTNN_CBAM_CALL(backward_input, dout, x, cl, g, s, wa, em, pooled_s, sel_s, a2, e2, pooled_c, sel_c, first, dx);
}

void spatial_conv(const at::Tensor& ps, const at::Tensor& w, at::Tensor& y) {
  FASTNN_CBAM_CALL(spatial_conv, ps, w, y);
}
void spatial_conv_backward(const at::Tensor& dy, const at::Tensor& ps, const at::Tensor& w, at::Tensor& dps,
                           at::Tensor& dw) {
  FASTNN_CBAM_CALL(spatial_conv_backward, dy, ps, w, dps, dw);
}

}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
