#pragma once
// The per-thread bodies of the CUDA kernels of stochastic pooling, as FASTNN_HD functions of the
// thread's linear index e: stochastic_pool_cuda.cu wraps each in a __global__ kernel (one thread
// per e). Kept host-compilable (c10/ATen headers only, no CUDA intrinsics outside
// stochastic_pool_math.h) so the tests can run them on the CPU: tests/stochastic_pool_cuda_emu.cpp
// loops e over the grid and compares with the CPU kernels (race-free: each e writes its own
// outputs; the negative flag is a benign same-value store).
//
// Assumptions: out, offsets and grad_input are contiguous in the layout g.channels_last names
// (so a thread's linear index e is its element's offset); the input and grad_output may have any
// strides; each dim fits int32, sizes and strides int64.
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <cstdint>
#include <limits>

#include "stochastic_pool/stochastic_pool_math.h"

#if defined(__CUDACC__)
#define FASTNN_SP_RESTRICT __restrict__
#else
#define FASTNN_SP_RESTRICT
#endif

namespace fastnn {
namespace stochastic_pool {
namespace cuda_detail {

using Div32 = at::cuda::detail::IntDivider<unsigned int>;

// Splits a linear index into 4 coordinates, fastest first: i = ((a3*d2 + a2)*d1 + a1)*d0 + a0.
// 32-bit magic-number division when the whole range fits int32, 64-bit division otherwise.
struct Splitter {
  Div32 f[3];
  int64_t d[3];
  bool use32;

  Splitter(int64_t d0, int64_t d1, int64_t d2, int64_t total) : d{d0, d1, d2}, use32(total <= INT32_MAX) {
    if (use32) {
      f[0] = Div32(static_cast<unsigned int>(d0));
      f[1] = Div32(static_cast<unsigned int>(d1));
      f[2] = Div32(static_cast<unsigned int>(d2));
    }
  }

  FASTNN_HD void split(int64_t i, int64_t& a0, int64_t& a1, int64_t& a2, int64_t& a3) const {
    if (use32) {
      auto q = f[0].divmod(static_cast<unsigned int>(i));
      a0 = q.mod;
      q = f[1].divmod(q.div);
      a1 = q.mod;
      q = f[2].divmod(q.div);
      a2 = q.mod;
      a3 = q.div;
    } else {
      a0 = i % d[0];
      i /= d[0];
      a1 = i % d[1];
      i /= d[1];
      a2 = i % d[2];
      a3 = i / d[2];
    }
  }
};

// Splitter of a tensor contiguous in g's layout with spatial size (h_size, w_size).
inline Splitter make_splitter(const Geometry& g, int64_t h_size, int64_t w_size, int64_t total) {
  return g.channels_last ? Splitter(g.C, w_size, h_size, total) : Splitter(w_size, h_size, g.C, total);
}

// (n, c, h, w) of linear index i in that layout.
FASTNN_HD void coords(const Splitter& s, bool cl, int64_t i, int64_t& n, int64_t& c, int64_t& h, int64_t& w) {
  if (cl)
    s.split(i, c, w, h, n);
  else
    s.split(i, w, h, c, n);
}

// Fast division by the strides, for the gather kernels.
struct StrideDiv {
  Div32 h, w;
};

inline StrideDiv make_stride_div(const Geometry& g) {
  return StrideDiv{Div32(static_cast<unsigned int>(g.sh)), Div32(static_cast<unsigned int>(g.sw))};
}

// Disjoint windows (stride >= kernel): the backward writes each window from one thread.
inline bool disjoint(const Geometry& g) { return g.sh >= g.kh && g.sw >= g.kw; }

// Disjoint windows cover every input element iff they tile it: stride == kernel and the last
// window reaches the end (the first starts at -padding <= 0). Otherwise grad_input is zeroed first.
inline bool disjoint_covers_input(const Geometry& g) {
  return g.sh == g.kh && g.sw == g.kw && (g.OH - 1) * g.sh - g.ph + g.kh >= g.H &&
         (g.OW - 1) * g.sw - g.pw + g.kw >= g.W;
}

template <typename acc_t, int N>
struct RegWin {
  acc_t v[N];
  FASTNN_HD acc_t operator()(int i) const { return v[i]; }
};

// Reads the KH x KW window at (hs, ws) of the plane xp into registers (pad outside the input).
template <typename scalar_t, typename acc_t, int KH, int KW>
FASTNN_HD void load_regs(RegWin<acc_t, KH * KW>& w, const scalar_t* FASTNN_SP_RESTRICT xp, const Geometry& g,
                         int64_t hs, int64_t ws, acc_t pad) {
  if (hs >= 0 && ws >= 0 && hs + KH <= g.H && ws + KW <= g.W) {  // interior: no per-element checks
    const scalar_t* p = xp + hs * g.xs[2] + ws * g.xs[3];
FASTNN_SP_UNROLL
    for (int r = 0; r < KH; ++r)
FASTNN_SP_UNROLL
      for (int c = 0; c < KW; ++c) w.v[r * KW + c] = static_cast<acc_t>(p[r * g.xs[2] + c * g.xs[3]]);
    return;
  }
FASTNN_SP_UNROLL
  for (int r = 0; r < KH; ++r) {
    const int64_t ih = hs + r;
    const bool rin = ih >= 0 && ih < g.H;
FASTNN_SP_UNROLL
    for (int c = 0; c < KW; ++c) {
      const int64_t iw = ws + c;
      w.v[r * KW + c] = (rin && iw >= 0 && iw < g.W) ? static_cast<acc_t>(xp[ih * g.xs[2] + iw * g.xs[3]]) : pad;
    }
  }
}

// Generic window: every access re-reads global memory (cached).
template <typename scalar_t, typename acc_t>
struct MemWin {
  const scalar_t* xp;
  int64_t s2, s3, hs, ws, H, W;
  int kw;
  acc_t pad;
  FASTNN_HD acc_t operator()(int i) const {
    const int r = i / kw, c = i - r * kw;
    const int64_t ih = hs + r, iw = ws + c;
    return (ih >= 0 && ih < H && iw >= 0 && iw < W) ? static_cast<acc_t>(xp[ih * s2 + iw * s3]) : pad;
  }
};

// Calls f(window) with the window at (hs, ws): registers for KH > 0, else the generic reader.
template <typename scalar_t, int KH, int KW, int MODE, typename F>
FASTNN_HD void with_window(const scalar_t* xp, const Geometry& g, int64_t hs, int64_t ws, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pad = pad_value<acc_t>(MODE);
  if constexpr (KH > 0) {
    RegWin<acc_t, KH * KW> w;
    load_regs<scalar_t, acc_t, KH, KW>(w, xp, g, hs, ws, pad);
    f(w);
  } else {
    const MemWin<scalar_t, acc_t> w{xp, g.xs[2], g.xs[3], hs, ws, g.H, g.W, g.kw, pad};
    f(w);
  }
}

// ------------------------------------------------------------------------------ forward
// One output e (in out's memory order). u from Philox (seed, offset) at the logical NCHW index.
template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
FASTNN_HD void forward_thread(int64_t e, const scalar_t* FASTNN_SP_RESTRICT x, scalar_t* FASTNN_SP_RESTRICT y,
                              uint8_t* FASTNN_SP_RESTRICT off, int* neg_flag, const Geometry& g, const Splitter& sp,
                              uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = KH * KW;
  int64_t n, c, oh, ow;
  coords(sp, g.channels_last, e, n, c, oh, ow);
  const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
  float u = 0.f;
  if (TRAIN) {
    // Logical NCHW index: the same samples whatever the memory layout.
    const int64_t le = g.channels_last ? ((n * g.C + c) * g.OH + oh) * g.OW + ow : e;
    u = uniform_for(seed, offset, static_cast<uint64_t>(le));
  }
  const int fv = first_valid_offset(hs, ws, g.kw);
  int o = fv;
  bool neg = false;
  acc_t v = acc_t(0);
  with_window<scalar_t, KH, KW, MODE>(x + n * g.xs[0] + c * g.xs[1], g, hs, ws, [&](const auto& w) {
    v = forward_one<N, MODE, TRAIN, acc_t>(w, g.kh * g.kw, u, fv, &o, &neg);
  });
  y[e] = static_cast<scalar_t>(v);
  if (TRAIN) off[e] = static_cast<uint8_t>(o);
  if (MODE == kActivation && neg && neg_flag != nullptr) *neg_flag = 1;  // benign race: all store 1
}

// ------------------------------------------------------------------------------ backward
// Output windows containing input index i along one dim, from ip = i + padding: [lo, hi]
// (empty if lo > hi).
FASTNN_HD void window_range(int ip, int k, const Div32& ds, int64_t out, int& lo, int& hi) {
  lo = ip < k ? 0 : static_cast<int>(ds.div(static_cast<unsigned int>(ip - k))) + 1;
  hi = static_cast<int>(ds.div(static_cast<unsigned int>(ip)));
  if (hi > out - 1) hi = static_cast<int>(out - 1);
}

// Disjoint windows: output e (in the offsets' memory order) writes every in-bounds element of its
// window: the gradient or 0 (training), the exact eval derivative (eval, window read once).
template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
FASTNN_HD void backward_disjoint_thread(int64_t e, const scalar_t* FASTNN_SP_RESTRICT go,
                                        const scalar_t* FASTNN_SP_RESTRICT x, const uint8_t* FASTNN_SP_RESTRICT off,
                                        scalar_t* FASTNN_SP_RESTRICT gi, const Geometry& g, const Splitter& sp) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t n, c, oh, ow;
  coords(sp, g.channels_last, e, n, c, oh, ow);
  const acc_t gy = static_cast<acc_t>(go[n * g.gs[0] + c * g.gs[1] + oh * g.gs[2] + ow * g.gs[3]]);
  const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
  scalar_t* gp = gi + n * g.ys[0] + c * g.ys[1];
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  if constexpr (TRAIN) {
    const int o = off[e];
FASTNN_SP_UNROLL
    for (int r = 0; r < kh; ++r) {
      const int64_t ih = hs + r;
      if (ih < 0 || ih >= g.H) continue;
FASTNN_SP_UNROLL
      for (int cc = 0; cc < kw; ++cc) {
        const int64_t iw = ws + cc;
        if (iw < 0 || iw >= g.W) continue;
        gp[ih * g.ys[2] + iw * g.ys[3]] = static_cast<scalar_t>(r * kw + cc == o ? gy : acc_t(0));
      }
    }
  } else {
    with_window<scalar_t, KH, KW, MODE>(x + n * g.xs[0] + c * g.xs[1], g, hs, ws, [&](const auto& w) {
      constexpr int N = KH * KW;
      const Stats<acc_t> st = window_stats<N, MODE, acc_t>(w, kh * kw);
      const acc_t yv = eval_value<MODE>(st);
      const bool bad = MODE == kActivation && st.neg;
FASTNN_SP_UNROLL
      for (int r = 0; r < kh; ++r) {
        const int64_t ih = hs + r;
        if (ih < 0 || ih >= g.H) continue;
FASTNN_SP_UNROLL
        for (int cc = 0; cc < kw; ++cc) {
          const int64_t iw = ws + cc;
          if (iw < 0 || iw >= g.W) continue;
          const acc_t d = bad ? std::numeric_limits<acc_t>::quiet_NaN() : eval_grad<MODE>(st, yv, w(r * kw + cc));
          gp[ih * g.ys[2] + iw * g.ys[3]] = static_cast<scalar_t>(gy * d);
        }
      }
    });
  }
}

// Overlapping windows, training: input element e (in grad_input's memory order) sums the
// gradients of the windows that sampled it.
template <typename scalar_t>
FASTNN_HD void backward_train_gather_thread(int64_t e, const scalar_t* FASTNN_SP_RESTRICT go,
                                            const uint8_t* FASTNN_SP_RESTRICT off, scalar_t* FASTNN_SP_RESTRICT gi,
                                            const Geometry& g, const Splitter& sp, const StrideDiv& sd) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t n, c, ih, iw;
  coords(sp, g.channels_last, e, n, c, ih, iw);
  const int ihp = static_cast<int>(ih) + g.ph, iwp = static_cast<int>(iw) + g.pw;
  int oh0, oh1, ow0, ow1;
  window_range(ihp, g.kh, sd.h, g.OH, oh0, oh1);
  window_range(iwp, g.kw, sd.w, g.OW, ow0, ow1);
  const uint8_t* op = off + n * g.os[0] + c * g.os[1];
  const scalar_t* gp = go + n * g.gs[0] + c * g.gs[1];
  acc_t acc = acc_t(0);
  for (int oh = oh0; oh <= oh1; ++oh) {
    const int r = ihp - oh * g.sh;
    for (int ow = ow0; ow <= ow1; ++ow) {
      const int cc = iwp - ow * g.sw;
      if (op[oh * g.os[2] + ow * g.os[3]] == r * g.kw + cc) acc += static_cast<acc_t>(gp[oh * g.gs[2] + ow * g.gs[3]]);
    }
  }
  gi[e] = static_cast<scalar_t>(acc);
}

// Overlapping windows, eval: input element e sums g * d(window output)/d(element) over the
// windows that contain it, recomputing each window's statistics.
template <typename scalar_t, int KH, int KW, int MODE>
FASTNN_HD void backward_eval_gather_thread(int64_t e, const scalar_t* FASTNN_SP_RESTRICT go,
                                           const scalar_t* FASTNN_SP_RESTRICT x, scalar_t* FASTNN_SP_RESTRICT gi,
                                           const Geometry& g, const Splitter& sp, const StrideDiv& sd) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = KH * KW;
  int64_t n, c, ih, iw;
  coords(sp, g.channels_last, e, n, c, ih, iw);
  const int ihp = static_cast<int>(ih) + g.ph, iwp = static_cast<int>(iw) + g.pw;
  int oh0, oh1, ow0, ow1;
  window_range(ihp, g.kh, sd.h, g.OH, oh0, oh1);
  window_range(iwp, g.kw, sd.w, g.OW, ow0, ow1);
  const scalar_t* xp = x + n * g.xs[0] + c * g.xs[1];
  const scalar_t* gp = go + n * g.gs[0] + c * g.gs[1];
  const acc_t a = static_cast<acc_t>(xp[ih * g.xs[2] + iw * g.xs[3]]);
  acc_t acc = acc_t(0);
  for (int oh = oh0; oh <= oh1; ++oh) {
    const int64_t hs = static_cast<int64_t>(oh) * g.sh - g.ph;
    for (int ow = ow0; ow <= ow1; ++ow) {
      const int64_t ws = static_cast<int64_t>(ow) * g.sw - g.pw;
      acc_t d = acc_t(0);
      with_window<scalar_t, KH, KW, MODE>(xp, g, hs, ws, [&](const auto& w) {
        const Stats<acc_t> st = window_stats<N, MODE, acc_t>(w, g.kh * g.kw);
        d = (MODE == kActivation && st.neg) ? std::numeric_limits<acc_t>::quiet_NaN()
                                            : eval_grad<MODE>(st, eval_value<MODE>(st), a);
      });
      acc += static_cast<acc_t>(gp[static_cast<int64_t>(oh) * g.gs[2] + static_cast<int64_t>(ow) * g.gs[3]]) * d;
    }
  }
  gi[e] = static_cast<scalar_t>(acc);
}

}  // namespace cuda_detail
}  // namespace stochastic_pool
}  // namespace fastnn
