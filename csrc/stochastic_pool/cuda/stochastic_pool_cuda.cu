// CUDA kernels of stochastic pooling.
//
// Forward: one thread per output. 2x2 and 3x3 windows are read once into registers (compile-time
// sizes, loops fully unrolled); other sizes (up to 256 elements) re-read the window from global
// memory on each pass (L1 hits). Threads follow the output's memory order (w fastest for NCHW, c
// fastest for channels_last), so writes are coalesced and reads of a channels_last input too.
// Randomness: Philox4x32-10 per output (stochastic_pool_math.h) from the CUDA generator's
// PhiloxCudaState, which is CUDA-graph safe.
// Backward: disjoint windows (stride >= kernel): one thread per output writes its window's
// gradient; overlapping windows: one thread per input element gathers from the windows that
// contain it. No atomics either way, so the result is deterministic.
// Assumptions: float, half or bfloat16 (accumulation in float); the input and grad_output may have
// any strides; out, offsets and grad_input are contiguous in the layout Geometry::channels_last
// names (allocated by stochastic_pool.cpp); all sizes and strides fit int64 and each dim fits int32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "stochastic_pool/cuda/stochastic_pool_cuda.h"
#include "stochastic_pool/cuda/stochastic_pool_cuda_kernels.cuh"

namespace fastnn {
namespace stochastic_pool {
namespace {

constexpr int kThreads = 256;

// float, half, bfloat16 only: float64 is rejected before launch (saves compile time).
#define FASTNN_SP_DISPATCH(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

using namespace cuda_detail;

// The __global__ wrappers: one thread per linear index e (bodies in stochastic_pool_cuda_kernels.cuh).
template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, uint8_t* __restrict__ off,
                   int* __restrict__ neg_flag, const Geometry g, const Splitter sp, const int64_t total,
                   const at::PhiloxCudaState philox) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  uint64_t seed = 0, offset = 0;
  if (TRAIN) {
    const auto seeds = at::cuda::philox::unpack(philox);  // graph-safe: may read device memory
    seed = std::get<0>(seeds);
    offset = std::get<1>(seeds);
  }
  forward_thread<scalar_t, KH, KW, MODE, TRAIN>(e, x, y, off, neg_flag, g, sp, seed, offset);
}

template <typename scalar_t, int KH, int KW, int MODE, bool TRAIN>
__global__ void __launch_bounds__(kThreads)
    backward_disjoint_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                             const uint8_t* __restrict__ off, scalar_t* __restrict__ gi, const Geometry g,
                             const Splitter sp, const int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  backward_disjoint_thread<scalar_t, KH, KW, MODE, TRAIN>(e, go, x, off, gi, g, sp);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_train_gather_kernel(const scalar_t* __restrict__ go, const uint8_t* __restrict__ off,
                                 scalar_t* __restrict__ gi, const Geometry g, const Splitter sp, const StrideDiv sd,
                                 const int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  backward_train_gather_thread<scalar_t>(e, go, off, gi, g, sp, sd);
}

template <typename scalar_t, int KH, int KW, int MODE>
__global__ void __launch_bounds__(kThreads)
    backward_eval_gather_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                scalar_t* __restrict__ gi, const Geometry g, const Splitter sp, const StrideDiv sd,
                                const int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  backward_eval_gather_thread<scalar_t, KH, KW, MODE>(e, go, x, gi, g, sp, sd);
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
                  bool training, const std::optional<at::Generator>& generator, bool sync_check) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = out.numel();
  TORCH_CHECK(blocks_for(total) <= static_cast<unsigned int>(INT32_MAX), "stochastic_pool2d: output too large");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Negative inputs (activation mode) set a device flag read back once after the kernel: one
  // 4-byte copy and a stream sync. Not while a CUDA graph is captured (no sync allowed), nor when
  // the caller opted out: then the NaN outputs of those windows are the signal.
  const bool check = mode == kActivation && sync_check &&
                     at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None;
  at::Tensor flag;
  int* flag_ptr = nullptr;
  if (check) {
    flag = at::empty({1}, x.options().dtype(at::kInt));
    flag_ptr = flag.mutable_data_ptr<int>();
    C10_CUDA_CHECK(cudaMemsetAsync(flag_ptr, 0, sizeof(int), stream));
  }
  at::PhiloxCudaState rng;
  if (training) {
    auto* gen =
        at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
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
  if (!check) return false;
  int seen = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&seen, flag_ptr, sizeof(int), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return seen != 0;
}

void backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, at::Tensor& grad_in,
                   const Geometry& g, int mode, bool training) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t total_in = grad_in.numel();
  TORCH_CHECK(blocks_for(total_in) <= static_cast<unsigned int>(INT32_MAX),
              "stochastic_pool2d_backward: input too large");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (disjoint(g)) {
    if (!disjoint_covers_input(g)) grad_in.zero_();  // the kernel writes only inside windows
    const int64_t total = g.N * g.C * g.OH * g.OW;
    const Splitter sp = make_splitter(g, g.OH, g.OW, total);
    FASTNN_SP_DISPATCH(x.scalar_type(), "stochastic_pool2d_backward_cuda", [&] {
      const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
      const scalar_t* xp = training ? nullptr : x.const_data_ptr<scalar_t>();
      const uint8_t* op = training ? offsets.const_data_ptr<uint8_t>() : nullptr;
      scalar_t* gip = grad_in.mutable_data_ptr<scalar_t>();
      dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
        constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
        auto launch = [&](auto kernel) {
          kernel<<<blocks_for(total), kThreads, 0, stream>>>(gop, xp, op, gip, g, sp, total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (training)
          launch(backward_disjoint_kernel<scalar_t, kh, kw, kActivation, true>);
        else if (mode == kActivation)
          launch(backward_disjoint_kernel<scalar_t, kh, kw, kActivation, false>);
        else
          launch(backward_disjoint_kernel<scalar_t, kh, kw, kSoftmax, false>);
      });
    });
    return;
  }
  const Splitter sp = make_splitter(g, g.H, g.W, total_in);
  const StrideDiv sd = make_stride_div(g);
  FASTNN_SP_DISPATCH(x.scalar_type(), "stochastic_pool2d_backward_cuda", [&] {
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gip = grad_in.mutable_data_ptr<scalar_t>();
    if (training) {
      backward_train_gather_kernel<scalar_t><<<blocks_for(total_in), kThreads, 0, stream>>>(
          gop, offsets.const_data_ptr<uint8_t>(), gip, g, sp, sd, total_in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_window(g.kh, g.kw, [&](auto KH, auto KW) {
      constexpr int kh = decltype(KH)::value, kw = decltype(KW)::value;
      if (mode == kActivation)
        backward_eval_gather_kernel<scalar_t, kh, kw, kActivation>
            <<<blocks_for(total_in), kThreads, 0, stream>>>(gop, xp, gip, g, sp, sd, total_in);
      else
        backward_eval_gather_kernel<scalar_t, kh, kw, kSoftmax>
            <<<blocks_for(total_in), kThreads, 0, stream>>>(gop, xp, gip, g, sp, sd, total_in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace stochastic_pool
}  // namespace fastnn
