// CUDA kernels of stochastic pooling.
//
// Forward: one thread per output. 2x2 and 3x3 windows are read once into registers (compile-time
// sizes, loops fully unrolled); other sizes (up to 256 elements) re-read the window from global
// memory on each pass (L1 hits). Threads follow the output's memory order (w fastest for NCHW, c
// fastest for channels_last), so writes are coalesced and reads of a channels_last input too.
// Randomness: Philox4x32-10 per output (stochastic_pool_math.h) from the CUDA generator's
// PhiloxCudaState, which is CUDA-graph safe.
// Backward: one thread per input element gathers from the windows that contain it, so there are
// no atomics and the result is deterministic.
// Assumptions: float, half or bfloat16 (accumulation in float); the input and grad_output may have
// any strides; out, offsets and grad_input are contiguous in the layout Geometry::channels_last
// names (allocated by stochastic_pool.cpp); all sizes and strides fit int64 and each dim fits int32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "stochastic_pool/cuda/stochastic_pool_cuda.h"

namespace fastnn {
namespace stochastic_pool {
namespace {

constexpr int kThreads = 256;

// float, half, bfloat16 only: float64 is rejected before launch (saves compile time).
#define FASTNN_SP_DISPATCH(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Splits a linear index into 4 coordinates, fastest first: i = ((a3*d2 + a2)*d1 + a1)*d0 + a0.
// 32-bit magic-number division when the whole range fits int32, 64-bit division otherwise.
struct Splitter {
  at::cuda::detail::IntDivider<unsigned int> f[3];
  int64_t d[3];
  bool use32;

  Splitter(int64_t d0, int64_t d1, int64_t d2, int64_t total) : d{d0, d1, d2}, use32(total <= INT32_MAX) {
    if (use32) {
      f[0] = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(d0));
      f[1] = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(d1));
      f[2] = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(d2));
    }
  }

  __device__ __forceinline__ void split(int64_t i, int64_t& a0, int64_t& a1, int64_t& a2, int64_t& a3) const {
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

// (n, c, h, w) of the element at linear index i of a tensor contiguous in g's layout with
// spatial size (h_size, w_size).
Splitter make_splitter(const Geometry& g, int64_t h_size, int64_t w_size, int64_t total) {
  return g.channels_last ? Splitter(g.C, w_size, h_size, total) : Splitter(w_size, h_size, g.C, total);
}

__device__ __forceinline__ void coords(const Splitter& s, bool cl, int64_t i, int64_t& n, int64_t& c, int64_t& h,
                                       int64_t& w) {
  if (cl)
    s.split(i, c, w, h, n);
  else
    s.split(i, w, h, c, n);
}

template <typename acc_t, int N>
struct RegWin {
  acc_t v[N];
  __device__ __forceinline__ acc_t operator()(int i) const { return v[i]; }
};

template <typename scalar_t, typename acc_t, int KH, int KW>
__device__ __forceinline__ void load_regs(RegWin<acc_t, KH * KW>& w, const scalar_t* __restrict__ xp,
                                          const Geometry& g, int64_t hs, int64_t ws, acc_t pad) {
#pragma unroll
  for (int r = 0; r < KH; ++r) {
    const int64_t ih = hs + r;
    const bool rin = ih >= 0 && ih < g.H;
#pragma unroll
    for (int c = 0; c < KW; ++c) {
      const int64_t iw = ws + c;
      w.v[r * KW + c] = (rin && iw >= 0 && iw < g.W) ? static_cast<acc_t>(xp[ih * g.xs[2] + iw * g.xs[3]]) : pad;
    }
  }
}

// Generic window: every access re-reads global memory (cached).
template <typename scalar_t, typename acc_t>
struct MemWin {
  const scalar_t* __restrict__ xp;
  int64_t s2, s3, hs, ws, H, W;
  int kw;
  acc_t pad;
  __device__ __forceinline__ acc_t operator()(int i) const {
    const int r = i / kw, c = i - r * kw;
    const int64_t ih = hs + r, iw = ws + c;
    return (ih >= 0 && ih < H && iw >= 0 && iw < W) ? static_cast<acc_t>(xp[ih * s2 + iw * s3]) : pad;
  }
};

template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, uint8_t* __restrict__ off,
                   int* __restrict__ neg_flag, const Geometry g, const Splitter sp, const int64_t total,
                   const at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  int64_t n, c, oh, ow;
  coords(sp, g.channels_last, e, n, c, oh, ow);
  const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
  const scalar_t* xp = x + n * g.xs[0] + c * g.xs[1];
  const acc_t pad = pad_value<acc_t>(MODE);
  float u = 0.f;
  if (TRAIN) {
    const auto seeds = at::cuda::philox::unpack(philox);
    // Logical NCHW index: the same samples whatever the memory layout.
    const int64_t le = g.channels_last ? ((n * g.C + c) * g.OH + oh) * g.OW + ow : e;
    u = uniform_for(std::get<0>(seeds), std::get<1>(seeds), static_cast<uint64_t>(le));
  }
  const int fv = first_valid_offset(hs, ws, g.kw);
  int o;
  bool neg;
  acc_t v;
  if constexpr (KH > 0) {
    RegWin<acc_t, KH * KW> w;
    load_regs<scalar_t, acc_t, KH, KW>(w, xp, g, hs, ws, pad);
    v = forward_one<KH * KW, MODE, TRAIN, acc_t>(w, KH * KW, u, fv, &o, &neg);
  } else {
    const MemWin<scalar_t, acc_t> w{xp, g.xs[2], g.xs[3], hs, ws, g.H, g.W, g.kw, pad};
    v = forward_one<0, MODE, TRAIN, acc_t>(w, g.kh * g.kw, u, fv, &o, &neg);
  }
  y[e] = static_cast<scalar_t>(v);
  if (TRAIN) off[e] = static_cast<uint8_t>(o);
  if (MODE == kActivation && neg) *neg_flag = 1;  // benign race: every writer stores 1
}

// Output windows containing input index i along one dim: [lo, hi] (empty if lo > hi).
__device__ __forceinline__ void window_range(int64_t i, int k, int s, int p, int64_t out, int64_t& lo, int64_t& hi) {
  const int64_t ip = i + p;
  lo = ip < k ? 0 : (ip - k) / s + 1;
  hi = ip / s;
  if (hi > out - 1) hi = out - 1;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_train_kernel(const scalar_t* __restrict__ go, const uint8_t* __restrict__ off, scalar_t* __restrict__ gi,
                          const Geometry g, const Splitter sp, const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  int64_t n, c, ih, iw;
  coords(sp, g.channels_last, e, n, c, ih, iw);
  int64_t oh0, oh1, ow0, ow1;
  window_range(ih, g.kh, g.sh, g.ph, g.OH, oh0, oh1);
  window_range(iw, g.kw, g.sw, g.pw, g.OW, ow0, ow1);
  const uint8_t* op = off + n * g.os[0] + c * g.os[1];
  const scalar_t* gp = go + n * g.gs[0] + c * g.gs[1];
  acc_t acc = acc_t(0);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    const int r = static_cast<int>(ih + g.ph - oh * g.sh);
    for (int64_t ow = ow0; ow <= ow1; ++ow) {
      const int cc = static_cast<int>(iw + g.pw - ow * g.sw);
      if (op[oh * g.os[2] + ow * g.os[3]] == r * g.kw + cc) acc += static_cast<acc_t>(gp[oh * g.gs[2] + ow * g.gs[3]]);
    }
  }
  gi[e] = static_cast<scalar_t>(acc);
}

template <typename scalar_t, int KH, int KW, int MODE>
__global__ void __launch_bounds__(kThreads)
    backward_eval_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x, scalar_t* __restrict__ gi,
                         const Geometry g, const Splitter sp, const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  int64_t n, c, ih, iw;
  coords(sp, g.channels_last, e, n, c, ih, iw);
  int64_t oh0, oh1, ow0, ow1;
  window_range(ih, g.kh, g.sh, g.ph, g.OH, oh0, oh1);
  window_range(iw, g.kw, g.sw, g.pw, g.OW, ow0, ow1);
  const scalar_t* xp = x + n * g.xs[0] + c * g.xs[1];
  const scalar_t* gp = go + n * g.gs[0] + c * g.gs[1];
  const acc_t a = static_cast<acc_t>(xp[ih * g.xs[2] + iw * g.xs[3]]);
  const acc_t pad = pad_value<acc_t>(MODE);
  acc_t acc = acc_t(0);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    const int64_t hs = oh * g.sh - g.ph;
    for (int64_t ow = ow0; ow <= ow1; ++ow) {
      const int64_t ws = ow * g.sw - g.pw;
      Stats<acc_t> st;
      if constexpr (KH > 0) {
        RegWin<acc_t, KH * KW> w;
        load_regs<scalar_t, acc_t, KH, KW>(w, xp, g, hs, ws, pad);
        st = window_stats<KH * KW, MODE, acc_t>(w, KH * KW);
      } else {
        const MemWin<scalar_t, acc_t> w{xp, g.xs[2], g.xs[3], hs, ws, g.H, g.W, g.kw, pad};
        st = window_stats<0, MODE, acc_t>(w, g.kh * g.kw);
      }
      const acc_t yv = eval_value<MODE>(st);
      const acc_t d = (MODE == kActivation && st.neg) ? std::numeric_limits<acc_t>::quiet_NaN()
                                                       : eval_grad<MODE>(st, yv, a);
      acc += static_cast<acc_t>(gp[oh * g.gs[2] + ow * g.gs[3]]) * d;
    }
  }
  gi[e] = static_cast<scalar_t>(acc);
}

template <typename F>
void dispatch_window(int kh, int kw, F&& f) {
  if (kh == 2 && kw == 2) return f(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
  if (kh == 3 && kw == 3) return f(std::integral_constant<int, 3>{}, std::integral_constant<int, 3>{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

unsigned int blocks_for(int64_t total) { return static_cast<unsigned int>((total + kThreads - 1) / kThreads); }

}  // namespace

bool forward_cuda(const at::Tensor& x, at::Tensor& out, at::Tensor& offsets, const Geometry& g, int mode,
                  bool training, const std::optional<at::Generator>& generator) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = out.numel();
  TORCH_CHECK(blocks_for(total) <= static_cast<unsigned int>(INT32_MAX), "stochastic_pool2d: output too large");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor flag;
  int* flag_ptr = nullptr;
  if (mode == kActivation) {
    flag = at::zeros({1}, x.options().dtype(at::kInt));
    flag_ptr = flag.mutable_data_ptr<int>();
  }
  at::PhiloxCudaState rng;
  if (training) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng = gen->philox_cuda_state(kPhiloxIncrement);
  }
  const Splitter sp = make_splitter(g, g.OH, g.OW, total);
  uint8_t* off = training ? offsets.mutable_data_ptr<uint8_t>() : nullptr;
  FASTNN_SP_DISPATCH(x.scalar_type(), "stochastic_pool2d_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
      constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(total), kThreads, 0, stream>>>(xp, yp, off, flag_ptr, g, sp, total, rng);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mode == kActivation) {
        if (training)
          launch(forward_kernel<scalar_t, kh, kw, kActivation, true>);
        else
          launch(forward_kernel<scalar_t, kh, kw, kActivation, false>);
      } else {
        if (training)
          launch(forward_kernel<scalar_t, kh, kw, kSoftmax, true>);
        else
          launch(forward_kernel<scalar_t, kh, kw, kSoftmax, false>);
      }
    });
  });
  if (mode == kActivation && at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None)
    return flag.item<int>() != 0;
  return false;
}

void backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, at::Tensor& grad_in,
                   const Geometry& g, int mode, bool training) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = grad_in.numel();
  TORCH_CHECK(blocks_for(total) <= static_cast<unsigned int>(INT32_MAX), "stochastic_pool2d_backward: input too large");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Splitter sp = make_splitter(g, g.H, g.W, total);
  FASTNN_SP_DISPATCH(x.scalar_type(), "stochastic_pool2d_backward_cuda", [&] {
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gip = grad_in.mutable_data_ptr<scalar_t>();
    if (training) {
      backward_train_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          gop, offsets.const_data_ptr<uint8_t>(), gip, g, sp, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
      constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
      if (mode == kActivation)
        backward_eval_kernel<scalar_t, kh, kw, kActivation><<<blocks_for(total), kThreads, 0, stream>>>(gop, xp, gip, g, sp, total);
      else
        backward_eval_kernel<scalar_t, kh, kw, kSoftmax><<<blocks_for(total), kThreads, 0, stream>>>(gop, xp, gip, g, sp, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace stochastic_pool
}  // namespace fastnn
