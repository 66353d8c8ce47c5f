// CPU kernels of stochastic pooling: at::parallel_for (OpenMP) over planes (NCHW-like layouts)
// or rows / channel blocks (channels_last), one output at a time, the window copied once into a
// small local array. Tensors are addressed through the strides in Geometry, so any input layout
// works; the loop order follows g.channels_last so the inner loop walks memory contiguously.
// Accumulation in float for half/bfloat16, double for double.
#include "stochastic_pool/cpu/stochastic_pool_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_strided.h>

#include <algorithm>
#include <atomic>

namespace fastnn {
namespace stochastic_pool {
namespace {

template <typename acc_t, int CAP>
struct RegWindow {
  acc_t v[CAP];
  inline acc_t operator()(int i) const { return v[i]; }
};

// Copies the window with top-left corner (hs, ws) of the plane at xp into w (pad outside).
template <int KH, int KW, typename scalar_t, typename acc_t, int CAP>
inline void load_window(RegWindow<acc_t, CAP>& w, const scalar_t* xp, const Geometry& g, int64_t hs, int64_t ws,
                        acc_t pad) {
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int64_t s2 = g.xs[2], s3 = g.xs[3];
  if (hs >= 0 && ws >= 0 && hs + kh <= g.H && ws + kw <= g.W) {
    const scalar_t* p = xp + hs * s2 + ws * s3;
    for (int r = 0; r < kh; ++r)
      for (int c = 0; c < kw; ++c) w.v[r * kw + c] = static_cast<acc_t>(p[r * s2 + c * s3]);
    return;
  }
  for (int r = 0; r < kh; ++r) {
    const int64_t ih = hs + r;
    for (int c = 0; c < kw; ++c) {
      const int64_t iw = ws + c;
      w.v[r * kw + c] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? static_cast<acc_t>(xp[ih * s2 + iw * s3]) : pad;
    }
  }
}

// Draws u for logical output index e, reusing the Philox block of the previous call when the
// 4-element group is the same (consecutive outputs in NCHW order share blocks).
struct PhiloxCache {
  uint64_t seed;
  uint64_t group = ~uint64_t(0);
  U32x4 blk{};
  inline float uniform(uint64_t e) {
    if ((e >> 2) != group) {
      group = e >> 2;
      blk = philox_block(seed, 0, group);
    }
    return uniform01(word_of(blk, static_cast<uint32_t>(e & 3)));
  }
};

template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
bool forward_kernel(const at::Tensor& x_t, at::Tensor& y_t, at::Tensor& off_t, const Geometry& g, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = KH * KW;
  constexpr int CAP = N > 0 ? N : kMaxWindow;
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  scalar_t* y = y_t.mutable_data_ptr<scalar_t>();
  uint8_t* off = TRAIN ? off_t.mutable_data_ptr<uint8_t>() : nullptr;
  std::atomic<bool> any_neg{false};

  // Each task works on local copies of the geometry and pointers: the uint8 offset stores may
  // alias anything, and would otherwise force reloads of every captured field per output.
  struct Ctx {
    Geometry g;
    const scalar_t* x;
    scalar_t* y;
    uint8_t* off;
    PhiloxCache rng;
    bool neg;
  };
  auto one = [](Ctx& k, int64_t n, int64_t c, int64_t oh, int64_t ow) {
    const Geometry& g = k.g;
    const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
    RegWindow<acc_t, CAP> w;
    load_window<KH, KW>(w, k.x + n * g.xs[0] + c * g.xs[1], g, hs, ws, pad_value<acc_t>(MODE));
    float u = 0.f;
    if (TRAIN) u = k.rng.uniform(((n * g.C + c) * g.OH + oh) * g.OW + ow);
    int o;
    bool neg;
    const acc_t v =
        forward_one<N, MODE, TRAIN, acc_t>(w, g.kh * g.kw, u, first_valid_offset(hs, ws, g.kw), &o, &neg);
    k.y[n * g.ys[0] + c * g.ys[1] + oh * g.ys[2] + ow * g.ys[3]] = static_cast<scalar_t>(v);
    if (TRAIN) k.off[n * g.os[0] + c * g.os[1] + oh * g.os[2] + ow * g.os[3]] = static_cast<uint8_t>(o);
    k.neg |= neg;
  };

  const int64_t plane = g.OH * g.OW;
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)),
                     [&](int64_t b, int64_t e) {
                       Ctx k{g, x, y, off, PhiloxCache{seed}, false};
                       const int64_t C = k.g.C, OH = k.g.OH, OW = k.g.OW;
                       for (int64_t p = b; p < e; ++p) {
                         const int64_t n = p / C, c = p % C;
                         for (int64_t oh = 0; oh < OH; ++oh)
                           for (int64_t ow = 0; ow < OW; ++ow) one(k, n, c, oh, ow);
                       }
                       if (k.neg) any_neg.store(true, std::memory_order_relaxed);
                     });
  } else {
    at::parallel_for(0, g.N * g.OH, std::max<int64_t>(1, 16384 / std::max<int64_t>(g.OW * g.C, 1)),
                     [&](int64_t b, int64_t e) {
                       Ctx k{g, x, y, off, PhiloxCache{seed}, false};
                       const int64_t C = k.g.C, OH = k.g.OH, OW = k.g.OW;
                       for (int64_t r = b; r < e; ++r) {
                         const int64_t n = r / OH, oh = r % OH;
                         for (int64_t ow = 0; ow < OW; ++ow)
                           for (int64_t c = 0; c < C; ++c) one(k, n, c, oh, ow);
                       }
                       if (k.neg) any_neg.store(true, std::memory_order_relaxed);
                     });
  }
  return any_neg.load();
}

// Backward by scatter: each task owns whole planes (NCHW-like) or a channel block of one image
// (channels_last), zeroes its part of grad_in, then adds each output's gradient into it, so no
// two threads touch the same element. gi_t has g.ys strides and accumulation type gacc_t.
template <typename scalar_t, typename gacc_t, int KH, int KW, int MODE, bool TRAIN>
void backward_kernel(const at::Tensor& go_t, const at::Tensor& x_t, const at::Tensor& off_t, at::Tensor& gi_t,
                     const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = KH * KW;
  constexpr int CAP = N > 0 ? N : kMaxWindow;
  const scalar_t* go = go_t.const_data_ptr<scalar_t>();
  const scalar_t* x = TRAIN ? nullptr : x_t.const_data_ptr<scalar_t>();
  const uint8_t* off = TRAIN ? off_t.const_data_ptr<uint8_t>() : nullptr;
  gacc_t* gi = gi_t.mutable_data_ptr<gacc_t>();
  const int n_win = g.kh * g.kw;
  const acc_t pad = pad_value<acc_t>(MODE);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  auto one = [&](int64_t n, int64_t c, int64_t oh, int64_t ow) {
    const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
    const acc_t gy = static_cast<acc_t>(go[n * g.gs[0] + c * g.gs[1] + oh * g.gs[2] + ow * g.gs[3]]);
    gacc_t* gp = gi + n * g.ys[0] + c * g.ys[1];
    if (TRAIN) {
      const int o = off[n * g.os[0] + c * g.os[1] + oh * g.os[2] + ow * g.os[3]];
      const int r = o / g.kw, cc = o - r * g.kw;
      gp[(hs + r) * g.ys[2] + (ws + cc) * g.ys[3]] += static_cast<gacc_t>(gy);
      return;
    }
    RegWindow<acc_t, CAP> w;
    load_window<KH, KW>(w, x + n * g.xs[0] + c * g.xs[1], g, hs, ws, pad);
    const Stats<acc_t> st = window_stats<N, MODE, acc_t>(w, n_win);
    const bool bad = MODE == kActivation && st.neg;
    const acc_t yv = eval_value<MODE>(st);
    const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
    for (int r = 0; r < kh; ++r) {
      const int64_t ih = hs + r;
      if (ih < 0 || ih >= g.H) continue;
      for (int cc = 0; cc < kw; ++cc) {
        const int64_t iw = ws + cc;
        if (iw < 0 || iw >= g.W) continue;
        const acc_t d = bad ? nan : eval_grad<MODE>(st, yv, w(r * kw + cc));
        gp[ih * g.ys[2] + iw * g.ys[3]] += static_cast<gacc_t>(gy * d);
      }
    }
  };

  if (!g.channels_last) {
    // grad_in is ours and contiguous (NCHW): plane p is gi[p*H*W, (p+1)*H*W).
    const int64_t hw = g.H * g.W;
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)),
                     [&](int64_t b, int64_t e) {
                       std::fill(gi + b * hw, gi + e * hw, gacc_t(0));
                       for (int64_t p = b; p < e; ++p) {
                         const int64_t n = p / g.C, c = p % g.C;
                         for (int64_t oh = 0; oh < g.OH; ++oh)
                           for (int64_t ow = 0; ow < g.OW; ++ow) one(n, c, oh, ow);
                       }
                     });
  } else {
    // grad_in is ours and contiguous in channels_last: element (n, h, w, c) at ((n*H + h)*W + w)*C + c.
    constexpr int64_t kBlock = 64;
    const int64_t nb = (g.C + kBlock - 1) / kBlock;
    at::parallel_for(0, g.N * nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nb, c0 = (t % nb) * kBlock, c1 = std::min(g.C, c0 + kBlock);
        for (int64_t hw = 0; hw < g.H * g.W; ++hw) {
          gacc_t* row = gi + (n * g.H * g.W + hw) * g.C;
          std::fill(row + c0, row + c1, gacc_t(0));
        }
        for (int64_t oh = 0; oh < g.OH; ++oh)
          for (int64_t ow = 0; ow < g.OW; ++ow)
            for (int64_t c = c0; c < c1; ++c) one(n, c, oh, ow);
      }
    });
  }
}

// Calls f(std::integral_constant<int, KH>, std::integral_constant<int, KW>) for the compiled
// window shapes: 2x2 and 3x3 fully specialised, anything else (up to 256 elements) generic.
template <typename F>
void dispatch_window(int kh, int kw, F&& f) {
  if (kh == 2 && kw == 2) return f(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
  if (kh == 3 && kw == 3) return f(std::integral_constant<int, 3>{}, std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

template <typename F>
void dispatch_mode(int mode, bool training, F&& f) {
  using A = std::integral_constant<int, kActivation>;
  using S = std::integral_constant<int, kSoftmax>;
  using T = std::true_type;
  using E = std::false_type;
  if (mode == kActivation) return training ? f(A{}, T{}) : f(A{}, E{});
  return training ? f(S{}, T{}) : f(S{}, E{});
}

}  // namespace

bool forward_cpu(const at::Tensor& x, at::Tensor& out, at::Tensor& offsets, const Geometry& g, int mode,
                 bool training, uint64_t seed) {
  bool neg = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stochastic_pool2d_cpu", [&] {
    dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
      dispatch_mode(mode, training, [&](auto M, auto T) {
        neg = forward_kernel<scalar_t, decltype(KH)::value, decltype(KW)::value, decltype(M)::value,
                             decltype(T)::value>(x, out, offsets, g, seed);
      });
    });
  });
  return neg;
}

void backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, at::Tensor& grad_in,
                  const Geometry& g, int mode, bool training) {
  // Overlapping windows add several terms into one element: accumulate low precision in float.
  const bool overlap = g.sh < g.kh || g.sw < g.kw;
  const bool lowp = grad_in.scalar_type() == at::kHalf || grad_in.scalar_type() == at::kBFloat16;
  at::Tensor acc = overlap && lowp
                       ? at::empty_strided(grad_in.sizes(), grad_in.strides(), grad_in.options().dtype(at::kFloat))
                       : grad_in;
  const auto dtype = grad_out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "stochastic_pool2d_backward_cpu", [&] {
    auto run = [&](auto gacc) {
      using gacc_t = decltype(gacc);
      if (training) {
        // The sampled offset is all that is read: no window math, one instantiation.
        backward_kernel<scalar_t, gacc_t, 1, 1, kActivation, true>(grad_out, x, offsets, acc, g);
        return;
      }
      dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
        if (mode == kActivation)
          backward_kernel<scalar_t, gacc_t, decltype(KH)::value, decltype(KW)::value, kActivation, false>(
              grad_out, x, offsets, acc, g);
        else
          backward_kernel<scalar_t, gacc_t, decltype(KH)::value, decltype(KW)::value, kSoftmax, false>(
              grad_out, x, offsets, acc, g);
      });
    };
    if (acc.scalar_type() == grad_in.scalar_type())
      run(scalar_t(0));
    else
      run(float(0));
  });
  if (!acc.is_same(grad_in)) grad_in.copy_(acc);
}

}  // namespace stochastic_pool
}  // namespace fastnn
