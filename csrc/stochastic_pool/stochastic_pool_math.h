#pragma once
// Stochastic pooling math shared by the CPU and CUDA kernels (Zeiler & Fergus 2013).
//
// A window is read into an accessor W (W(i) is the value at window offset i = r*kw + c of the
// unclipped window; padded positions read as the mode's pad value: 0 in 'activation' mode, -inf in
// 'softmax' mode, so their weight is exactly 0 and they are never chosen).
// Loops run to N when N > 0 (compile-time window size: fully unrolled, the window stays in
// registers) or to the runtime count n when N == 0.
//
// Randomness: counter-based Philox4x32-10. Output e (its logical NCHW linear index, so every
// memory layout draws the same samples) takes word e & 3 of the block at counter
// (offset / 4, e >> 2) under key = seed. On CUDA, (seed, offset) come from the CUDA generator's
// PhiloxCudaState (this op reserves 4 32-bit values per element, the layout curand uses); on the
// CPU, seed is drawn from the CPU generator and offset is 0.
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/host_device.h"

// The GPU variant of the code paths that differ (sample_offset); FASTNN_SP_EMULATE_DEVICE selects
// it on the host too, for the CPU emulation of the CUDA kernels in the tests.
#if defined(__CUDA_ARCH__) || defined(FASTNN_SP_EMULATE_DEVICE)
#define FASTNN_SP_DEVICE_PATH 1
#else
#define FASTNN_SP_DEVICE_PATH 0
#endif

// Full unrolling of the window loops matters on the GPU (the window stays in registers); GCC
// unrolls these small constant-trip loops at -O3 by itself.
#if defined(__CUDACC__)
#define FASTNN_SP_UNROLL _Pragma("unroll")
#else
#define FASTNN_SP_UNROLL
#endif

namespace fastnn {
namespace stochastic_pool {

constexpr int kMaxWindow = 256;  // the sampled offset is stored in one byte
constexpr uint64_t kPhiloxIncrement = 4;  // 32-bit values reserved per element and call (CUDA)

enum Mode : int { kActivation = 0, kSoftmax = 1 };

// --------------------------------------------------------------------------- Philox4x32-10
// One 32x32 -> 64-bit multiply (a single IMAD.WIDE on the GPU) gives both halves.
FASTNN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
}

struct U32x4 {
  uint32_t v[4];
};

// Philox4x32 with 10 rounds (Salmon et al., SC'11): counter c, key (k0, k1).
FASTNN_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
FASTNN_SP_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// The Philox block of element group g = e >> 2 (4 outputs share one block).
FASTNN_HD U32x4 philox_block(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t ctr = offset / 4;
  return philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
                       static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
FASTNN_HD float uniform01(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

// Word k of a block, with selects rather than a dynamic index (which would put the block in
// local memory on the GPU).
FASTNN_HD uint32_t word_of(const U32x4& b, uint32_t k) {
  return k == 0 ? b.v[0] : k == 1 ? b.v[1] : k == 2 ? b.v[2] : b.v[3];
}

FASTNN_HD float uniform_for(uint64_t seed, uint64_t offset, uint64_t e) {
  return uniform01(word_of(philox_block(seed, offset, e >> 2), static_cast<uint32_t>(e & 3)));
}

// --------------------------------------------------------------------------- window helpers
// Offset of the first in-bounds element of the window starting at (hs, ws) (may be negative:
// padding). Every window has one: padding <= kernel / 2 and the last window starts inside.
FASTNN_HD int first_valid_offset(int64_t hs, int64_t ws, int kw) {
  const int r = hs < 0 ? static_cast<int>(-hs) : 0;
  const int c = ws < 0 ? static_cast<int>(-ws) : 0;
  return r * kw + c;
}

template <typename acc_t>
FASTNN_HD acc_t pad_value(int mode) {
  return mode == kSoftmax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
}

// exp in the accumulation type (nvcc's --use_fast_math turns the float one into __expf).
template <typename acc_t>
FASTNN_HD acc_t exp_acc(acc_t x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

FASTNN_HD int loop_count(int N, int n) { return N > 0 ? N : n; }

// Per-window statistics. Activation: s1 = sum a, m = max a, s2 = sum a * (a / m) (sum a^2 scaled by
// 1 / m, so it neither overflows for a ~ 1e20 nor underflows for a ~ 1e-30 in float32; only the eval
// output needs it), neg = any a < 0. Softmax: m = max a, z = sum exp(a - m), zy = sum exp(a - m) * a.
template <typename acc_t>
struct Stats {
  acc_t s1, s2;  // activation: sum a, sum a^2 / m; softmax: z, zy
  acc_t m;       // max a
  bool neg;
};

// Where window_stats may keep the softmax weights exp(a_i - m) so the draw does not recompute
// them: an array for compile-time windows (registers on the GPU), nothing for runtime ones.
template <typename acc_t, int N>
struct WeightCache {
  acc_t v[N];
  FASTNN_HD void put(int i, acc_t x) { v[i] = x; }
};
struct NoWeightCache {
  template <typename T>
  FASTNN_HD void put(int, T) {}
};

template <int N, int MODE, typename acc_t, bool S2 = true, typename W, typename Cache>
FASTNN_HD Stats<acc_t> window_stats(const W& w, int n, Cache& cache) {
  Stats<acc_t> st;
  st.s1 = acc_t(0);
  st.s2 = acc_t(0);
  st.m = acc_t(0);
  st.neg = false;
  const int cnt = loop_count(N, n);
  if (MODE == kActivation) {
    acc_t m = acc_t(0);
FASTNN_SP_UNROLL
    for (int i = 0; i < cnt; ++i) {
      const acc_t a = w(i);
      st.neg |= a < acc_t(0);
      st.s1 += a;
      m = a > m ? a : m;
    }
    st.m = m;
    if (S2 && m > acc_t(0)) {  // (a / m, not a * (1 / m): 1 / m overflows for a denormal m)
FASTNN_SP_UNROLL
      for (int i = 0; i < cnt; ++i) {
        const acc_t a = w(i);
        st.s2 += a * (a / m);
      }
    }
  } else {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
FASTNN_SP_UNROLL
    for (int i = 0; i < cnt; ++i) {
      const acc_t a = w(i);
      m = a > m ? a : m;
    }
    st.m = m;
FASTNN_SP_UNROLL
    for (int i = 0; i < cnt; ++i) {
      const acc_t a = w(i);
      const acc_t e = exp_acc<acc_t>(a - m);
      cache.put(i, e);
      st.s1 += e;
      st.s2 += e != acc_t(0) ? e * a : acc_t(0);  // padded/-inf entries add 0, not 0 * -inf
    }
  }
  return st;
}

template <int N, int MODE, typename acc_t, typename W>
FASTNN_HD Stats<acc_t> window_stats(const W& w, int n) {
  NoWeightCache none;
  return window_stats<N, MODE, acc_t>(w, n, none);
}

// Sampling weight of entry i (unnormalised p_i): a_i, or exp(a_i - m) cached or recomputed.
template <int MODE, typename acc_t>
FASTNN_HD acc_t weight_of(acc_t a, acc_t m, int, const NoWeightCache&) {
  return MODE == kActivation ? a : exp_acc<acc_t>(a - m);
}
template <int MODE, typename acc_t, int N>
FASTNN_HD acc_t weight_of(acc_t a, acc_t, int i, const WeightCache<acc_t, N>& c) {
  return MODE == kActivation ? a : c.v[i];
}

template <int MODE, typename acc_t>
FASTNN_HD acc_t total_weight(const Stats<acc_t>& st) {
  return st.s1;  // activation: sum a; softmax: z
}

// Eval output: sum p_i a_i.
template <int MODE, typename acc_t>
FASTNN_HD acc_t eval_value(const Stats<acc_t>& st) {
  if (MODE == kActivation) return st.s1 > acc_t(0) ? st.m * (st.s2 / st.s1) : acc_t(0);  // all-zero window -> 0
  return st.s2 / st.s1;
}

// d(eval output)/d a_i. Activation: y = sum a^2 / s1 -> (2 a_i - y) / s1 (0 for an all-zero window).
// Softmax: y = sum p a -> p_i (1 + a_i - y).
template <int MODE, typename acc_t>
FASTNN_HD acc_t eval_grad(const Stats<acc_t>& st, acc_t y, acc_t a) {
  if (MODE == kActivation) return st.s1 > acc_t(0) ? (acc_t(2) * a - y) / st.s1 : acc_t(0);
  const acc_t p = exp_acc<acc_t>(a - st.m) / st.s1;
  return p != acc_t(0) ? p * (acc_t(1) + a - y) : acc_t(0);
}

// Inverse-CDF draw: the first offset whose cumulative weight exceeds t = u * total, i.e. the
// number of cumulative weights <= t (cum never decreases). A zero-weight (padded) entry can never
// be first. If rounding leaves no such entry, the last entry with a positive weight is taken.
// Returns the offset; *val gets its value. Requires total > 0.
// u is random, so everything is counts and selects, no data-dependent branch (it would
// mispredict on the CPU and diverge on the GPU). Reading the chosen value is the one difference:
// the CPU indexes the window; the GPU selects it, as a dynamic index would move the register
// window to local memory.
template <int N, int MODE, typename acc_t, typename W, typename Cache>
FASTNN_HD int sample_offset(const W& w, int n, const Stats<acc_t>& st, const Cache& cache, float u, acc_t* val) {
  const acc_t t = static_cast<acc_t>(u) * total_weight<MODE>(st);
  const int cnt = loop_count(N, n);
  acc_t cum = acc_t(0);
  int below = 0, last = 0;
FASTNN_SP_UNROLL
  for (int i = 0; i < cnt; ++i) {
    const acc_t wt = weight_of<MODE>(w(i), st.m, i, cache);
    cum += wt;
    below += cum <= t;
    last = wt > acc_t(0) ? i : last;
  }
  const int pick = below < cnt ? below : last;
#if FASTNN_SP_DEVICE_PATH
  acc_t v = acc_t(0);
FASTNN_SP_UNROLL
  for (int i = 0; i < cnt; ++i) v = i == pick ? w(i) : v;
  *val = v;
#else
  *val = w(pick);
#endif
  return pick;
}

// Forward of one output. Returns the output value; *offset gets the sampled offset (training).
//  - activation mode with a negative value in the window: NaN (the caller also raises);
//  - a window whose total weight is NaN, or infinite (an inf in activation mode: p = inf / inf): NaN;
//  - activation mode, all-zero window: 0, offset = first in-bounds element (as max_pool's tie rule).
template <int N, int MODE, bool TRAIN, typename acc_t, typename W>
FASTNN_HD acc_t forward_one(const W& w, int n, float u, int first_valid, int* offset, bool* neg) {
  // Softmax training with a compile-time window keeps the weights; otherwise nothing is cached.
  using Cache = typename std::conditional<(N > 0 && MODE == kSoftmax && TRAIN), WeightCache<acc_t, (N > 0 ? N : 1)>,
                                          NoWeightCache>::type;
  Cache cache;
  const Stats<acc_t> st = window_stats<N, MODE, acc_t, !TRAIN>(w, n, cache);  // training needs no s2
  *neg = MODE == kActivation && st.neg;
  *offset = first_valid;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if (MODE == kActivation && st.neg) return nan;
  const acc_t total = total_weight<MODE>(st);
  if (!(total <= std::numeric_limits<acc_t>::max())) return nan;  // NaN or +inf
  if (!TRAIN) return eval_value<MODE>(st);
  if (!(total > acc_t(0))) return acc_t(0);
  acc_t v;
  *offset = sample_offset<N, MODE, acc_t>(w, n, st, cache, u, &v);
  return v;
}

// Output size of one spatial dim, exactly as nn.MaxPool2d (dilation 1): floor or ceil, and with
// ceil_mode the last window must start inside the input or the left padding.
FASTNN_HD int64_t pooled_size(int64_t in, int k, int s, int p, bool ceil_mode) {
  const int64_t num = in + 2 * p - k + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;  // floor division
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Geometry and strides of one call (element strides; sizes in elements).
struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int kh, kw, sh, sw, ph, pw;
  int64_t xs[4];  // input strides (n, c, h, w)
  int64_t ys[4];  // output strides, forward; grad_input strides, backward
  int64_t os[4];  // offsets strides (training)
  int64_t gs[4];  // grad_output strides (backward)
  bool channels_last;  // iteration order: c fastest (true) or w fastest (false)
};

}  // namespace stochastic_pool
}  // namespace fastnn
