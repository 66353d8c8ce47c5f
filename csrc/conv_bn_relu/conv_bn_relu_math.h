#pragma once
// Per-channel and per-element math of the fused BatchNorm(+ReLU), shared by the CPU
// and CUDA kernels so that the CPU tests also cover what the GPU computes.
//
// Notation, per channel c over its n = N*H*W values x:
//   mean, var (biased), invstd = 1/sqrt(var + eps)
//   pre = (x - mean) * alpha + beta     with alpha = w * invstd, beta = b
//   y   = relu ? max(pre, 0) : pre      (NaN propagates, as torch.relu)
// Backward, dz = dy where pre > 0 (or everywhere without ReLU):
//   sum_dz = sum(dz), sum_dz_xmu = sum(dz * (x - mean))
//   grad_bias = sum_dz, grad_weight = sum_dz_xmu * invstd
//   dx = k1 * dz + k2 * (x - mean) + k3 with
//     k1 = w * invstd, k2 = -w * invstd^3 * sum_dz_xmu / n, k3 = -w * invstd * sum_dz / n
//   (the eval-mode backward is the same with both sums taken as zero).
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastnn {
namespace cbr {

// (count, mean, sum of squared deviations) of a set of values.
template <typename T>
struct Welford {
  T n;
  T mean;
  T m2;
};

// The Welford triple of n values from their sums shifted by `shift` (any value close to
// the data, e.g. its first element): s1 = sum(x - shift), s2 = sum((x - shift)^2).
// The shift keeps s2 - s1^2/n free of the cancellation of the plain sum/sum-of-squares.
template <typename T>
FASTNN_HD Welford<T> welford_from_shifted(T n, T s1, T s2, T shift) {
  Welford<T> w;
  if (!(n > T(0))) {
    w.n = T(0);
    w.mean = T(0);
    w.m2 = T(0);
    return w;
  }
  const T d = s1 / n;
  const T m2 = s2 - s1 * d;
  w.n = n;
  w.mean = shift + d;
  w.m2 = m2 < T(0) ? T(0) : m2;  // clamps rounding below 0; a NaN (NaN/Inf in the data) stays NaN
  return w;
}

// Chan et al.'s parallel combination of two Welford triples (order-independent up to rounding).
template <typename T>
FASTNN_HD Welford<T> welford_combine(const Welford<T>& a, const Welford<T>& b) {
  if (!(b.n > T(0))) return a;
  if (!(a.n > T(0))) return b;
  Welford<T> w;
  w.n = a.n + b.n;
  const T delta = b.mean - a.mean;
  const T fb = b.n / w.n;
  w.mean = a.mean + delta * fb;
  w.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
  return w;
}

// Biased variance of a Welford triple (0 for an empty set).
template <typename T>
FASTNN_HD T welford_var(const Welford<T>& w) {
  return w.n > T(0) ? w.m2 / w.n : T(0);
}

FASTNN_HD float bn_invstd(float var, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(var + eps);
#else
  return 1.0f / std::sqrt(var + eps);
#endif
}

FASTNN_HD double bn_invstd(double var, double eps) {
#if defined(__CUDA_ARCH__)
  return rsqrt(var + eps);
#else
  return 1.0 / std::sqrt(var + eps);
#endif
}

// Per-channel constants of the forward: pre = (x - mean) * alpha + beta.
template <typename T>
struct FwdCoef {
  T mean;
  T alpha;
  T beta;
};

// w/b are null for affine=False (w = 1, b = 0).
template <typename T>
FASTNN_HD FwdCoef<T> fwd_coef(T mean, T var, const T* w, const T* b, int64_t c, T eps) {
  FwdCoef<T> k;
  const T invstd = bn_invstd(var, eps);
  k.mean = mean;
  k.alpha = w ? w[c] * invstd : invstd;
  k.beta = b ? b[c] : T(0);
  return k;
}

// The forward and the backward both decide the ReLU mask with this one expression, so the
// mask the backward recomputes from the saved input is the one the forward applied.
template <typename T>
FASTNN_HD T bn_pre(T x, const FwdCoef<T>& k) {
  return (x - k.mean) * k.alpha + k.beta;
}

template <typename T>
FASTNN_HD T relu_if(T v, bool relu) {
  return (relu && v <= T(0)) ? T(0) : v;  // NaN stays NaN, as torch.relu
}

// Gradient reaching the BatchNorm output through the ReLU (threshold_backward: 0 where y <= 0
// or y is NaN).
template <typename T>
FASTNN_HD T relu_grad(T dy, T pre, bool relu) {
  return (!relu || pre > T(0)) ? dy : T(0);
}

// Per-channel constants of the input gradient: dx = k1 * dz + k2 * (x - mean) + k3.
template <typename T>
struct BwdCoef {
  T k1;
  T k2;
  T k3;
};

template <typename T>
FASTNN_HD BwdCoef<T> bwd_coef(T var, const T* w, int64_t c, T eps, T sum_dz, T sum_dz_xmu, T inv_count) {
  BwdCoef<T> k;
  const T invstd = bn_invstd(var, eps);
  const T wi = w ? w[c] * invstd : invstd;
  k.k1 = wi;
  k.k2 = -wi * invstd * invstd * sum_dz_xmu * inv_count;
  k.k3 = -wi * sum_dz * inv_count;
  return k;
}

template <typename T>
FASTNN_HD T bn_dx(T dz, T xmu, const BwdCoef<T>& k) {
  return dz * k.k1 + xmu * k.k2 + k.k3;
}

}  // namespace cbr
}  // namespace fastnn
