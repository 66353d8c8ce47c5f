// CPU emulation of the CUDA kernels of stochastic pooling, for tests/test_stochastic_pool.py:
// runs the per-thread bodies (csrc/stochastic_pool/cuda/stochastic_pool_cuda_kernels.cuh) for
// every thread index in turn, with the GPU variants of the shared math (FASTNN_SP_EMULATE_DEVICE)
// and the launch logic of stochastic_pool_cuda.cu (kernel choice, zeroing). float32 only.
// Built by the test with the host compiler into a shared library and called through ctypes, so
// the indexing, layouts, sampling and backward paths of the GPU code are checked without a GPU.
#define FASTNN_SP_EMULATE_DEVICE 1
#include "stochastic_pool/cuda/stochastic_pool_cuda_kernels.cuh"

#include <algorithm>
#include <type_traits>

using namespace fastnn::stochastic_pool;
using namespace fastnn::stochastic_pool::cuda_detail;

namespace {

// geom: N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, xs[4], ys[4], os[4], gs[4], channels_last
Geometry unpack(const int64_t* v) {
  Geometry g{};
  g.N = v[0];
  g.C = v[1];
  g.H = v[2];
  g.W = v[3];
  g.OH = v[4];
  g.OW = v[5];
  g.kh = static_cast<int>(v[6]);
  g.kw = static_cast<int>(v[7]);
  g.sh = static_cast<int>(v[8]);
  g.sw = static_cast<int>(v[9]);
  g.ph = static_cast<int>(v[10]);
  g.pw = static_cast<int>(v[11]);
  for (int i = 0; i < 4; ++i) {
    g.xs[i] = v[12 + i];
    g.ys[i] = v[16 + i];
    g.os[i] = v[20 + i];
    g.gs[i] = v[24 + i];
  }
  g.channels_last = v[28] != 0;
  return g;
}

template <typename F>
void dispatch_window(int kh, int kw, F&& f) {
  if (kh == 2 && kw == 2) return f(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
  if (kh == 3 && kw == 3) return f(std::integral_constant<int, 3>{}, std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

}  // namespace

extern "C" {

// Returns the negative-input flag. force64: take the 64-bit index-splitting path.
int sp_emu_forward(const float* x, float* y, uint8_t* off, const int64_t* geom, int mode, int training,
                   uint64_t seed, uint64_t offset, int force64) {
  const Geometry g = unpack(geom);
  const int64_t total = g.N * g.C * g.OH * g.OW;
  Splitter sp = make_splitter(g, g.OH, g.OW, total);
  if (force64) sp.use32 = false;
  int neg = 0;
  dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
    constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
    auto run = [&](auto M, auto T) {
      for (int64_t e = 0; e < total; ++e)
        forward_thread<float, kh, kw, decltype(M)::value, decltype(T)::value>(e, x, y, off, &neg, g, sp, seed,
                                                                               offset);
    };
    using A = std::integral_constant<int, kActivation>;
    using S = std::integral_constant<int, kSoftmax>;
    if (mode == kActivation)
      training ? run(A{}, std::true_type{}) : run(A{}, std::false_type{});
    else
      training ? run(S{}, std::true_type{}) : run(S{}, std::false_type{});
  });
  return neg;
}

// grad_in must hold N*C*H*W floats laid out as geom's ys strides (contiguous in that layout).
void sp_emu_backward(const float* go, const float* x, const uint8_t* off, float* gin, const int64_t* geom, int mode,
                     int training, int force64) {
  const Geometry g = unpack(geom);
  if (disjoint(g)) {
    if (!disjoint_covers_input(g)) std::fill(gin, gin + g.N * g.C * g.H * g.W, 0.f);
    const int64_t total = g.N * g.C * g.OH * g.OW;
    Splitter sp = make_splitter(g, g.OH, g.OW, total);
    if (force64) sp.use32 = false;
    dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
      constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
      for (int64_t e = 0; e < total; ++e) {
        if (training)
          backward_disjoint_thread<float, kh, kw, kActivation, true>(e, go, x, off, gin, g, sp);
        else if (mode == kActivation)
          backward_disjoint_thread<float, kh, kw, kActivation, false>(e, go, x, off, gin, g, sp);
        else
          backward_disjoint_thread<float, kh, kw, kSoftmax, false>(e, go, x, off, gin, g, sp);
      }
    });
    return;
  }
  const int64_t total = g.N * g.C * g.H * g.W;
  Splitter sp = make_splitter(g, g.H, g.W, total);
  if (force64) sp.use32 = false;
  const StrideDiv sd = make_stride_div(g);
  if (training) {
    for (int64_t e = 0; e < total; ++e) backward_train_gather_thread<float>(e, go, off, gin, g, sp, sd);
    return;
  }
  dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
    constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
    for (int64_t e = 0; e < total; ++e) {
      if (mode == kActivation)
        backward_eval_gather_thread<float, kh, kw, kActivation>(e, go, x, gin, g, sp, sd);
      else
        backward_eval_gather_thread<float, kh, kw, kSoftmax>(e, go, x, gin, g, sp, sd);
    }
  });
}

}  // extern "C"
