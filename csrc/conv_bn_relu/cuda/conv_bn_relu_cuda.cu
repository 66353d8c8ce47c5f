// CUDA kernels of the fused BatchNorm(+ReLU) that follows a convolution.
//
// Assumptions (checked by conv_bn_relu.cpp): activations dense, either contiguous [N][C][S]
// (NCHW) or channels_last [N*S][C] (NHWC), dtype float/double/half/bfloat16; per-channel tensors
// contiguous in acc_t = at::opmath_type<scalar_t> (float, or double for double); outputs
// preallocated in the input's layout; numel() > 0.
//
// Every kernel walks the data channel-major, so each thread computes its per-channel constants once:
//   NCHW: grid (C, splits), 1-D blocks of kThreads; the threads of (c, split) stride over the
//         N*S values of channel c (rows of S contiguous values), VEC values per 16-byte load.
//   NHWC: grid (channel tiles, splits), blocks (TX, TY); thread (tx, ty) owns VEC adjacent
//         channels (one 16-byte load per row) and strides over the N*S rows.
// VEC = 16 / sizeof(scalar_t) when the contiguous extent (S or C) is a multiple of it and the
// pointers are 16-byte aligned, else 1.
//
// Reductions are two-level: each block reduces its share (warp shuffles then shared memory, or a
// shared-memory tree over TY for NHWC) into one partial per (split, channel); a finalize kernel
// combines the splits in a fixed order, so results are deterministic (no atomics).
// Statistics: each thread sums (x - shift) and (x - shift)^2 in acc_t with shift = the channel's
// first value, turns them into a Welford triple (n, mean, M2), and triples are merged with
// Chan's formula (conv_bn_relu_math.h) at every level.
#include "conv_bn_relu/cuda/conv_bn_relu_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "conv_bn_relu/conv_bn_relu_math.h"

namespace fastnn {
namespace cbr {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <typename T>
struct Sums {  // (sum_dz, sum_dz_xmu)
  T a;
  T b;
};

template <typename T>
__device__ __forceinline__ Sums<T> combine(const Sums<T>& x, const Sums<T>& y) {
  Sums<T> s;
  s.a = x.a + y.a;
  s.b = x.b + y.b;
  return s;
}

template <typename T>
__device__ __forceinline__ Welford<T> combine(const Welford<T>& x, const Welford<T>& y) {
  return welford_combine(x, y);
}

template <typename T>
__device__ __forceinline__ Sums<T> shfl_down(const Sums<T>& s, int off) {
  Sums<T> o;
  o.a = __shfl_down_sync(0xffffffffu, s.a, off);
  o.b = __shfl_down_sync(0xffffffffu, s.b, off);
  return o;
}

template <typename T>
__device__ __forceinline__ Welford<T> shfl_down(const Welford<T>& w, int off) {
  Welford<T> o;
  o.n = __shfl_down_sync(0xffffffffu, w.n, off);
  o.mean = __shfl_down_sync(0xffffffffu, w.mean, off);
  o.m2 = __shfl_down_sync(0xffffffffu, w.m2, off);
  return o;
}

// Reduces one value per thread of a 1-D block (blockDim.x a multiple of 32, <= 1024); the result
// is valid in thread 0. R{} (all zero) is the identity of both combines.
template <typename R>
__device__ __forceinline__ R block_reduce(R v, R* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = combine(v, shfl_down(v, off));
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : R{};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = combine(v, shfl_down(v, off));
  }
  return v;
}

// Reduces over threadIdx.y of a (TX, TY) block, VEC values per thread, in shared memory
// sh[(ty * TX + tx) * VEC + j] (TY a power of two). The result lands in row ty == 0.
template <typename R, int VEC>
__device__ __forceinline__ void column_reduce(R* sh) {
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int i = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
      const int o = ((threadIdx.y + s) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sh[i + j] = combine(sh[i + j], sh[o + j]);
    }
    __syncthreads();
  }
}

// Calls f(offset) for the VEC-vectors of channel c (NCHW) that belong to this thread: vector
// indices start, start + stride, ... over the channel's N * S / VEC vectors. The (row, column)
// position advances by a precomputed quotient/remainder instead of a division per step.
template <int VEC, typename F>
__device__ __forceinline__ void for_channel(int64_t N, int64_t C, int64_t S, int64_t c, int64_t start,
                                            int64_t stride, F&& f) {
  const int64_t SV = S / VEC;
  const int64_t q = stride / SV, r = stride - q * SV;
  int64_t n = start / SV;
  int64_t s = start - n * SV;
  while (n < N) {
    f((n * C + c) * S + s * VEC);
    n += q;
    s += r;
    if (s >= SV) {
      s -= SV;
      ++n;
    }
  }
}

extern __shared__ __align__(16) unsigned char cbr_smem[];

// ---------------------------------------------------------------- statistics

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) stats_nchw_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                                              int64_t S, Welford<acc_t>* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(x[c * S]);
  acc_t cnt = 0, s1 = 0, s2 = 0;
  for_channel<VEC>(N, C, S, c, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.y) * blockDim.x, [&](int64_t off) {
                     const Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(x + off);
#pragma unroll
                     for (int j = 0; j < VEC; ++j) {
                       const acc_t d = static_cast<acc_t>(v.v[j]) - shift;
                       s1 += d;
                       s2 += d * d;
                     }
                     cnt += acc_t(VEC);
                   });
  __shared__ Welford<acc_t> sh[32];
  const Welford<acc_t> w = block_reduce(welford_from_shifted<acc_t>(cnt, s1, s2, shift), sh);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * C + c] = w;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) stats_nhwc_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                                              Welford<acc_t>* __restrict__ partial) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;
  acc_t shift[VEC], s1[VEC], s2[VEC];
  acc_t cnt = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    shift[j] = 0;
    s1[j] = 0;
    s2[j] = 0;
  }
  if (active) {
    const Vec<scalar_t, VEC> v0 = load_vec<scalar_t, VEC>(x + c0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) shift[j] = static_cast<acc_t>(v0.v[j]);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(x + r * C + c0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = static_cast<acc_t>(v.v[j]) - shift[j];
        s1[j] += d;
        s2[j] += d * d;
      }
      cnt += acc_t(1);
    }
  }
  Welford<acc_t>* sh = reinterpret_cast<Welford<acc_t>*>(cbr_smem);
  const int i = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) sh[i + j] = welford_from_shifted<acc_t>(cnt, s1[j], s2[j], shift[j]);
  __syncthreads();
  column_reduce<Welford<acc_t>, VEC>(sh);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[static_cast<int64_t>(blockIdx.y) * C + c0 + j] = sh[threadIdx.x * VEC + j];
  }
}

template <typename acc_t>
__global__ void stats_finalize_kernel(const Welford<acc_t>* __restrict__ partial, int64_t nsplit, int64_t C,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford<acc_t> w = partial[c];
  for (int64_t k = 1; k < nsplit; ++k) w = welford_combine(w, partial[k * C + c]);
  mean[c] = w.mean;
  var[c] = welford_var(w);
}

// ---------------------------------------------------------------- normalize + affine + ReLU

struct ChannelPtrs {  // per-channel inputs, acc_t; weight/bias may be null (affine=False)
  const void* mean;
  const void* var;
  const void* weight;
  const void* bias;
};

template <typename acc_t>
__device__ __forceinline__ FwdCoef<acc_t> coef_at(const ChannelPtrs& p, int64_t c, acc_t eps) {
  return fwd_coef<acc_t>(static_cast<const acc_t*>(p.mean)[c], static_cast<const acc_t*>(p.var)[c],
                         static_cast<const acc_t*>(p.weight), static_cast<const acc_t*>(p.bias), c, eps);
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) apply_nchw_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                              int64_t N, int64_t C, int64_t S, ChannelPtrs p,
                                                              acc_t eps) {
  const int64_t c = blockIdx.x;
  const FwdCoef<acc_t> k = coef_at<acc_t>(p, c, eps);
  for_channel<VEC>(N, C, S, c, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.y) * blockDim.x, [&](int64_t off) {
                     const Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(x + off);
                     Vec<scalar_t, VEC> o;
#pragma unroll
                     for (int j = 0; j < VEC; ++j) {
                       o.v[j] = static_cast<scalar_t>(relu_if(bn_pre(static_cast<acc_t>(v.v[j]), k), RELU));
                     }
                     store_vec<scalar_t, VEC>(y + off, o);
                   });
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) apply_nhwc_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                              int64_t M, int64_t C, ChannelPtrs p, acc_t eps) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  FwdCoef<acc_t> k[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) k[j] = coef_at<acc_t>(p, c0 + j, eps);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const Vec<scalar_t, VEC> v = load_vec<scalar_t, VEC>(x + r * C + c0);
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o.v[j] = static_cast<scalar_t>(relu_if(bn_pre(static_cast<acc_t>(v.v[j]), k[j]), RELU));
    }
    store_vec<scalar_t, VEC>(y + r * C + c0, o);
  }
}

// ---------------------------------------------------------------- backward: sums through the ReLU mask

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) grad_nchw_kernel(const scalar_t* __restrict__ dy,
                                                             const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                                             int64_t S, ChannelPtrs p, acc_t eps,
                                                             Sums<acc_t>* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const FwdCoef<acc_t> k = coef_at<acc_t>(p, c, eps);
  Sums<acc_t> s{acc_t(0), acc_t(0)};
  for_channel<VEC>(N, C, S, c, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.y) * blockDim.x, [&](int64_t off) {
                     const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + off);
                     const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(dy + off);
#pragma unroll
                     for (int j = 0; j < VEC; ++j) {
                       const acc_t xj = static_cast<acc_t>(xv.v[j]);
                       const acc_t dz = relu_grad(static_cast<acc_t>(gv.v[j]), bn_pre(xj, k), RELU);
                       s.a += dz;
                       s.b += dz * (xj - k.mean);
                     }
                   });
  __shared__ Sums<acc_t> sh[32];
  s = block_reduce(s, sh);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * C + c] = s;
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) grad_nhwc_kernel(const scalar_t* __restrict__ dy,
                                                             const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                                             ChannelPtrs p, acc_t eps,
                                                             Sums<acc_t>* __restrict__ partial) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;
  Sums<acc_t> s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s[j].a = 0;
    s[j].b = 0;
  }
  if (active) {
    FwdCoef<acc_t> k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = coef_at<acc_t>(p, c0 + j, eps);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + r * C + c0);
      const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(dy + r * C + c0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t xj = static_cast<acc_t>(xv.v[j]);
        const acc_t dz = relu_grad(static_cast<acc_t>(gv.v[j]), bn_pre(xj, k[j]), RELU);
        s[j].a += dz;
        s[j].b += dz * (xj - k[j].mean);
      }
    }
  }
  Sums<acc_t>* sh = reinterpret_cast<Sums<acc_t>*>(cbr_smem);
  const int i = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) sh[i + j] = s[j];
  __syncthreads();
  column_reduce<Sums<acc_t>, VEC>(sh);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[static_cast<int64_t>(blockIdx.y) * C + c0 + j] = sh[threadIdx.x * VEC + j];
  }
}

// Sums the splits; also grad_weight = sum_dz_xmu * invstd when grad_weight is not null.
template <typename acc_t>
__global__ void grad_finalize_kernel(const Sums<acc_t>* __restrict__ partial, int64_t nsplit, int64_t C,
                                     const acc_t* __restrict__ var, acc_t eps, acc_t* __restrict__ sum_dz,
                                     acc_t* __restrict__ sum_dz_xmu, acc_t* __restrict__ grad_weight) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Sums<acc_t> s = partial[c];
  for (int64_t k = 1; k < nsplit; ++k) s = combine(s, partial[k * C + c]);
  sum_dz[c] = s.a;
  sum_dz_xmu[c] = s.b;
  if (grad_weight != nullptr) grad_weight[c] = s.b * bn_invstd(var[c], eps);
}

// ---------------------------------------------------------------- backward: dx

struct SumPtrs {
  const void* sum_dz;
  const void* sum_dz_xmu;
};

template <typename acc_t>
__device__ __forceinline__ BwdCoef<acc_t> bcoef_at(const ChannelPtrs& p, const SumPtrs& q, int64_t c, acc_t eps,
                                                   acc_t inv_count) {
  return bwd_coef<acc_t>(static_cast<const acc_t*>(p.var)[c], static_cast<const acc_t*>(p.weight), c, eps,
                         static_cast<const acc_t*>(q.sum_dz)[c], static_cast<const acc_t*>(q.sum_dz_xmu)[c], inv_count);
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) dx_nchw_kernel(const scalar_t* __restrict__ dy,
                                                           const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                                           int64_t N, int64_t C, int64_t S, ChannelPtrs p, SumPtrs q,
                                                           acc_t eps, acc_t inv_count) {
  const int64_t c = blockIdx.x;
  const FwdCoef<acc_t> k = coef_at<acc_t>(p, c, eps);
  const BwdCoef<acc_t> b = bcoef_at<acc_t>(p, q, c, eps, inv_count);
  for_channel<VEC>(N, C, S, c, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.y) * blockDim.x, [&](int64_t off) {
                     const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + off);
                     const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(dy + off);
                     Vec<scalar_t, VEC> o;
#pragma unroll
                     for (int j = 0; j < VEC; ++j) {
                       const acc_t xj = static_cast<acc_t>(xv.v[j]);
                       const acc_t dz = relu_grad(static_cast<acc_t>(gv.v[j]), bn_pre(xj, k), RELU);
                       o.v[j] = static_cast<scalar_t>(bn_dx(dz, xj - k.mean, b));
                     }
                     store_vec<scalar_t, VEC>(dx + off, o);
                   });
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads) dx_nhwc_kernel(const scalar_t* __restrict__ dy,
                                                           const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                                           int64_t M, int64_t C, ChannelPtrs p, SumPtrs q, acc_t eps,
                                                           acc_t inv_count) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  FwdCoef<acc_t> k[VEC];
  BwdCoef<acc_t> b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    k[j] = coef_at<acc_t>(p, c0 + j, eps);
    b[j] = bcoef_at<acc_t>(p, q, c0 + j, eps, inv_count);
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x + r * C + c0);
    const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(dy + r * C + c0);
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xj = static_cast<acc_t>(xv.v[j]);
      const acc_t dz = relu_grad(static_cast<acc_t>(gv.v[j]), bn_pre(xj, k[j]), RELU);
      o.v[j] = static_cast<scalar_t>(bn_dx(dz, xj - k[j].mean, b[j]));
    }
    store_vec<scalar_t, VEC>(dx + r * C + c0, o);
  }
}

// ---------------------------------------------------------------- launch configuration

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t target_blocks() {
  return 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Values per 16-byte load for these pointers (see the file comment).
template <typename scalar_t>
int pick_vec(const Geometry& g, const void* a, const void* b = nullptr, const void* c = nullptr) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t inner = g.nhwc ? g.C : g.S;
  if (inner % V != 0 || !aligned16(a) || !aligned16(b) || !aligned16(c)) return 1;
  return V;
}

struct Launch {
  dim3 grid;
  dim3 block;
  size_t smem;
  int64_t nsplit;
};

// NCHW: C x splits blocks, enough for ~4 blocks per SM but >= 4 vectors per thread.
Launch nchw_launch(const Geometry& g, int vec) {
  const int64_t nv = g.N * (g.S / vec);
  int64_t nsplit = ceil_div(target_blocks(), g.C);
  nsplit = std::min(nsplit, std::max<int64_t>(1, ceil_div(nv, int64_t(kThreads) * 4)));
  nsplit = std::max<int64_t>(1, std::min<int64_t>(nsplit, 65535));
  TORCH_CHECK(g.C <= 0x7fffffff, "fastnn: too many channels for the CUDA grid: ", g.C);
  return {dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(nsplit)), dim3(kThreads), 0, nsplit};
}

// NHWC: TX threads over channel vectors (a power of two <= 32), TY = kThreads / TX over rows.
Launch nhwc_launch(const Geometry& g, int vec, size_t smem_per_value) {
  const int64_t cv = g.C / vec;
  int tx = 1;
  while (tx < cv && tx < 32) tx <<= 1;
  const int ty = kThreads / tx;
  const int64_t gx = ceil_div(cv, tx);
  int64_t nsplit = ceil_div(target_blocks(), gx);
  nsplit = std::min(nsplit, std::max<int64_t>(1, ceil_div(g.count(), int64_t(ty) * 8)));
  nsplit = std::max<int64_t>(1, std::min<int64_t>(nsplit, 65535));
  TORCH_CHECK(gx <= 0x7fffffff, "fastnn: too many channels for the CUDA grid: ", g.C);
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(nsplit)), dim3(tx, ty),
          static_cast<size_t>(tx) * ty * vec * smem_per_value, nsplit};
}

template <typename acc_t>
ChannelPtrs channel_ptrs(const Params& p) {
  ChannelPtrs c;
  c.mean = p.mean.const_data_ptr<acc_t>();
  c.var = p.var.const_data_ptr<acc_t>();
  c.weight = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  c.bias = p.bias.defined() ? p.bias.const_data_ptr<acc_t>() : nullptr;
  return c;
}

// ---------------------------------------------------------------- launchers

template <typename scalar_t, typename acc_t, int VEC>
void launch_stats(const scalar_t* x, const Geometry& g, const at::Tensor& like, acc_t* mean, acc_t* var) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Launch L = g.nhwc ? nhwc_launch(g, VEC, sizeof(Welford<acc_t>)) : nchw_launch(g, VEC);
  at::Tensor ws = like.new_empty({L.nsplit * g.C * 3}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto* partial = reinterpret_cast<Welford<acc_t>*>(ws.data_ptr<acc_t>());
  if (g.nhwc) {
    stats_nhwc_kernel<scalar_t, acc_t, VEC><<<L.grid, L.block, L.smem, stream>>>(x, g.count(), g.C, partial);
  } else {
    stats_nchw_kernel<scalar_t, acc_t, VEC><<<L.grid, L.block, 0, stream>>>(x, g.N, g.C, g.S, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(g.C, kThreads)), kThreads, 0, stream>>>(
      partial, L.nsplit, g.C, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
void launch_apply(const scalar_t* x, scalar_t* y, const Geometry& g, const Params& p) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ChannelPtrs cp = channel_ptrs<acc_t>(p);
  const acc_t eps = static_cast<acc_t>(p.eps);
  if (g.nhwc) {
    const Launch L = nhwc_launch(g, VEC, 0);
    apply_nhwc_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, 0, stream>>>(x, y, g.count(), g.C, cp, eps);
  } else {
    const Launch L = nchw_launch(g, VEC);
    apply_nchw_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, 0, stream>>>(x, y, g.N, g.C, g.S, cp, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
void launch_grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g, const Params& p, const at::Tensor& like,
                      acc_t* sum_dz, acc_t* sum_dz_xmu, acc_t* grad_weight) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ChannelPtrs cp = channel_ptrs<acc_t>(p);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Launch L = g.nhwc ? nhwc_launch(g, VEC, sizeof(Sums<acc_t>)) : nchw_launch(g, VEC);
  at::Tensor ws = like.new_empty({L.nsplit * g.C * 2}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto* partial = reinterpret_cast<Sums<acc_t>*>(ws.data_ptr<acc_t>());
  if (g.nhwc) {
    grad_nhwc_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, L.smem, stream>>>(dy, x, g.count(), g.C, cp, eps,
                                                                                        partial);
  } else {
    grad_nchw_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, 0, stream>>>(dy, x, g.N, g.C, g.S, cp, eps,
                                                                                   partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(g.C, kThreads)), kThreads, 0, stream>>>(
      partial, L.nsplit, g.C, p.var.const_data_ptr<acc_t>(), eps, sum_dz, sum_dz_xmu, grad_weight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC, bool RELU>
void launch_dx(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, const Params& p,
               const acc_t* sum_dz, const acc_t* sum_dz_xmu, acc_t inv_count) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ChannelPtrs cp = channel_ptrs<acc_t>(p);
  const SumPtrs sp{sum_dz, sum_dz_xmu};
  const acc_t eps = static_cast<acc_t>(p.eps);
  if (g.nhwc) {
    const Launch L = nhwc_launch(g, VEC, 0);
    dx_nhwc_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, 0, stream>>>(dy, x, dx, g.count(), g.C, cp, sp, eps,
                                                                                 inv_count);
  } else {
    const Launch L = nchw_launch(g, VEC);
    dx_nchw_kernel<scalar_t, acc_t, VEC, RELU><<<L.grid, L.block, 0, stream>>>(dy, x, dx, g.N, g.C, g.S, cp, sp, eps,
                                                                                 inv_count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs body.template operator()<VEC>() with VEC = vec (1 or 16 / sizeof(scalar_t)).
template <typename scalar_t, typename Body>
void with_vec(int vec, Body&& body) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (vec == V) {
    body(std::integral_constant<int, V>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

template <typename Body>
void with_relu(bool relu, Body&& body) {
  if (relu) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

#define CBR_CUDA_DISPATCH(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

}  // namespace

void stats_cuda(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(g, xp), [&](auto V) {
      launch_stats<scalar_t, acc_t, decltype(V)::value>(xp, g, x, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    });
  });
}

void apply_cuda(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(g, xp, yp), [&](auto V) {
      with_relu(p.relu, [&](auto R) {
        launch_apply<scalar_t, acc_t, decltype(V)::value, decltype(R)::value>(xp, yp, g, p);
      });
    });
  });
}

void train_cuda(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_train", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(g, xp, yp), [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      launch_stats<scalar_t, acc_t, VEC>(xp, g, x, p.mean.data_ptr<acc_t>(), p.var.data_ptr<acc_t>());
      with_relu(p.relu, [&](auto R) { launch_apply<scalar_t, acc_t, VEC, decltype(R)::value>(xp, yp, g, p); });
    });
  });
}

void backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                          const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(g, gp, xp), [&](auto V) {
      with_relu(p.relu, [&](auto R) {
        launch_grad_sums<scalar_t, acc_t, decltype(V)::value, decltype(R)::value>(
            gp, xp, g, p, x, sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>(), nullptr);
      });
    });
  });
}

void backward_elemt_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, double inv_count,
                         const at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    with_vec<scalar_t>(pick_vec<scalar_t>(g, gp, xp, dp), [&](auto V) {
      with_relu(p.relu, [&](auto R) {
        launch_dx<scalar_t, acc_t, decltype(V)::value, decltype(R)::value>(
            gp, xp, dp, g, p, sum_dz.const_data_ptr<acc_t>(), sum_dz_xmu.const_data_ptr<acc_t>(),
            static_cast<acc_t>(inv_count));
      });
    });
  });
}

void backward_cuda(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                   const at::Tensor& dx, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                   const at::Tensor& grad_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  CBR_CUDA_DISPATCH(x, "fastnn::bn_relu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.count());
    with_vec<scalar_t>(pick_vec<scalar_t>(g, gp, xp, dp), [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      with_relu(p.relu, [&](auto R) {
        constexpr bool RELU = decltype(R)::value;
        launch_grad_sums<scalar_t, acc_t, VEC, RELU>(gp, xp, g, p, x, sum_dz.data_ptr<acc_t>(),
                                                     sum_dz_xmu.data_ptr<acc_t>(), grad_weight.data_ptr<acc_t>());
        launch_dx<scalar_t, acc_t, VEC, RELU>(gp, xp, dp, g, p, sum_dz.const_data_ptr<acc_t>(),
                                              sum_dz_xmu.const_data_ptr<acc_t>(), inv_count);
      });
    });
  });
}

}  // namespace cbr
}  // namespace fastnn
