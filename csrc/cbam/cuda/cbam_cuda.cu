// CBAM's passes over x on the GPU. Contract: cbam_cuda.h; math: cbam_math.h.
//
// Per sample, x is a matrix with a contiguous dimension and a strided one: NCHW is [C][P]
// (p contiguous), channels_last is [P][C] (c contiguous). Every kernel reads along the contiguous
// dimension with consecutive lanes (coalesced), so each layout gets the reduction shape that fits:
//   row_pool  : a warp per contiguous row; the reduction runs along the row (pool over H*W in
//               NCHW, over C in channels_last). 16-byte loads when rows allow.
//   col_pool  : a 32-column strip per block, 8 warps splitting the strided dimension, and the
//               strided dimension split again across blocks (partials merged by pool_finalize).
//   tile_kernel: a tile of rows x columns with sums along both directions at once (the backward's
//               two reductions of dout*x share one read), partials summed with ATen.
//   apply / backward_input: elementwise, vectorized along the contiguous dimension.
// Accumulation is in at::opmath_type (float for half/bfloat16/float, double for double). Indices
// within a sample are int32 (the caller checks C*H*W < 2^31); sample offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "cbam/cbam_math.h"
#include "cbam/cuda/cbam_cuda.h"

namespace fastnn {
namespace cbam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// blocks that keep every SM busy with a few resident blocks
inline int64_t target_blocks() { return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8; }

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int off) {
  return __shfl_down_sync(0xffffffffu, v, off);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += shfl_down(v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ void warp_combine(MaxState<acc_t>& st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t om = shfl_down(st.m, off);
    const int32_t oi = shfl_down(st.idx, off);
    const int32_t oc = shfl_down(st.cnt, off);
    st.combine(om, oi, oc);
  }
}

// VEC consecutive elements, loaded/stored as one 16-byte (or smaller) access
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t>
constexpr int vec16() {
  return 16 / sizeof(scalar_t);
}

// whether rows of `len` elements starting at `p` can be read in packs of VEC
template <typename scalar_t>
bool packable(const void* p, int64_t len, int vec) {
  return vec > 1 && len % vec == 0 && reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * vec) == 0;
}

// Output addressing of a pool: element j of sample n goes to mean[n*os + j], max[n*os + j], sel[n*js + j].
template <typename acc_t>
struct PoolOut {
  acc_t* mean;
  acc_t* max;
  int32_t* sel;
  int64_t os;  // sample stride of mean/max
  int64_t js;  // sample stride of sel (the number of outputs per sample)
  acc_t div;   // mean = sum / div
  bool first;
  __device__ __forceinline__ void write(int64_t n, int64_t j, acc_t sum, MaxState<acc_t> st) const {
    st.finish(sum);
    mean[n * os + j] = sum / div;
    max[n * os + j] = st.m;
    sel[n * js + j] = sel_of(st, first);
  }
};

// ---------------------------------------------------------------- row_pool
// rows: N * rps rows of `len` contiguous elements; v = x (or x * g[n, i] when GATED).
template <typename scalar_t, typename acc_t, bool GATED, int VEC>
__global__ void __launch_bounds__(kThreads) row_pool_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ g,
                                                            int64_t rows, int len, int rps, PoolOut<acc_t> out) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;  // warp-uniform
  const int64_t n = r / rps;
  const scalar_t* row = x + r * len;
  const acc_t* gr = GATED ? g + n * len : nullptr;
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  for (int base = lane * VEC; base < len; base += 32 * VEC) {
    const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t t = static_cast<acc_t>(pk.v[k]);
      if (GATED) t *= gr[base + k];
      sum += t;
      st.update(t, base + k);
    }
  }
  sum = warp_sum(sum);
  warp_combine(st);
  if (lane == 0) out.write(n, r - n * rps, sum, st);
}

template <typename scalar_t, typename acc_t, bool GATED>
void launch_row_pool(const scalar_t* x, const acc_t* g, int64_t rows, int len, int rps, PoolOut<acc_t> out) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kWarps)));
  constexpr int V = vec16<scalar_t>();
  if (packable<scalar_t>(x, len, V))
    row_pool_kernel<scalar_t, acc_t, GATED, V><<<grid, kThreads, 0, stream>>>(x, g, rows, len, rps, out);
  else
    row_pool_kernel<scalar_t, acc_t, GATED, 1><<<grid, kThreads, 0, stream>>>(x, g, rows, len, rps, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- col_pool
// Per sample a [K][R] matrix (R contiguous), reduced over k for each column r; v = x (or x * g[n, k]).
// Block (32 x 8): 32 columns, 8 warps over interleaved k; blockIdx.z splits k into chunks of kl.
// Partials: [S][N][R] (sum, max, idx, cnt), merged in pool_finalize.
template <typename scalar_t, typename acc_t, bool GATED>
__global__ void __launch_bounds__(kThreads) col_pool_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ g,
                                                            int N, int K, int R, int kl, acc_t* __restrict__ psum,
                                                            acc_t* __restrict__ pmax, int32_t* __restrict__ pidx,
                                                            int32_t* __restrict__ pcnt) {
  __shared__ acc_t s_sum[kWarps][32], s_max[kWarps][32];
  __shared__ int32_t s_idx[kWarps][32], s_cnt[kWarps][32];
  const int tx = threadIdx.x & 31, ty = threadIdx.x / 32;
  const int r = blockIdx.x * 32 + tx;
  const int n = blockIdx.y, s = blockIdx.z;
  const int k0 = s * kl, k1 = min(K, k0 + kl);
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  if (r < R) {
    const scalar_t* xs = x + int64_t(n) * K * R + r;
    const acc_t* gn = GATED ? g + int64_t(n) * K : nullptr;
    // unrolled so each thread keeps several loads in flight (the updates stay in k order)
#pragma unroll 4
    for (int k = k0 + ty; k < k1; k += kWarps) {
      acc_t t = static_cast<acc_t>(xs[int64_t(k) * R]);
      if (GATED) t *= gn[k];
      sum += t;
      st.update(t, k);
    }
  }
  s_sum[ty][tx] = sum;
  s_max[ty][tx] = st.m;
  s_idx[ty][tx] = st.idx;
  s_cnt[ty][tx] = st.cnt;
  __syncthreads();
  if (ty == 0 && r < R) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      sum += s_sum[w][tx];
      st.combine(s_max[w][tx], s_idx[w][tx], s_cnt[w][tx]);
    }
    const int64_t o = (int64_t(s) * N + n) * R + r;
    psum[o] = sum;
    pmax[o] = st.m;
    pidx[o] = st.idx;
    pcnt[o] = st.cnt;
  }
}

template <typename acc_t>
__global__ void pool_finalize_kernel(const acc_t* __restrict__ psum, const acc_t* __restrict__ pmax,
                                     const int32_t* __restrict__ pidx, const int32_t* __restrict__ pcnt, int S, int N,
                                     int R, PoolOut<acc_t> out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= int64_t(N) * R) return;
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  for (int s = 0; s < S; ++s) {
    const int64_t o = int64_t(s) * N * R + t;
    sum += psum[o];
    st.combine(pmax[o], pidx[o], pcnt[o]);
  }
  const int64_t n = t / R;
  out.write(n, t - n * R, sum, st);
}

template <typename scalar_t, typename acc_t, bool GATED>
void launch_col_pool(const scalar_t* x, const acc_t* g, int N, int K, int R, PoolOut<acc_t> out,
                     const at::TensorOptions& acc_opts) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t gx = ceil_div(R, 32);
  // split k so the grid fills the GPU, keeping at least 32 k per split (4 per warp)
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(ceil_div(target_blocks(), gx * N), ceil_div(K, 32)));
  const int kl = static_cast<int>(ceil_div(K, S));
  const int Sr = static_cast<int>(ceil_div(K, kl));
  at::Tensor part = at::empty({2, Sr, N, R}, acc_opts);
  at::Tensor ipart = at::empty({2, Sr, N, R}, acc_opts.dtype(at::kInt));
  acc_t* ps = part.mutable_data_ptr<acc_t>();
  int32_t* pi = ipart.mutable_data_ptr<int32_t>();
  const int64_t plane = int64_t(Sr) * N * R;
  col_pool_kernel<scalar_t, acc_t, GATED><<<dim3(gx, N, Sr), kThreads, 0, stream>>>(x, g, N, K, R, kl, ps, ps + plane,
                                                                                     pi, pi + plane);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pool_finalize_kernel<acc_t><<<ceil_div(int64_t(N) * R, kThreads), kThreads, 0, stream>>>(ps, ps + plane, pi,
                                                                                          pi + plane, Sr, N, R, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- tile: sums along rows and columns
// Per sample a [O][I] matrix (I contiguous). Block: 8 warps x RPW rows = one row chunk; lanes walk
// 32 columns at a time through the block's column chunk. ROW: rowpart[n][ic][o] = sum over the
// chunk's columns of rv; COL: colpart[n][oc][i] = sum over the chunk's rows of cv.
template <typename acc_t, class E, bool ROW, bool COL, int RPW>
__global__ void __launch_bounds__(kThreads) tile_kernel(E e, int O, int I, int icl, int nOc, int nIc,
                                                        acc_t* __restrict__ rowpart, acc_t* __restrict__ colpart) {
  __shared__ acc_t s_col[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int ic = blockIdx.x, oc = blockIdx.y, n = blockIdx.z;
  const int o0 = oc * (kWarps * RPW) + warp * RPW;
  const int i0 = ic * icl, i1 = min(I, i0 + icl);
  acc_t racc[RPW];
#pragma unroll
  for (int j = 0; j < RPW; ++j) racc[j] = 0;
  for (int ib = i0; ib < i1; ib += 32) {
    const int i = ib + lane;
    const bool valid = i < i1;
    acc_t cacc = 0;
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const int o = o0 + j;
      if (valid && o < O) {
        acc_t rv, cv;
        e(n, o, i, rv, cv);
        racc[j] += rv;
        cacc += cv;
      }
    }
    if (COL) {
      s_col[warp][lane] = cacc;
      __syncthreads();
      if (warp == 0 && valid) {
        acc_t t = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) t += s_col[w][lane];
        colpart[(int64_t(n) * nOc + oc) * I + i] = t;
      }
      __syncthreads();
    }
  }
  if (ROW) {
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const acc_t v = warp_sum(racc[j]);
      const int o = o0 + j;
      if (lane == 0 && o < O) rowpart[(int64_t(n) * nIc + ic) * O + o] = v;
    }
  }
}

constexpr int kRPW = 8;  // rows per warp in tile_kernel

struct TileGrid {
  int nOc, nIc, icl;
};

inline TileGrid tile_grid(int64_t N, int64_t O, int64_t I) {
  TileGrid t;
  t.nOc = static_cast<int>(ceil_div(O, kWarps * kRPW));
  int64_t nIc = std::max<int64_t>(1, std::min<int64_t>(ceil_div(target_blocks(), int64_t(t.nOc) * N), ceil_div(I, 32)));
  t.icl = static_cast<int>(ceil_div(ceil_div(I, nIc), 32) * 32);
  t.nIc = static_cast<int>(ceil_div(I, t.icl));
  return t;
}

template <typename acc_t, bool ROW, bool COL, class E>
void launch_tile(const E& e, int64_t N, int64_t O, int64_t I, const TileGrid& t, acc_t* rowpart, acc_t* colpart) {
  TORCH_CHECK(N <= 65535 && t.nOc <= 65535, "cbam CUDA: batch or map too large for the tile grid");
  tile_kernel<acc_t, E, ROW, COL, kRPW><<<dim3(t.nIc, t.nOc, N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      e, static_cast<int>(O), static_cast<int>(I), t.icl, t.nOc, t.nIc, rowpart, colpart);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// backward_reduce's element: T = dout*x; NCHW (o = c, i = p): rv = T*s[p] (-> dg[c]), cv = T*g[c] (-> ds[p]);
// channels_last (o = p, i = c): rv = T*g[c] (-> ds[p]), cv = T*s[p] (-> dg[c]).
template <typename scalar_t, typename acc_t, bool CL>
struct DualElem {
  const scalar_t* dout;
  const scalar_t* x;
  const acc_t* g;  // [N, C]
  const acc_t* s;  // [N, P]
  int C, P;
  __device__ __forceinline__ void operator()(int n, int o, int i, acc_t& rv, acc_t& cv) const {
    const int64_t off = (int64_t(n) * C * P) + int64_t(o) * (CL ? C : P) + i;
    const acc_t t = static_cast<acc_t>(dout[off]) * static_cast<acc_t>(x[off]);
    const int c = CL ? i : o, p = CL ? o : i;
    const acc_t gc = g[int64_t(n) * C + c], sp = s[int64_t(n) * P + p];
    rv = t * (CL ? gc : sp);
    cv = t * (CL ? sp : gc);
  }
};

// backward_gate's element: x*(wa[p] + [max_c at (c, p)] em[p]), summed over p for each c.
template <typename scalar_t, typename acc_t, bool CL, bool FIRST>
struct GateElem {
  const scalar_t* x;
  const acc_t* g;
  const acc_t* wa;
  const acc_t* em;
  const acc_t* pooled_s;  // [N, 2, P]: the max row
  const int32_t* sel_s;
  int C, P;
  __device__ __forceinline__ void operator()(int n, int o, int i, acc_t& rv, acc_t& cv) const {
    const int64_t off = (int64_t(n) * C * P) + int64_t(o) * (CL ? C : P) + i;
    const int c = CL ? i : o, p = CL ? o : i;
    const acc_t xv = static_cast<acc_t>(x[off]);
    const int64_t np = int64_t(n) * P + p;
    const bool at = FIRST ? (sel_s[np] == c) : (xv * g[int64_t(n) * C + c] == pooled_s[int64_t(n) * 2 * P + P + p]);
    const acc_t v = cbam_gate_term<acc_t>(xv, wa[np], at, em[np]);
    rv = v;
    cv = v;
  }
};


// ---------------------------------------------------------------- elementwise passes

// index helpers: element e (vector start) of a [N][C][P] (NCHW) or [N][P][C] (channels_last) tensor
struct Coord {
  int64_t n;
  int c, p;
};
template <bool CL>
__device__ __forceinline__ Coord coord_of(int64_t e, int C, int P) {
  Coord k;
  if (CL) {
    const int64_t np = e / C;
    k.c = static_cast<int>(e - np * C);
    k.n = np / P;
    k.p = static_cast<int>(np - k.n * P);
  } else {
    const int64_t nc = e / P;
    k.p = static_cast<int>(e - nc * P);
    k.n = nc / C;
    k.c = static_cast<int>(nc - k.n * C);
  }
  return k;
}

template <typename scalar_t, typename acc_t, bool CL, int VEC>
__global__ void __launch_bounds__(kThreads) apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ g,
                                                         const acc_t* __restrict__ s, scalar_t* __restrict__ out,
                                                         int64_t nvec, int C, int P) {
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC;
    const Coord k = coord_of<CL>(e, C, P);
    const Pack<scalar_t, VEC> in = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + e);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // the VEC elements share p (channels_last) or c (NCHW)
      const acc_t gc = g[k.n * C + (CL ? k.c + j : k.c)];
      const acc_t sp = s[k.n * P + (CL ? k.p : k.p + j)];
      o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(in.v[j]) * gc) * sp);
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + e) = o;
  }
}

template <typename scalar_t, typename acc_t>
struct DxPtrs {
  const scalar_t* dout;  // with s
  const acc_t* g;        // null: gate 1
  const acc_t* s;
  const acc_t* wa;  // spatial part
  const acc_t* em;
  const acc_t* ms;  // max row of pooled_s: ms[n * 2P + P + p]
  const int32_t* sel_s;
  const acc_t* a2;  // channel part
  const acc_t* e2;
  const acc_t* mc;  // max row of pooled_c: mc[n * C + c]
  const int32_t* sel_c;
};

template <typename scalar_t, typename acc_t, bool CL, int VEC, bool FIRST, bool HAS_D, bool HAS_S, bool HAS_C>
__global__ void __launch_bounds__(kThreads) backward_input_kernel(DxPtrs<scalar_t, acc_t> A,
                                                                  const scalar_t* __restrict__ x,
                                                                  scalar_t* __restrict__ dx, int64_t nvec, int C,
                                                                  int P) {
  // FIRST reads x only through the split rule's comparisons, so the compiler drops the load of x
  constexpr bool NEED_X = !FIRST;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC;
    const Coord k = coord_of<CL>(e, C, P);
    Pack<scalar_t, VEC> xin, din, o;
    if (NEED_X) xin = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + e);
    if (HAS_D) din = *reinterpret_cast<const Pack<scalar_t, VEC>*>(A.dout + e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = CL ? k.c + j : k.c, p = CL ? k.p : k.p + j;
      const int64_t nc = k.n * C + c, np = k.n * P + p;
      const acc_t xv = NEED_X ? static_cast<acc_t>(xin.v[j]) : acc_t(0);
      const acc_t gc = A.g ? A.g[nc] : acc_t(1);
      bool ats = false, atc = false;
      acc_t wa = 0, em = 0, a2 = 0, e2 = 0, d = 0, sp = 0;
      if (HAS_S) {
        wa = A.wa[np];
        em = A.em[np];
        ats = FIRST ? (A.sel_s[np] == c) : (xv * gc == A.ms[k.n * 2 * P + P + p]);
      }
      if (HAS_C) {
        a2 = A.a2[nc];
        e2 = A.e2[nc];
        atc = FIRST ? (A.sel_c[nc] == p) : (xv == A.mc[nc]);
      }
      if (HAS_D) {
        d = static_cast<acc_t>(din.v[j]);
        sp = A.s[np];
      }
      o.v[j] = static_cast<scalar_t>(cbam_dx<acc_t>(d, sp, gc, wa, ats, em, a2, atc, e2));
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dx + e) = o;
  }
}

inline unsigned elementwise_blocks(int64_t nvec) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(nvec, kThreads), target_blocks() * 4)));
}

// VEC for an elementwise pass: 16-byte packs when the contiguous dimension allows, else 1
template <typename scalar_t>
int elementwise_vec(const at::Tensor& x, bool cl, std::initializer_list<const void*> ptrs) {
  const int64_t inner = cl ? x.size(1) : x.size(2) * x.size(3);
  constexpr int V = vec16<scalar_t>();
  if (inner % V != 0) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * V) != 0) return 1;
  return V;
}

template <typename F>
inline void with_bool(bool b, F f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

// ---------------------------------------------------------------- entry points

void channel_pool(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_channel_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pc = pooled_c.mutable_data_ptr<acc_t>();
    PoolOut<acc_t> out{pc, pc + N * C, sel_c.mutable_data_ptr<int32_t>(), C, C, static_cast<acc_t>(P), first};
    if (!cl)
      launch_row_pool<scalar_t, acc_t, false>(x.const_data_ptr<scalar_t>(), nullptr, N * C, static_cast<int>(P),
                                              static_cast<int>(C), out);
    else
      launch_col_pool<scalar_t, acc_t, false>(x.const_data_ptr<scalar_t>(), nullptr, static_cast<int>(N),
                                              static_cast<int>(P), static_cast<int>(C), out, pooled_c.options());
  });
}

void spatial_pool(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,
                  at::Tensor& sel_s) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* ps = pooled_s.mutable_data_ptr<acc_t>();
    PoolOut<acc_t> out{ps, ps + P, sel_s.mutable_data_ptr<int32_t>(), 2 * P, P, static_cast<acc_t>(C), first};
    const acc_t* gp = ptr_or_null<acc_t>(g);
    with_bool(gp != nullptr, [&](auto gated) {
      constexpr bool GATED = decltype(gated)::value;
      if (cl)
        launch_row_pool<scalar_t, acc_t, GATED>(x.const_data_ptr<scalar_t>(), gp, N * P, static_cast<int>(C),
                                                static_cast<int>(P), out);
      else
        launch_col_pool<scalar_t, acc_t, GATED>(x.const_data_ptr<scalar_t>(), gp, static_cast<int>(N),
                                                static_cast<int>(C), static_cast<int>(P), out, pooled_s.options());
    });
  });
}

void apply_gates(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(x.device());
  const int C = static_cast<int>(x.size(1)), P = static_cast<int>(x.size(2) * x.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int V = elementwise_vec<scalar_t>(x, cl, {xp, op});
    auto stream = at::cuda::getCurrentCUDAStream();
    with_bool(cl, [&](auto cl_tag) {
      constexpr bool CL = decltype(cl_tag)::value;
      constexpr int VV = vec16<scalar_t>();
      if (V == VV) {
        const int64_t nvec = x.numel() / VV;
        apply_kernel<scalar_t, acc_t, CL, VV><<<elementwise_blocks(nvec), kThreads, 0, stream>>>(
            xp, g.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), op, nvec, C, P);
      } else {
        apply_kernel<scalar_t, acc_t, CL, 1><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
            xp, g.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), op, x.numel(), C, P);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_reduce(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                     at::Tensor& ds, at::Tensor& dg) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t O = cl ? P : C, I = cl ? C : P;
  const TileGrid t = tile_grid(N, O, I);
  at::Tensor rowpart = at::empty({N, t.nIc, O}, g.options());
  at::Tensor colpart = at::empty({N, t.nOc, I}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(cl, [&](auto cl_tag) {
      constexpr bool CL = decltype(cl_tag)::value;
      DualElem<scalar_t, acc_t, CL> e{dout.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                      g.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), static_cast<int>(C),
                                      static_cast<int>(P)};
      launch_tile<acc_t, true, true>(e, N, O, I, t, rowpart.mutable_data_ptr<acc_t>(),
                                     colpart.mutable_data_ptr<acc_t>());
    });
  });
  // rows are channels in NCHW (row sums -> dg) and pixels in channels_last (row sums -> ds)
  at::Tensor ds2 = ds.view({N, P}), dg2 = dg.view({N, C});
  if (!cl) {
    at::sum_out(dg2, rowpart, {1});
    at::sum_out(ds2, colpart, {1});
  } else {
    at::sum_out(ds2, rowpart, {1});
    at::sum_out(dg2, colpart, {1});
  }
}

void backward_gate(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa, const at::Tensor& em,
                   const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first, at::Tensor& dg2) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t O = cl ? P : C, I = cl ? C : P;
  const TileGrid t = tile_grid(N, O, I);
  // NCHW: a row sum over p per channel row; channels_last: a column sum over the pixel rows
  at::Tensor part = cl ? at::empty({N, t.nOc, I}, g.options()) : at::empty({N, t.nIc, O}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(cl, [&](auto cl_tag) {
      constexpr bool CL = decltype(cl_tag)::value;
      with_bool(first, [&](auto first_tag) {
        constexpr bool FIRST = decltype(first_tag)::value;
        GateElem<scalar_t, acc_t, CL, FIRST> e{x.const_data_ptr<scalar_t>(),  g.const_data_ptr<acc_t>(),
                                               wa.const_data_ptr<acc_t>(),    em.const_data_ptr<acc_t>(),
                                               pooled_s.const_data_ptr<acc_t>(), sel_s.const_data_ptr<int32_t>(),
                                               static_cast<int>(C),            static_cast<int>(P)};
        acc_t* pp = part.mutable_data_ptr<acc_t>();
        if (CL)
          launch_tile<acc_t, false, true>(e, N, O, I, t, nullptr, pp);
        else
          launch_tile<acc_t, true, false>(e, N, O, I, t, pp, nullptr);
      });
    });
  });
  at::sum_out(dg2, part, {1});
}

void backward_input(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                    const at::Tensor& wa, const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s,
                    const at::Tensor& a2, const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c,
                    bool first, at::Tensor& dx) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0);
  const int C = static_cast<int>(x.size(1)), P = static_cast<int>(x.size(2) * x.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DxPtrs<scalar_t, acc_t> A{ptr_or_null<scalar_t>(dout),
                              ptr_or_null<acc_t>(g),
                              ptr_or_null<acc_t>(s),
                              ptr_or_null<acc_t>(wa),
                              ptr_or_null<acc_t>(em),
                              ptr_or_null<acc_t>(pooled_s),
                              ptr_or_null<int32_t>(sel_s),
                              ptr_or_null<acc_t>(a2),
                              ptr_or_null<acc_t>(e2),
                              pooled_c.defined() ? pooled_c.const_data_ptr<acc_t>() + N * C : nullptr,
                              ptr_or_null<int32_t>(sel_c)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int V = elementwise_vec<scalar_t>(x, cl, {xp, dxp, A.dout});
    auto stream = at::cuda::getCurrentCUDAStream();
    auto launch = [&](auto cl_tag, auto first_tag, auto d_tag, auto s_tag, auto c_tag) {
      constexpr bool CL = decltype(cl_tag)::value, FI = decltype(first_tag)::value;
      constexpr bool HD = decltype(d_tag)::value, HS = decltype(s_tag)::value, HC = decltype(c_tag)::value;
      constexpr int VV = vec16<scalar_t>();
      if (V == VV) {
        const int64_t nvec = x.numel() / VV;
        backward_input_kernel<scalar_t, acc_t, CL, VV, FI, HD, HS, HC>
            <<<elementwise_blocks(nvec), kThreads, 0, stream>>>(A, xp, dxp, nvec, C, P);
      } else {
        backward_input_kernel<scalar_t, acc_t, CL, 1, FI, HD, HS, HC>
            <<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(A, xp, dxp, x.numel(), C, P);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using T = std::true_type;
    using F = std::false_type;
    with_bool(cl, [&](auto cl_tag) {
      with_bool(first, [&](auto first_tag) {
        // the three combinations the ops use: CBAM (all parts), channel pool alone, spatial pool alone
        if (A.dout && A.wa && A.a2)
          launch(cl_tag, first_tag, T{}, T{}, T{});
        else if (A.a2 && !A.dout && !A.wa)
          launch(cl_tag, first_tag, F{}, F{}, T{});
        else if (A.wa && !A.dout && !A.a2)
          launch(cl_tag, first_tag, F{}, T{}, F{});
        else
          TORCH_CHECK(false, "cbam backward_input: unsupported combination of parts");
      });
    });
  });
}


}  // namespace cuda
}  // namespace cbam
}  // namespace fastnn
