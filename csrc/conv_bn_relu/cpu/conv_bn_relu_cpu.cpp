// CPU kernels of the fused BatchNorm(+ReLU): training statistics, normalize+affine+ReLU, and
// the backward with the ReLU mask folded into the two per-channel sums and dx.
//
// Assumptions (checked by conv_bn_relu.cpp): activations dense in the layout of Geometry,
// dtype float/double/half/bfloat16; per-channel tensors contiguous in acc_t
// (float, or double for double activations); outputs preallocated with the input's layout.
//
// Parallelism (at::parallel_for, OpenMP):
//   NCHW: one task per channel. A channel's N rows of S values are reduced, then (for the
//         fused ops) normalized or differentiated right away, while they are still in L2.
//   NHWC: row blocks. Each task keeps per-channel partial sums for its rows; a short serial
//         pass over the tasks combines them; the elementwise pass is then parallel over rows.
// Inner loops run over contiguous memory with `omp simd` so the compiler vectorizes them.
// Sums are taken in acc_t over chunks of at most kChunk values and then added in double.
#include "conv_bn_relu/cpu/conv_bn_relu_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "conv_bn_relu/conv_bn_relu_math.h"

// x86-64 builds target SSE2 only; an AVX2 copy of the kernels doubles the arithmetic throughput
// of these loops on the L2/L3-resident data they mostly see. No FMA on purpose: the forward and the
// backward must round (x - mean) * alpha + beta the same way to agree on the ReLU mask, and without
// FMA instructions the compiler cannot contract one of them and not the other.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTNN_CBR_AVX2 1
#endif

namespace fastnn {
namespace cbr {

namespace generic {
#include "conv_bn_relu/cpu/conv_bn_relu_cpu_kernels.h"
}  // namespace generic

#ifdef FASTNN_CBR_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace avx2 {
#include "conv_bn_relu/cpu/conv_bn_relu_cpu_kernels.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {
// FASTNN_CPU_ISA=generic forces the baseline kernels (tests run both).
bool use_avx2() {
#ifdef FASTNN_CBR_AVX2
  static const bool cpu_has = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("FASTNN_CPU_ISA");
  return cpu_has && !(env != nullptr && std::strcmp(env, "generic") == 0);
#else
  return false;
#endif
}
}  // namespace

#ifdef FASTNN_CBR_AVX2
#define CBR_ISA_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))
#else
#define CBR_ISA_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif

void stats_cpu(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var) {
  CBR_ISA_CALL(stats_kernel, x, g, mean, var);
}

void apply_cpu(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  CBR_ISA_CALL(apply_kernel, x, g, p, y);
}

void train_cpu(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  CBR_ISA_CALL(train_kernel, x, g, p, y);
}

void backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu) {
  CBR_ISA_CALL(backward_reduce_kernel, dy, x, g, p, sum_dz, sum_dz_xmu);
}

void backward_elemt_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                        const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, double inv_count,
                        const at::Tensor& dx) {
  CBR_ISA_CALL(backward_elemt_kernel, dy, x, g, p, sum_dz, sum_dz_xmu, inv_count, dx);
}

void backward_cpu(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                  const at::Tensor& dx, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                  const at::Tensor& grad_weight) {
  CBR_ISA_CALL(backward_kernel, dy, x, g, p, dx, sum_dz, sum_dz_xmu, grad_weight);
}

}  // namespace cbr
}  // namespace fastnn
