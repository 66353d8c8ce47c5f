// CBAM forward and backward on the GPU, every step in custom kernels (the default CUDA path; the
// generic orchestration in cbam.cpp stays behind FASTNN_CBAM_CUDA_LEGACY=1). Contract: cbam_cuda.h;
// per-element math: cbam_math.h; the saved buffers: cbam_saved.h.
//
// Why: at ResNet-50's CBAM shapes the ATen version spent more host time per call (about 20 small
// ATen ops forward, 50 backward: cuBLAS, cuDNN, dtype copies, fills) than the GPU spent on x. Here
// the forward is 6-7 launches and the backward 7 (one more each with a training-mode spatial BN),
// with 3 and 4-5 allocations, and no dtype copies of the parameters (kernels read them as stored).
//
// Layout. Per sample, x is a [R][L] matrix whose L axis is contiguous: NCHW is [C][P], channels_last
// is [P][C] (P = H*W). The passes over x are written for that matrix, not for a layout:
//   - Tile2D (dual_reduce, gate_reduce, col_pool, apply, input): a block covers a column group of
//     CG = lpr * VEC columns and a range of rows; each row segment is read by lpr consecutive lanes
//     in VEC-element (up to 16-byte) vectors, a warp reads 32/lpr rows at once, two rows per lane
//     are in flight. Per-column data (e.g. s[p] in NCHW) is loaded once per block into registers,
//     per-row data (e.g. g[c] in NCHW) once per row. Row sums reduce over the lpr lanes (shuffles)
//     and are partial per column group; column sums reduce over the block (shuffles, shared
//     memory) and are partial per row split. Partials ("slots") are summed by the consumer.
//   - row_pool: a warp per contiguous row (pool along L), two vectors per lane in flight.
// Reductions over x accumulate in at::opmath_type (float for half/bfloat16/float, double for
// double). Indices within a sample are int32 (the caller checks C*H*W < 2^31), offsets int64.
//
// Kernel assumptions (checked on the host): x, dout, out, dx contiguous in their layout with the
// same strides; vector width VEC only when L % VEC == 0 and the x-sized pointers are aligned to
// VEC elements; small buffers (saved, scratch) start every region at a multiple of 16 elements
// (so VEC-wide loads of them are aligned); N <= 65535 (grid z); spatial conv kernel k <= 31.
//
// FASTNN_CBAM_EMULATE: compiled as C++ by the CPU emulator (tests/cbam_cuda_emulator), which runs
// these kernels thread by thread on CPU tensors to check them without a GPU; it provides the CUDA
// names used here. Launches go through CBAM_LAUNCH, dynamic shared memory through CBAM_DYNAMIC_SMEM.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifndef FASTNN_CBAM_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define CBAM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define CBAM_DYNAMIC_SMEM(name) extern __shared__ unsigned char name[]
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cbam/cbam_math.h"
#include "cbam/cbam_saved.h"
#include "cbam/cuda/cbam_cuda.h"

namespace fastnn {
namespace cbam {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // every kernel but the MLP backward's and the BN's
// The heavier kernels declare __launch_bounds__(kThreads, 2): with no minimum block count, this
// nvcc (13.0) trades registers for occupancy and spills a few values inside the row loops.
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 16;     // spatial conv: a 16 x 16 pixel tile per block
constexpr int kMaxConvK = 31;
constexpr int kBig = 1024;    // threads of the single-block BN kernels and of mlp_bwd_a

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ---------------------------------------------------------------- parameters in any float dtype
// The small parameters (conv weight, biases, BN) are read and their gradients written in the
// dtype they are stored in, switching per access (a few hundred accesses per call).
enum : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline int code_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "cbam CUDA: unsupported parameter dtype ", t);
  }
}

struct AnyIn {
  const void* p;  // null: absent
  int code;
};
struct AnyOut {
  void* p;  // null: not wanted
  int code;
};

inline AnyIn any_in(const at::Tensor& t) {
  return t.defined() ? AnyIn{t.const_data_ptr(), code_of(t.scalar_type())} : AnyIn{nullptr, kF32};
}
inline AnyOut any_out(at::Tensor& t) {
  return t.defined() ? AnyOut{t.mutable_data_ptr(), code_of(t.scalar_type())} : AnyOut{nullptr, kF32};
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_any(AnyIn a, int64_t i) {
  switch (a.code) {
    case kF32:
      return static_cast<acc_t>(static_cast<const float*>(a.p)[i]);
    case kF64:
      return static_cast<acc_t>(static_cast<const double*>(a.p)[i]);
    case kF16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(a.p)[i]));
    default:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(a.p)[i]));
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_any(AnyOut a, int64_t i, acc_t v) {
  switch (a.code) {
    case kF32:
      static_cast<float*>(a.p)[i] = static_cast<float>(v);
      break;
    case kF64:
      static_cast<double*>(a.p)[i] = static_cast<double>(v);
      break;
    case kF16:
      static_cast<at::Half*>(a.p)[i] = static_cast<at::Half>(static_cast<float>(v));
      break;
    default:
      static_cast<at::BFloat16*>(a.p)[i] = static_cast<at::BFloat16>(static_cast<float>(v));
      break;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_of(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp(-z));
}

// relu that keeps NaN, as at::relu
template <typename acc_t>
__device__ __forceinline__ acc_t relu_of(acc_t h) {
  return h < acc_t(0) ? acc_t(0) : h;
}

// ---------------------------------------------------------------- vectors and reductions

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

#ifdef FASTNN_CBAM_EMULATE  // the CPU would take a misaligned vector access the GPU faults on
#define CBAM_CHECK_ALIGNED(p, bytes) \
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % (bytes) == 0, "cbam emulator: misaligned vector access")
#else
#define CBAM_CHECK_ALIGNED(p, bytes)
#endif

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> ldv(const T* p) {
  CBAM_CHECK_ALIGNED(p, sizeof(T) * V);
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <int V, typename T>
__device__ __forceinline__ void stv(T* p, const Vec<T, V>& x) {
  CBAM_CHECK_ALIGNED(p, sizeof(T) * V);
  *reinterpret_cast<Vec<T, V>*>(p) = x;
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

// The lane-group reductions below take a run-time group width that is uniform across the warp:
// the steps are unrolled and skipped by a uniform test (no loop, every lane shuffles or none).

// sum over the `width` lanes of an aligned lane group (width a power of 2 <= 32); all 32 lanes call
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1)
    if (m < width) v += shfl_xor(v, m);
  return v;
}

// sum over the lanes that share (lane % lpr), i.e. over a warp's row groups; all 32 lanes call
template <typename T>
__device__ __forceinline__ T across_rows(T v, int lpr) {
#pragma unroll
  for (int m = 1; m < 32; m <<= 1)
    if (m >= lpr) v += shfl_xor(v, m);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ void across_rows(MaxState<acc_t>& st, acc_t& sum, int lpr) {
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    if (m < lpr) continue;
    sum += shfl_xor(sum, m);
    const acc_t om = shfl_xor(st.m, m);
    const int32_t oi = shfl_xor(st.idx, m);
    const int32_t oc = shfl_xor(st.cnt, m);
    st.combine(om, oi, oc);
  }
}

// block-wide sum of one value per thread (blockDim.x a multiple of 32, at most 1024); every thread
// gets the total. `red` holds 32 entries; the call begins and ends with a barrier.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  v = group_sum(v, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T t = 0;
  for (int w = 0; w < nw; ++w) t += red[w];
  __syncthreads();
  return t;
}

// ---------------------------------------------------------------- Tile2D geometry

struct Geo {
  int R, L;  // rows and columns per sample (L contiguous)
  int lpr;   // lanes per row: 8, 16 or 32
  int nLc;   // column groups (of lpr * VEC columns)
  int S;     // row splits
  int RB;    // rows per split (a multiple of the rows per step, kThreads / lpr)
};

// VEC for a Tile2D pass over rows of L elements: 16-byte vectors, 8-byte ones for 2-byte types
// (e.g. 14x14 maps in NCHW: L = 196), else scalars.
template <typename scalar_t>
int pick_vec(int64_t L, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  auto ok = [&](int v) {
    if (L % v != 0) return false;
    for (const void* p : ptrs)
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * v) != 0) return false;
    return true;
  };
  if (V > 1 && ok(V)) return V;
  if (V >= 8 && ok(V / 2)) return V / 2;
  return 1;
}

Geo make_geo(int64_t N, int64_t R, int64_t L, int vec) {
  const int64_t lv = L / vec;  // vectors per row
  Geo G;
  G.R = static_cast<int>(R);
  G.L = static_cast<int>(L);
  G.lpr = 8;
  for (int cand : {32, 16}) {  // the widest group with at most 10% idle lanes in the last column group
    if (cdiv(lv, cand) * cand * 10 <= lv * 11) {
      G.lpr = cand;
      break;
    }
  }
  G.nLc = static_cast<int>(cdiv(lv, G.lpr));
  const int64_t rstep = kThreads / G.lpr;
  // Split the rows until the grid fills the GPU once: these kernels use 60-113 registers, so about 3
  // blocks of 256 are resident per SM. Fewer splits mean fewer partial slots to sum and, for the
  // column pool, no merge launch (e.g. NCHW 256x56x56 at N=32: 13 column groups x 32 = 416 blocks,
  // S = 1). Keep >= 2 steps (4 rows per lane group) per split.
  const int64_t target = int64_t(sm_count()) * 3;
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(cdiv(target, N * G.nLc), cdiv(R, 2 * rstep)));
  const int64_t RB = cdiv(cdiv(R, S), rstep) * rstep;
  G.RB = static_cast<int>(RB);
  G.S = static_cast<int>(cdiv(R, RB));
  return G;
}

inline dim3 geo_grid(const Geo& G, int64_t N) {
  return dim3(static_cast<unsigned>(G.nLc), static_cast<unsigned>(G.S), static_cast<unsigned>(N));
}

// This thread's place in a Tile2D block.
struct TileIdx {
  int n, cg, s;      // sample, column group, row split
  int li;            // lane within its row group (0 .. lpr-1)
  int l0;            // first of this lane's VEC columns
  bool col_ok;       // l0 < L (then all VEC columns are, as L % VEC == 0)
  int rsub, rstep;   // this lane's row within a step, rows per step (kThreads / lpr)
  int r_begin, r_end;
};

template <int VEC>
__device__ __forceinline__ TileIdx tile_idx(const Geo& G) {
  TileIdx t;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  t.cg = blockIdx.x;
  t.s = blockIdx.y;
  t.n = blockIdx.z;
  t.li = lane % G.lpr;
  t.l0 = (t.cg * G.lpr + t.li) * VEC;
  t.col_ok = t.l0 < G.L;
  t.rsub = warp * (32 / G.lpr) + lane / G.lpr;
  t.rstep = kThreads / G.lpr;
  t.r_begin = t.s * G.RB;
  t.r_end = min(G.R, t.r_begin + G.RB);
  return t;
}

// Column sums of a Tile2D block: each lane holds VEC partial sums for its columns; reduce over the
// warp's row groups, then over the warps, and write colpart[(s * N + n) * L + l]. All threads call.
template <typename acc_t, int VEC>
__device__ __forceinline__ void write_col_sums(acc_t (&cacc)[VEC], const TileIdx& t, const Geo& G, int N,
                                               acc_t (*s_col)[32 * VEC], acc_t* __restrict__ colpart) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < VEC; ++j) cacc[j] = across_rows(cacc[j], G.lpr);
  if (lane < G.lpr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) s_col[warp][t.li * VEC + j] = cacc[j];
  }
  __syncthreads();
  const int CG = G.lpr * VEC;
  for (int i = threadIdx.x; i < CG; i += kThreads) {
    const int l = t.cg * CG + i;
    if (l < G.L) {
      acc_t v = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += s_col[w][i];
      colpart[(int64_t(t.s) * N + t.n) * G.L + l] = v;
    }
  }
}

// ---------------------------------------------------------------- backward: the two sums of dout*x
// T = dout*x. rowpart[(cg*N + n)*R + r] = sum over the group's columns of T*colw[n, l];
// colpart[(s*N + n)*L + l] = sum over the split's rows of T*roww[n, r].
// NCHW (rows c, columns p): colw = s, roww = g: row sums -> dL/dg, column sums -> dL/ds.
// channels_last (rows p, columns c): colw = g, roww = s: row sums -> dL/ds, column sums -> dL/dg.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, 2) dual_reduce_kernel(const scalar_t* __restrict__ dout,
                                                               const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ colw,
                                                               const acc_t* __restrict__ roww, Geo G,
                                                               acc_t* __restrict__ rowpart,
                                                               acc_t* __restrict__ colpart) {
  __shared__ acc_t s_col[kWarps][32 * VEC];
  const TileIdx t = tile_idx<VEC>(G);
  const int N = gridDim.z;
  const int64_t base = int64_t(t.n) * G.R * G.L + t.l0;
  acc_t cw[VEC], cacc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) cw[j] = cacc[j] = acc_t(0);
  if (t.col_ok) {
    const Vec<acc_t, VEC> w = ldv<VEC>(colw + int64_t(t.n) * G.L + t.l0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) cw[j] = w.v[j];
  }
  for (int m = 0; t.r_begin + m * t.rstep < t.r_end; m += 2) {  // warp-uniform: shuffles inside
    const int r1 = t.r_begin + m * t.rstep + t.rsub, r2 = r1 + t.rstep;
    const bool ok1 = t.col_ok && r1 < t.r_end, ok2 = t.col_ok && r2 < t.r_end;
    Vec<scalar_t, VEC> d1, x1, d2, x2;
    if (ok1) {
      d1 = ldv<VEC>(dout + base + int64_t(r1) * G.L);
      x1 = ldv<VEC>(x + base + int64_t(r1) * G.L);
    }
    if (ok2) {
      d2 = ldv<VEC>(dout + base + int64_t(r2) * G.L);
      x2 = ldv<VEC>(x + base + int64_t(r2) * G.L);
    }
    acc_t rs1 = 0, rs2 = 0;
    if (ok1) {
      const acc_t w1 = roww[int64_t(t.n) * G.R + r1];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t v = static_cast<acc_t>(d1.v[j]) * static_cast<acc_t>(x1.v[j]);
        rs1 += v * cw[j];
        cacc[j] += v * w1;
      }
    }
    if (ok2) {
      const acc_t w2 = roww[int64_t(t.n) * G.R + r2];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t v = static_cast<acc_t>(d2.v[j]) * static_cast<acc_t>(x2.v[j]);
        rs2 += v * cw[j];
        cacc[j] += v * w2;
      }
    }
    rs1 = group_sum(rs1, G.lpr);
    rs2 = group_sum(rs2, G.lpr);
    if (t.li == 0) {
      if (r1 < t.r_end) rowpart[(int64_t(t.cg) * N + t.n) * G.R + r1] = rs1;
      if (r2 < t.r_end) rowpart[(int64_t(t.cg) * N + t.n) * G.R + r2] = rs2;
    }
  }
  write_col_sums<acc_t, VEC>(cacc, t, G, N, s_col, colpart);
}

// ---------------------------------------------------------------- backward: dL/dg through the spatial pool
// v = x * (wa[p] + [x at the max over c at p] * em[p]), summed over p for each c.
// NCHW (rows c, columns p): row sums -> part[(cg*N + n)*C + c]; channels_last (rows p, columns c):
// column sums -> part[(s*N + n)*C + c]. FIRST: "at the max" is sel_s[p] == c; split ties: the
// recomputed x*g[c] equals the pooled max ms[p] (bit for bit, as the forward compared it).
template <typename scalar_t, typename acc_t, int VEC, bool CL, bool FIRST>
__global__ void __launch_bounds__(kThreads, 2) gate_reduce_kernel(const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ g,
                                                               const acc_t* __restrict__ wa,
                                                               const acc_t* __restrict__ em,
                                                               const acc_t* __restrict__ ms,  // [N][2P] + P
                                                               const int32_t* __restrict__ sels, Geo G,
                                                               acc_t* __restrict__ part) {
  __shared__ acc_t s_col[kWarps][32 * VEC];
  const TileIdx t = tile_idx<VEC>(G);
  const int N = gridDim.z;
  const int C = CL ? G.L : G.R, P = CL ? G.R : G.L;
  const int64_t base = int64_t(t.n) * G.R * G.L + t.l0;
  // per-column data: NCHW p-indexed (wa, em, sel_s or ms); channels_last c-indexed (g, split only)
  acc_t cwa[VEC], cem[VEC], cms[VEC], cg[VEC], cacc[VEC];
  int32_t csel[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    cwa[j] = cem[j] = cms[j] = cg[j] = cacc[j] = acc_t(0);
    csel[j] = -1;
  }
  if (t.col_ok) {
    if (!CL) {
      const int64_t o = int64_t(t.n) * P + t.l0;
      const Vec<acc_t, VEC> a = ldv<VEC>(wa + o), e = ldv<VEC>(em + o);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cwa[j] = a.v[j];
        cem[j] = e.v[j];
      }
      if (FIRST) {
        const Vec<int32_t, VEC> sv = ldv<VEC>(sels + o);
#pragma unroll
        for (int j = 0; j < VEC; ++j) csel[j] = sv.v[j];
      } else {
        const Vec<acc_t, VEC> mv = ldv<VEC>(ms + int64_t(t.n) * 2 * P + t.l0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) cms[j] = mv.v[j];
      }
    } else if (!FIRST) {
      const Vec<acc_t, VEC> gv = ldv<VEC>(g + int64_t(t.n) * C + t.l0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) cg[j] = gv.v[j];
    }
  }
  for (int m = 0; t.r_begin + m * t.rstep < t.r_end; m += 2) {
    const int rr[2] = {t.r_begin + m * t.rstep + t.rsub, t.r_begin + (m + 1) * t.rstep + t.rsub};
    Vec<scalar_t, VEC> xv[2];
    bool ok[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      ok[u] = t.col_ok && rr[u] < t.r_end;
      if (ok[u]) xv[u] = ldv<VEC>(x + base + int64_t(rr[u]) * G.L);
    }
    acc_t rs[2] = {acc_t(0), acc_t(0)};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!ok[u]) continue;
      const int r = rr[u];
      if (!CL) {  // row r = channel c; columns p
        const acc_t gr = FIRST ? acc_t(0) : g[int64_t(t.n) * C + r];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t xx = static_cast<acc_t>(xv[u].v[j]);
          const bool at = FIRST ? (csel[j] == r) : (xx * gr == cms[j]);
          rs[u] += cbam_gate_term<acc_t>(xx, cwa[j], at, cem[j]);
        }
      } else {  // row r = pixel p; columns c
        const int64_t np = int64_t(t.n) * P + r;
        const acc_t rwa = wa[np], rem = em[np];
        const int32_t rsel = FIRST ? sels[np] : 0;
        const acc_t rms = FIRST ? acc_t(0) : ms[int64_t(t.n) * 2 * P + r];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t xx = static_cast<acc_t>(xv[u].v[j]);
          const bool at = FIRST ? (rsel == t.l0 + j) : (xx * cg[j] == rms);
          cacc[j] += cbam_gate_term<acc_t>(xx, rwa, at, rem);
        }
      }
    }
    if (!CL) {
      const acc_t s0 = group_sum(rs[0], G.lpr), s1 = group_sum(rs[1], G.lpr);
      if (t.li == 0) {
        if (rr[0] < t.r_end) part[(int64_t(t.cg) * N + t.n) * C + rr[0]] = s0;
        if (rr[1] < t.r_end) part[(int64_t(t.cg) * N + t.n) * C + rr[1]] = s1;
      }
    }
  }
  if (CL) write_col_sums<acc_t, VEC>(cacc, t, G, N, s_col, part);
}

// ---------------------------------------------------------------- backward: grad x
// dx = cbam_dx(dout, s[p], g[c], wa[p], at_max_c(c,p), em[p], a2[c], at_max_p(c,p), e2[c]).
// NCHW: per-column (p) data s, wa, em, sel_s|ms and per-row (c) data g, a2, e2, sel_c|mc;
// channels_last the other way round.
template <typename acc_t>
struct DxArgs {
  const acc_t* g;   // [N, C]
  const acc_t* s;   // [N, P]
  const acc_t* wa;  // [N, P]
  const acc_t* em;  // [N, P]
  const acc_t* ms;  // spatial max: ms[n * 2P + p] (split ties)
  const int32_t* sels;
  const acc_t* a2;  // [N, C]
  const acc_t* e2;
  const acc_t* mc;  // channel max: mc[n * C + c] (split ties)
  const int32_t* selc;
};

template <typename scalar_t, typename acc_t, int VEC, bool CL, bool FIRST>
__global__ void __launch_bounds__(kThreads, 2) input_kernel(const scalar_t* __restrict__ dout,
                                                         const scalar_t* __restrict__ x, DxArgs<acc_t> A, Geo G,
                                                         scalar_t* __restrict__ dx) {
  const TileIdx t = tile_idx<VEC>(G);
  if (!t.col_ok) return;  // no shuffles below
  const int C = CL ? G.L : G.R, P = CL ? G.R : G.L;
  const int64_t base = int64_t(t.n) * G.R * G.L + t.l0;
  // column data: NCHW the p-indexed arrays, channels_last the c-indexed ones
  acc_t c0[VEC], c1[VEC], c2[VEC], cm[VEC];  // NCHW: s, wa, em, ms; CL: g, a2, e2, mc
  int32_t cs[VEC];                            // NCHW: sel_s; CL: sel_c
  {
    const int64_t o = int64_t(t.n) * G.L + t.l0;
    const Vec<acc_t, VEC> v0 = ldv<VEC>((CL ? A.g : A.s) + o), v1 = ldv<VEC>((CL ? A.a2 : A.wa) + o),
                          v2 = ldv<VEC>((CL ? A.e2 : A.em) + o);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      c0[j] = v0.v[j];
      c1[j] = v1.v[j];
      c2[j] = v2.v[j];
      cm[j] = acc_t(0);
      cs[j] = -1;
    }
    if (FIRST) {
      const Vec<int32_t, VEC> sv = ldv<VEC>((CL ? A.selc : A.sels) + o);
#pragma unroll
      for (int j = 0; j < VEC; ++j) cs[j] = sv.v[j];
    } else {
      const Vec<acc_t, VEC> mv = ldv<VEC>(CL ? A.mc + o : A.ms + int64_t(t.n) * 2 * P + t.l0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) cm[j] = mv.v[j];
    }
  }
  for (int m = 0; t.r_begin + m * t.rstep < t.r_end; m += 2) {
    const int rr[2] = {t.r_begin + m * t.rstep + t.rsub, t.r_begin + (m + 1) * t.rstep + t.rsub};
    Vec<scalar_t, VEC> dv[2], xv[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (rr[u] >= t.r_end) continue;
      dv[u] = ldv<VEC>(dout + base + int64_t(rr[u]) * G.L);
      if (!FIRST) xv[u] = ldv<VEC>(x + base + int64_t(rr[u]) * G.L);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int r = rr[u];
      if (r >= t.r_end) continue;
      // row data: NCHW the c-indexed arrays at c = r, channels_last the p-indexed ones at p = r
      const int64_t ro = int64_t(t.n) * (CL ? P : C) + r;
      const acc_t r0 = (CL ? A.s : A.g)[ro], r1 = (CL ? A.wa : A.a2)[ro], r2 = (CL ? A.em : A.e2)[ro];
      const int32_t rsel = FIRST ? (CL ? A.sels : A.selc)[ro] : 0;
      const acc_t rm = FIRST ? acc_t(0) : (CL ? A.ms[int64_t(t.n) * 2 * P + r] : A.mc[ro]);
      Vec<scalar_t, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = static_cast<acc_t>(dv[u].v[j]);
        const acc_t xx = FIRST ? acc_t(0) : static_cast<acc_t>(xv[u].v[j]);
        const int col = t.l0 + j;
        acc_t res;
        if (!CL) {  // c = r, p = col
          const bool ats = FIRST ? (cs[j] == r) : (xx * r0 == cm[j]);
          const bool atc = FIRST ? (rsel == col) : (xx == rm);
          res = cbam_dx<acc_t>(d, c0[j], r0, c1[j], ats, c2[j], r1, atc, r2);
        } else {  // p = r, c = col
          const bool ats = FIRST ? (rsel == col) : (xx * c0[j] == rm);
          const bool atc = FIRST ? (cs[j] == r) : (xx == cm[j]);
          res = cbam_dx<acc_t>(d, r0, c0[j], r1, ats, r2, c1[j], atc, c2[j]);
        }
        o.v[j] = static_cast<scalar_t>(res);
      }
      stv<VEC>(dx + base + int64_t(r) * G.L, o);
    }
  }
}

// ---------------------------------------------------------------- forward: out = (x*g)*s
template <typename scalar_t, typename acc_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, 2) apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ g,
                                                         const acc_t* __restrict__ s, Geo G,
                                                         scalar_t* __restrict__ out) {
  const TileIdx t = tile_idx<VEC>(G);
  if (!t.col_ok) return;
  const int64_t base = int64_t(t.n) * G.R * G.L + t.l0;
  // NCHW: columns p (s), rows c (g); channels_last: columns c (g), rows p (s)
  const acc_t* colv = CL ? g : s;
  const acc_t* rowv = CL ? s : g;
  acc_t cv[VEC];
  {
    const Vec<acc_t, VEC> v = ldv<VEC>(colv + int64_t(t.n) * G.L + t.l0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) cv[j] = v.v[j];
  }
  for (int m = 0; t.r_begin + m * t.rstep < t.r_end; m += 2) {
    const int rr[2] = {t.r_begin + m * t.rstep + t.rsub, t.r_begin + (m + 1) * t.rstep + t.rsub};
    Vec<scalar_t, VEC> xv[2];
#pragma unroll
    for (int u = 0; u < 2; ++u)
      if (rr[u] < t.r_end) xv[u] = ldv<VEC>(x + base + int64_t(rr[u]) * G.L);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (rr[u] >= t.r_end) continue;
      const acc_t rv = rowv[int64_t(t.n) * G.R + rr[u]];
      Vec<scalar_t, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t gc = CL ? cv[j] : rv, sp = CL ? rv : cv[j];
        o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(xv[u].v[j]) * gc) * sp);
      }
      stv<VEC>(out + base + int64_t(rr[u]) * G.L, o);
    }
  }
}

// ---------------------------------------------------------------- forward: the pools
// Where a pool writes: element j (a column, or a row of the row pool) of sample n goes to
// mean[n*os + j], max[n*os + j], sel[n*js + j].
template <typename acc_t>
struct PoolOut {
  acc_t* mean;
  acc_t* max;
  int32_t* sel;
  int64_t os, js;
  acc_t div;  // mean = sum / div
  bool first;
  __device__ __forceinline__ void write(int64_t n, int64_t j, acc_t sum, MaxState<acc_t> st) const {
    st.finish(sum);
    mean[n * os + j] = sum / div;
    max[n * os + j] = st.m;
    sel[n * js + j] = sel_of(st, first);
  }
};

// Pool over the rows of each column (Tile2D), v = x (times roww[n, r] when GATED), max index = r.
// One split (S == 1): writes out; else partials [S][N][L] (sum, max, idx, cnt) for pool_merge.
template <typename scalar_t, typename acc_t, int VEC, bool GATED>
__global__ void __launch_bounds__(kThreads, 2) col_pool_kernel(const scalar_t* __restrict__ x,
                                                            const acc_t* __restrict__ roww, Geo G,
                                                            PoolOut<acc_t> out, acc_t* __restrict__ psum,
                                                            acc_t* __restrict__ pmax, int32_t* __restrict__ pidx,
                                                            int32_t* __restrict__ pcnt) {
  __shared__ acc_t s_sum[kWarps][32 * VEC], s_max[kWarps][32 * VEC];
  __shared__ int32_t s_idx[kWarps][32 * VEC], s_cnt[kWarps][32 * VEC];
  const TileIdx t = tile_idx<VEC>(G);
  const int N = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t base = int64_t(t.n) * G.R * G.L + t.l0;
  MaxState<acc_t> st[VEC];
  acc_t sum[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    st[j].init();
    sum[j] = acc_t(0);
  }
  // each lane sees its rows in increasing order, as MaxState::update needs
  for (int m = 0; t.r_begin + m * t.rstep < t.r_end; m += 2) {
    const int rr[2] = {t.r_begin + m * t.rstep + t.rsub, t.r_begin + (m + 1) * t.rstep + t.rsub};
    Vec<scalar_t, VEC> xv[2];
    acc_t gw[2] = {acc_t(1), acc_t(1)};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!t.col_ok || rr[u] >= t.r_end) continue;
      xv[u] = ldv<VEC>(x + base + int64_t(rr[u]) * G.L);
      if (GATED) gw[u] = roww[int64_t(t.n) * G.R + rr[u]];
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!t.col_ok || rr[u] >= t.r_end) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t v = static_cast<acc_t>(xv[u].v[j]);
        if (GATED) v *= gw[u];
        sum[j] += v;
        st[j].update(v, rr[u]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) across_rows(st[j], sum[j], G.lpr);
  if (lane < G.lpr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int i = t.li * VEC + j;
      s_sum[warp][i] = sum[j];
      s_max[warp][i] = st[j].m;
      s_idx[warp][i] = st[j].idx;
      s_cnt[warp][i] = st[j].cnt;
    }
  }
  __syncthreads();
  const int CG = G.lpr * VEC;
  for (int i = threadIdx.x; i < CG; i += kThreads) {
    const int l = t.cg * CG + i;
    if (l >= G.L) continue;
    MaxState<acc_t> m;
    m.init();
    acc_t sm = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sm += s_sum[w][i];
      m.combine(s_max[w][i], s_idx[w][i], s_cnt[w][i]);
    }
    if (G.S == 1) {
      out.write(t.n, l, sm, m);
    } else {
      const int64_t o = (int64_t(t.s) * N + t.n) * G.L + l;
      psum[o] = sm;
      pmax[o] = m.m;
      pidx[o] = m.idx;
      pcnt[o] = m.cnt;
    }
  }
}

// merges the S partials of col_pool_kernel: one thread per (n, l)
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) pool_merge_kernel(const acc_t* __restrict__ psum,
                                                              const acc_t* __restrict__ pmax,
                                                              const int32_t* __restrict__ pidx,
                                                              const int32_t* __restrict__ pcnt, int S, int N, int L,
                                                              PoolOut<acc_t> out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= int64_t(N) * L) return;
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  for (int s = 0; s < S; ++s) {
    const int64_t o = int64_t(s) * N * L + t;
    sum += psum[o];
    st.combine(pmax[o], pidx[o], pcnt[o]);
  }
  const int64_t n = t / L;
  out.write(n, t - n * L, sum, st);
}

// Pool along rows: a warp per row of `len` contiguous elements (rows = N * rps), v = x (times
// g[n, i] when GATED, i the position in the row), max index = i. Two vectors per lane in flight.
template <typename scalar_t, typename acc_t, int VEC, bool GATED>
__global__ void __launch_bounds__(kThreads, 2) row_pool_kernel(const scalar_t* __restrict__ x,
                                                            const acc_t* __restrict__ g, int64_t rows, int len,
                                                            int rps, PoolOut<acc_t> out) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;  // warp-uniform
  const int64_t n = r / rps;
  const scalar_t* row = x + r * len;
  const acc_t* gr = GATED ? g + n * len : nullptr;
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  constexpr int STEP = 32 * VEC;
  for (int b = lane * VEC; b < len; b += 2 * STEP) {  // lane-local: no shuffles inside
    const bool ok2 = b + STEP < len;
    const Vec<scalar_t, VEC> p1 = ldv<VEC>(row + b);
    Vec<scalar_t, VEC> p2;
    if (ok2) p2 = ldv<VEC>(row + b + STEP);
    Vec<acc_t, VEC> g1, g2;
    if (GATED) {
      g1 = ldv<VEC>(gr + b);
      if (ok2) g2 = ldv<VEC>(gr + b + STEP);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t v = static_cast<acc_t>(p1.v[k]);
      if (GATED) v *= g1.v[k];
      sum += v;
      st.update(v, b + k);
    }
    if (ok2) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t v = static_cast<acc_t>(p2.v[k]);
        if (GATED) v *= g2.v[k];
        sum += v;
        st.update(v, b + STEP + k);
      }
    }
  }
  for (int m = 16; m > 0; m >>= 1) {
    sum += shfl_xor(sum, m);
    const acc_t om = shfl_xor(st.m, m);
    const int32_t oi = shfl_xor(st.idx, m);
    const int32_t oc = shfl_xor(st.cnt, m);
    st.combine(om, oi, oc);
  }
  if (lane == 0) out.write(n, r - n * rps, sum, st);
}

// ---------------------------------------------------------------- forward: the MLP of the channel gate
// Weights in wt_t as stored (float/half/bfloat16 with a float accumulator, double with double),
// contiguous: w1 [Cr][C], w2 [C][Cr]. A group of G lanes (a power of 2 <= 32) computes one output.

// h[n][j] = w1[j] . pc[0][n] + b1[j] and h[N+n][j] = w1[j] . pc[1][n] + b1[j] (pc: [2][N][C])
template <typename acc_t, typename wt_t>
__global__ void __launch_bounds__(kThreads) mlp_hidden_kernel(const acc_t* __restrict__ pc,
                                                              const wt_t* __restrict__ w1,
                                                              const wt_t* __restrict__ b1, int N, int C, int Cr,
                                                              int G, acc_t* __restrict__ h) {
  const int64_t o = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;  // output (n, j)
  const int gl = threadIdx.x % G;
  const bool ok = o < int64_t(N) * Cr;
  const int n = ok ? static_cast<int>(o / Cr) : 0, j = ok ? static_cast<int>(o % Cr) : 0;
  const acc_t* va = pc + int64_t(n) * C;
  const acc_t* vm = pc + int64_t(N + n) * C;
  const wt_t* wr = w1 + int64_t(j) * C;
  acc_t ha = 0, hm = 0;
  if (ok) {
#pragma unroll 4
    for (int c = gl; c < C; c += G) {
      const acc_t w = static_cast<acc_t>(wr[c]);
      ha += w * va[c];
      hm += w * vm[c];
    }
  }
  ha = group_sum(ha, G);
  hm = group_sum(hm, G);
  if (ok && gl == 0) {
    const acc_t b = b1 != nullptr ? static_cast<acc_t>(b1[j]) : acc_t(0);
    h[int64_t(n) * Cr + j] = ha + b;
    h[int64_t(N + n) * Cr + j] = hm + b;
  }
}

// g[n][c] = sigmoid(w2[c] . (relu(h[n]) + relu(h[N+n])) + 2 b2[c])  (MLP(mean) + MLP(max))
template <typename acc_t, typename wt_t>
__global__ void __launch_bounds__(kThreads) mlp_out_kernel(const acc_t* __restrict__ h, const wt_t* __restrict__ w2,
                                                           const wt_t* __restrict__ b2, int N, int C, int Cr, int G,
                                                           acc_t* __restrict__ g) {
  const int64_t o = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;  // output (n, c)
  const int gl = threadIdx.x % G;
  const bool ok = o < int64_t(N) * C;
  const int n = ok ? static_cast<int>(o / C) : 0, c = ok ? static_cast<int>(o % C) : 0;
  const acc_t* ha = h + int64_t(n) * Cr;
  const acc_t* hm = h + int64_t(N + n) * Cr;
  const wt_t* wr = w2 + int64_t(c) * Cr;
  acc_t z = 0;
  if (ok) {
#pragma unroll 4
    for (int j = gl; j < Cr; j += G) z += static_cast<acc_t>(wr[j]) * (relu_of(ha[j]) + relu_of(hm[j]));
  }
  z = group_sum(z, G);
  if (ok && gl == 0) {
    if (b2 != nullptr) z += acc_t(2) * static_cast<acc_t>(b2[c]);
    g[o] = sigmoid_of(z);
  }
}

// ---------------------------------------------------------------- the spatial gate
// BN modes: none; eval (running statistics from bn_mean/bn_var); train (statistics of the batch,
// computed by the BN kernels after the conv).
enum : int { kBnNone = 0, kBnEval = 1, kBnTrain = 2 };

struct BnArgs {
  int mode;
  AnyIn mean, var, weight, bias;  // eval: running statistics; weight / bias may be absent
  double eps;
};

template <typename acc_t>
__device__ __forceinline__ acc_t bn_eval(acc_t y, const BnArgs& bn) {
  y = (y - load_any<acc_t>(bn.mean, 0)) * (acc_t(1) / sqrt(load_any<acc_t>(bn.var, 0) + static_cast<acc_t>(bn.eps)));
  if (bn.weight.p) y *= load_any<acc_t>(bn.weight, 0);
  if (bn.bias.p) y += load_any<acc_t>(bn.bias, 0);
  return y;
}

// the conv weight in [mean, max] channel order into shared memory (cw is in the module's order)
template <typename acc_t>
__device__ __forceinline__ void load_conv_weight(acc_t* sw, AnyIn cw, bool mean_first, int k) {
  const int kk = k * k;
  for (int i = threadIdx.x; i < 2 * kk; i += blockDim.x) {
    const int ci = i / kk, rest = i - ci * kk;
    sw[i] = load_any<acc_t>(cw, int64_t(mean_first ? ci : 1 - ci) * kk + rest);
  }
}

// The padding between the regions of saved / saved_idx (cbam_saved.h), zeroed by one block.
template <typename acc_t>
struct SavedGaps {
  acc_t* sv;
  int32_t* si;
  int64_t begin[6], end[6];  // saved [begin, end) per gap
  int64_t ibegin, iend;      // saved_idx
  __device__ __forceinline__ void zero() const {
    for (int r = 0; r < 6; ++r)
      for (int64_t i = begin[r] + threadIdx.x; i < end[r]; i += blockDim.x) sv[i] = acc_t(0);
    for (int64_t i = ibegin + threadIdx.x; i < iend; i += blockDim.x) si[i] = 0;
  }
};

// co[n][p] = cb + conv_kxk(ps[n])[p] (zero padding k/2); s[n][p] = sigmoid(BN(co)) unless the BN
// trains (then bn_train_forward_kernel makes s); in eval mode stats = the running mean and
// variance. Block (0, 0) also zeroes the saved buffers' padding. Block: a 16 x 16 tile of one sample, its input
// patch (with a k/2 halo) in shared memory. ps: [N][2][P] (mean, max).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) conv_forward_kernel(const acc_t* __restrict__ ps, AnyIn cw,
                                                                bool mean_first, AnyIn cb, BnArgs bn, int H, int W,
                                                                int k, acc_t* __restrict__ co,
                                                                acc_t* __restrict__ s,
                                                                acc_t* __restrict__ stats, SavedGaps<acc_t> gaps) {
  CBAM_DYNAMIC_SMEM(smem_raw);
  acc_t* sw = reinterpret_cast<acc_t*>(smem_raw);  // [2][k][k]
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    gaps.zero();
    if (bn.mode == kBnEval && threadIdx.x == 0) {
      stats[0] = load_any<acc_t>(bn.mean, 0);  // what the BN normalized with, for the backward
      stats[1] = load_any<acc_t>(bn.var, 0);
    }
  }
  const int rad = k / 2, TH = kTile + 2 * rad, TW = kTile + 2 * rad, P = H * W;
  acc_t* sp = sw + 2 * k * k;  // [2][TH][TW]
  const int tiles_w = (W + kTile - 1) / kTile;
  const int h0 = (blockIdx.x / tiles_w) * kTile, w0 = (blockIdx.x % tiles_w) * kTile;
  const int n = blockIdx.y;
  load_conv_weight(sw, cw, mean_first, k);
  for (int i = threadIdx.x; i < 2 * TH * TW; i += kThreads) {
    const int ci = i / (TH * TW), rem = i - ci * TH * TW, y = rem / TW, xx = rem - y * TW;
    const int gh = h0 - rad + y, gw = w0 - rad + xx;
    sp[i] = (gh >= 0 && gh < H && gw >= 0 && gw < W) ? ps[(int64_t(n) * 2 + ci) * P + gh * W + gw] : acc_t(0);
  }
  __syncthreads();
  const int ty = threadIdx.x / kTile, tx = threadIdx.x % kTile, hh = h0 + ty, ww = w0 + tx;
  if (hh >= H || ww >= W) return;
  acc_t y = cb.p ? load_any<acc_t>(cb, 0) : acc_t(0);
  for (int ci = 0; ci < 2; ++ci)
    for (int kh = 0; kh < k; ++kh) {
      const acc_t* prow = sp + (ci * TH + ty + kh) * TW + tx;
      const acc_t* wrow = sw + (ci * k + kh) * k;
      for (int kw = 0; kw < k; ++kw) y += wrow[kw] * prow[kw];
    }
  const int64_t np = int64_t(n) * P + hh * W + ww;
  co[np] = y;
  if (bn.mode != kBnTrain) s[np] = sigmoid_of(bn.mode == kBnEval ? bn_eval(y, bn) : y);
}

// Training-mode BN of the conv output, one block (its statistics span the batch): mean and biased
// variance of co over N*P (two passes, double sums) into stats[0..1], s = sigmoid(BN(co)).
template <typename acc_t>
__global__ void __launch_bounds__(kBig) bn_train_forward_kernel(const acc_t* __restrict__ co, int64_t M, BnArgs bn,
                                                                acc_t* __restrict__ stats, acc_t* __restrict__ s) {
  __shared__ double red[32];
  double a = 0;
  for (int64_t i = threadIdx.x; i < M; i += kBig) a += static_cast<double>(co[i]);
  const double mean = block_sum(a, red) / static_cast<double>(M);
  double q = 0;
  for (int64_t i = threadIdx.x; i < M; i += kBig) {
    const double d = static_cast<double>(co[i]) - mean;
    q += d * d;
  }
  const double var = block_sum(q, red) / static_cast<double>(M);
  const acc_t m = static_cast<acc_t>(mean), v = static_cast<acc_t>(var);
  if (threadIdx.x == 0) {
    stats[0] = m;
    stats[1] = v;
  }
  const acc_t invstd = acc_t(1) / sqrt(v + static_cast<acc_t>(bn.eps));
  const acc_t bw = bn.weight.p ? load_any<acc_t>(bn.weight, 0) : acc_t(1);
  const acc_t bb = bn.bias.p ? load_any<acc_t>(bn.bias, 0) : acc_t(0);
  for (int64_t i = threadIdx.x; i < M; i += kBig) {
    acc_t y = (co[i] - m) * invstd;
    if (bn.weight.p) y *= bw;
    if (bn.bias.p) y += bb;
    s[i] = sigmoid_of(y);
  }
}

// ---------------------------------------------------------------- backward: the spatial gate
// Training-mode BN backward, one block: ds (the sum of nds slots [slot][N*P]) -> dy_pre =
// ds*s*(1-s); d_bn_bias = sum dy_pre, d_bn_weight = sum dy_pre*xhat; dy = invstd*w*(dy_pre -
// mean(dy_pre) - xhat*mean(dy_pre*xhat)) into dy (the conv's input gradient).
template <typename acc_t>
__global__ void __launch_bounds__(kBig) bn_train_backward_kernel(const acc_t* __restrict__ dsb, int nds, int64_t M,
                                                                 const acc_t* __restrict__ s,
                                                                 const acc_t* __restrict__ co,
                                                                 const acc_t* __restrict__ stats, AnyIn bn_weight,
                                                                 double eps, AnyOut d_weight, AnyOut d_bias,
                                                                 acc_t* __restrict__ dy) {
  __shared__ double red[32];
  const acc_t mean = stats[0], invstd = acc_t(1) / sqrt(stats[1] + static_cast<acc_t>(eps));
  double s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < M; i += kBig) {
    acc_t d = 0;
    for (int k = 0; k < nds; ++k) d += dsb[k * M + i];
    const acc_t sv = s[i];
    const acc_t dp = d * sv * (acc_t(1) - sv);
    dy[i] = dp;
    s1 += static_cast<double>(dp);
    s2 += static_cast<double>(dp * ((co[i] - mean) * invstd));
  }
  s1 = block_sum(s1, red);
  s2 = block_sum(s2, red);
  if (threadIdx.x == 0) {
    if (d_bias.p) store_any<acc_t>(d_bias, 0, static_cast<acc_t>(s1));
    if (d_weight.p) store_any<acc_t>(d_weight, 0, static_cast<acc_t>(s2));
  }
  const acc_t scale = bn_weight.p ? invstd * load_any<acc_t>(bn_weight, 0) : invstd;
  const acc_t m1 = static_cast<acc_t>(s1 / static_cast<double>(M)), m2 = static_cast<acc_t>(s2 / static_cast<double>(M));
  for (int64_t i = threadIdx.x; i < M; i += kBig) {  // the same i as above: this thread's own writes
    const acc_t xhat = (co[i] - mean) * invstd;
    dy[i] = scale * (dy[i] - m1 - xhat * m2);
  }
}

// The conv's backward for one 16 x 16 tile of one sample:
//   dy: RAW: read from dyb; else dy_pre = ds*s*(1-s) (ds: the sum of nds slots [slot][N*P]) times
//       kscale (BN eval: weight*invstd, else 1);
//   wa = dps[mean]/C, em = dps[max] (/ sel_s, the tie count, for split ties);
//   part[blk][0 .. 2k^2) = this tile's share of dW (mean-first order), then sum dy (conv bias),
//   sum dy_pre and sum dy_pre*xhat (BN eval's bias and weight). blk = n * tiles + tile.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) conv_backward_kernel(
    const acc_t* __restrict__ dsb, int nds, const acc_t* __restrict__ dyb, const acc_t* __restrict__ s,
    const acc_t* __restrict__ co, const acc_t* __restrict__ stats, AnyIn bn_weight, double eps, int bn_mode,
    const acc_t* __restrict__ ps, AnyIn cw, bool mean_first, const int32_t* __restrict__ sels, bool first, int N,
    int C, int H, int W, int k, acc_t* __restrict__ wa, acc_t* __restrict__ em, acc_t* __restrict__ part) {
  CBAM_DYNAMIC_SMEM(smem_raw);
  const int rad = k / 2, TH = kTile + 2 * rad, TW = kTile + 2 * rad, P = H * W, NW = 2 * k * k;
  const int GR = NW <= kThreads ? kThreads / NW : 1;  // dW: GR thread groups per weight, over rows
  acc_t* sw = reinterpret_cast<acc_t*>(smem_raw);      // [2][k][k]
  acc_t* sdy = sw + NW;                                // [TH][TW]
  acc_t* sp = sdy + TH * TW;                           // [2][TH][TW]
  acc_t* red = sp + 2 * TH * TW;                       // [max(NW * GR, kThreads)]
  __shared__ acc_t red3[3][32];
  const int tiles_w = (W + kTile - 1) / kTile;
  const int h0 = (blockIdx.x / tiles_w) * kTile, w0 = (blockIdx.x % tiles_w) * kTile;
  const int n = blockIdx.y;
  const int64_t M = int64_t(N) * P;
  const bool raw = dyb != nullptr;
  acc_t mean = 0, invstd = 1, kscale = 1;
  if (bn_mode != kBnNone) {
    mean = stats[0];
    invstd = acc_t(1) / sqrt(stats[1] + static_cast<acc_t>(eps));
    kscale = bn_weight.p ? invstd * load_any<acc_t>(bn_weight, 0) : invstd;
  }
  load_conv_weight(sw, cw, mean_first, k);
  acc_t e0 = 0, e1 = 0, e2 = 0;  // this thread's share of the tile's sums
  for (int i = threadIdx.x; i < TH * TW; i += kThreads) {
    const int y = i / TW, xx = i - y * TW, gh = h0 - rad + y, gw = w0 - rad + xx;
    acc_t d = 0;
    if (gh >= 0 && gh < H && gw >= 0 && gw < W) {
      const int64_t np = int64_t(n) * P + gh * W + gw;
      const bool inner = y >= rad && y < rad + kTile && xx >= rad && xx < rad + kTile;
      if (raw) {
        d = dyb[np];
        if (inner) e0 += d;
      } else {
        acc_t ds = 0;
#pragma unroll 4
        for (int q = 0; q < nds; ++q) ds += dsb[q * M + np];
        const acc_t sv = s[np];
        const acc_t dp = ds * sv * (acc_t(1) - sv);
        d = dp * kscale;
        if (inner) {
          e0 += d;
          e1 += dp;
          if (bn_mode != kBnNone) e2 += dp * ((co[np] - mean) * invstd);
        }
      }
    }
    sdy[i] = d;
  }
  for (int i = threadIdx.x; i < 2 * TH * TW; i += kThreads) {
    const int ci = i / (TH * TW), rem = i - ci * TH * TW, y = rem / TW, xx = rem - y * TW;
    const int gh = h0 - rad + y, gw = w0 - rad + xx;
    sp[i] = (gh >= 0 && gh < H && gw >= 0 && gw < W) ? ps[(int64_t(n) * 2 + ci) * P + gh * W + gw] : acc_t(0);
  }
  __syncthreads();
  // d ps at this thread's pixel: dps[ci][q] = sum_{kh,kw} w[ci][kh][kw] * dy[q - (kh - r, kw - r)]
  const int ty = threadIdx.x / kTile, tx = threadIdx.x % kTile, hh = h0 + ty, ww = w0 + tx;
  if (hh < H && ww < W) {
    acc_t d0 = 0, d1 = 0;
    for (int kh = 0; kh < k; ++kh) {
      const acc_t* drow = sdy + (ty + 2 * rad - kh) * TW + tx + 2 * rad;
      const acc_t* w0r = sw + kh * k;
      const acc_t* w1r = sw + (k + kh) * k;
      for (int kw = 0; kw < k; ++kw) {
        const acc_t d = drow[-kw];
        d0 += w0r[kw] * d;
        d1 += w1r[kw] * d;
      }
    }
    const int64_t np = int64_t(n) * P + hh * W + ww;
    wa[np] = d0 / static_cast<acc_t>(C);
    em[np] = first ? d1 : d1 / static_cast<acc_t>(sels[np]);
  }
  // dW share: weight (ci, kh, kw) = sum over the tile's pixels p of dy[p] * ps[ci][p + (kh - r, kw - r)]
  const int th = min(kTile, H - h0), tw = min(kTile, W - w0);
  for (int idx = threadIdx.x; idx < NW * GR; idx += kThreads) {
    const int wi = idx % NW, gi = idx / NW;
    const int ci = wi / (k * k), kh = (wi / k) % k, kw = wi % k;
    acc_t a = 0;
    for (int y = gi; y < th; y += GR) {
      const acc_t* drow = sdy + (y + rad) * TW + rad;
      const acc_t* prow = sp + (ci * TH + y + kh) * TW + kw;
      for (int xx = 0; xx < tw; ++xx) a += drow[xx] * prow[xx];
    }
    red[idx] = a;
  }
  // the three sums over the block
  e0 = group_sum(e0, 32);
  e1 = group_sum(e1, 32);
  e2 = group_sum(e2, 32);
  if ((threadIdx.x & 31) == 0) {
    red3[0][threadIdx.x >> 5] = e0;
    red3[1][threadIdx.x >> 5] = e1;
    red3[2][threadIdx.x >> 5] = e2;
  }
  __syncthreads();
  const int64_t blk = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  acc_t* out = part + blk * (NW + 3);
  for (int wi = threadIdx.x; wi < NW; wi += kThreads) {
    acc_t a = 0;
    for (int gi = 0; gi < GR; ++gi) a += red[gi * NW + wi];
    out[wi] = a;
  }
  if (threadIdx.x < 3) {
    acc_t a = 0;
    for (int w = 0; w < kWarps; ++w) a += red3[threadIdx.x][w];
    out[NW + threadIdx.x] = a;
  }
}

// ---------------------------------------------------------------- backward: the channel gate's MLP
// One launch, two kinds of blocks (kThreads each):
//   [0, nb_dz): dz[n][c] = (sum of the ndg slots of dL/dg)[n][c] * g*(1-g), one thread each;
//   [nb_dz, nb_dz + NW + 3): the conv's finalize: column t of part summed over nblk tiles, written
//     as dW (module order, cw's dtype), the conv bias's, or (BN eval) the BN bias's / weight's grad.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) dz_finalize_kernel(
    const acc_t* __restrict__ dgb, int ndg, const acc_t* __restrict__ g, int N, int C, int nb_dz,
    acc_t* __restrict__ dz, const acc_t* __restrict__ part, int nblk, int k, bool mean_first, AnyOut dcw,
    AnyOut dcb, AnyOut dbn_bias, AnyOut dbn_weight) {
  if (int(blockIdx.x) < nb_dz) {
    const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    const int64_t NC = int64_t(N) * C;
    if (i >= NC) return;
    acc_t d = 0;
#pragma unroll 4
    for (int q = 0; q < ndg; ++q) d += dgb[q * NC + i];
    const acc_t gv = g[i];
    dz[i] = d * gv * (acc_t(1) - gv);
    return;
  }
  __shared__ acc_t red[32];
  const int NW = 2 * k * k, t = blockIdx.x - nb_dz;
  acc_t a = 0;
  for (int b = threadIdx.x; b < nblk; b += kThreads) a += part[int64_t(b) * (NW + 3) + t];
  a = block_sum(a, red);
  if (threadIdx.x != 0) return;
  if (t < NW) {
    const int kk = k * k, ci = t / kk, rest = t - ci * kk;
    store_any<acc_t>(dcw, int64_t(mean_first ? ci : 1 - ci) * kk + rest, a);
  } else if (t == NW) {
    if (dcb.p) store_any<acc_t>(dcb, 0, a);
  } else if (t == NW + 1) {
    if (dbn_bias.p) store_any<acc_t>(dbn_bias, 0, a);
  } else {
    if (dbn_weight.p) store_any<acc_t>(dbn_weight, 0, a);
  }
}

// kBig threads per block, two kinds of blocks:
//   [0, nb_w2): dW2[c][j] = sum_n dz[n][c] * (relu(h[n][j]) + relu(h[N+n][j])), a thread per (c, j);
//     the j == 0 thread also writes db2[c] = 2 sum_n dz[n][c];
//   then N * ceil(Cr/32) blocks, one per (n, 32 hidden units): dr[n][j] = sum_c dz[n][c] * w2[c][j]
//     (32 warps split c, lanes take j), then dh[n][j] = dr * [h[n][j] > 0], dh[N+n][j] = dr * [h[N+n][j] > 0].
template <typename acc_t, typename wt_t>
__global__ void __launch_bounds__(kBig) mlp_bwd_a_kernel(const acc_t* __restrict__ dz, const acc_t* __restrict__ h,
                                                         const wt_t* __restrict__ w2, int N, int C, int Cr,
                                                         int nb_w2, AnyOut dw2, AnyOut db2,
                                                         acc_t* __restrict__ dh) {
  if (int(blockIdx.x) < nb_w2) {
    const int64_t i = int64_t(blockIdx.x) * kBig + threadIdx.x;
    if (i >= int64_t(C) * Cr) return;
    const int c = static_cast<int>(i / Cr), j = static_cast<int>(i % Cr);
    acc_t a = 0, sz = 0;
    for (int n = 0; n < N; ++n) {
      const acc_t d = dz[int64_t(n) * C + c];
      a += d * (relu_of(h[int64_t(n) * Cr + j]) + relu_of(h[int64_t(N + n) * Cr + j]));
      sz += d;
    }
    store_any<acc_t>(dw2, i, a);
    if (j == 0 && db2.p) store_any<acc_t>(db2, c, acc_t(2) * sz);
    return;
  }
  __shared__ acc_t red[32][33];
  const int b = blockIdx.x - nb_w2, njc = (Cr + 31) / 32;
  const int n = b / njc, j0 = (b % njc) * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = j0 + lane;
  acc_t a = 0;
  if (j < Cr) {
    const acc_t* dzn = dz + int64_t(n) * C;
#pragma unroll 4
    for (int c = warp; c < C; c += 32) a += dzn[c] * static_cast<acc_t>(w2[int64_t(c) * Cr + j]);
  }
  red[warp][lane] = a;
  __syncthreads();
  if (warp == 0 && j < Cr) {
    acc_t dr = 0;
    for (int w = 0; w < 32; ++w) dr += red[w][lane];
    const acc_t ha = h[int64_t(n) * Cr + j], hm = h[int64_t(N + n) * Cr + j];
    dh[int64_t(n) * Cr + j] = ha > acc_t(0) ? dr : acc_t(0);
    dh[int64_t(N + n) * Cr + j] = hm > acc_t(0) ? dr : acc_t(0);
  }
}

// kThreads per block, two kinds of blocks:
//   [0, nb_w1): dW1[j][c] = sum_{r < 2N} dh[r][j] * pc[r][c], a thread per (j, c); the c == 0 thread
//     also writes db1[j] = sum_r dh[r][j];
//   [nb_w1, nb_w1 + nb_dx): a thread per (n, c): dv = dh[row] . w1[:, c] for the mean row n and the max
//     row N+n -> a2[n][c] = dv_mean / P, e2[n][c] = dv_max (/ sel_c, the tie count, for split ties).
template <typename acc_t, typename wt_t>
__global__ void __launch_bounds__(kThreads) mlp_bwd_b_kernel(const acc_t* __restrict__ dh,
                                                             const acc_t* __restrict__ pc,
                                                             const wt_t* __restrict__ w1,
                                                             const int32_t* __restrict__ selc, bool first, int N,
                                                             int C, int Cr, int P, int nb_w1, AnyOut dw1,
                                                             AnyOut db1, acc_t* __restrict__ a2,
                                                             acc_t* __restrict__ e2) {
  if (int(blockIdx.x) < nb_w1) {
    const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (i >= int64_t(Cr) * C) return;
    const int j = static_cast<int>(i / C), c = static_cast<int>(i % C);
    acc_t a = 0, sb = 0;
#pragma unroll 4
    for (int r = 0; r < 2 * N; ++r) {
      const acc_t d = dh[int64_t(r) * Cr + j];
      a += d * pc[int64_t(r) * C + c];
      sb += d;
    }
    store_any<acc_t>(dw1, i, a);
    if (c == 0 && db1.p) store_any<acc_t>(db1, j, sb);
    return;
  }
  const int64_t i = int64_t(blockIdx.x - nb_w1) * kThreads + threadIdx.x;
  if (i >= int64_t(N) * C) return;
  const int n = static_cast<int>(i / C), c = static_cast<int>(i % C);
  const acc_t* da = dh + int64_t(n) * Cr;
  const acc_t* dm = dh + int64_t(N + n) * Cr;
  acc_t va = 0, vm = 0;
#pragma unroll 4
  for (int j = 0; j < Cr; ++j) {
    const acc_t w = static_cast<acc_t>(w1[int64_t(j) * C + c]);
    va += da[j] * w;
    vm += dm[j] * w;
  }
  a2[i] = va / static_cast<acc_t>(P);
  e2[i] = first ? vm : vm / static_cast<acc_t>(selc[i]);
}

}  // namespace

namespace {

// ---------------------------------------------------------------- host helpers

template <typename scalar_t, typename F>
void with_vec(int v, F&& f) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (v == V) {
    f(std::integral_constant<int, V>{});
    return;
  }
  if constexpr (V >= 8) {
    if (v == V / 2) {
      f(std::integral_constant<int, V / 2>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

template <typename F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// The MLP kernels' weight type: the parameters' own dtype when float/half/bfloat16 (one dtype for
// all four) with a float accumulator, double with a double one; anything else is converted.
template <typename acc_t, typename F>
void with_wt(at::ScalarType wt, F&& f) {
  if constexpr (std::is_same_v<acc_t, double>) {
    f(double{});
  } else {
    switch (wt) {
      case at::kHalf:
        f(at::Half{});
        break;
      case at::kBFloat16:
        f(at::BFloat16{});
        break;
      default:
        f(float{});
        break;
    }
  }
}

struct MlpWeights {
  at::Tensor w1, b1, w2, b2;  // contiguous, one dtype
};

MlpWeights mlp_weights(const OpParams& p, at::ScalarType acc) {
  const auto t = p.w1.scalar_type();
  const bool same = p.w2.scalar_type() == t && (!p.b1.defined() || p.b1.scalar_type() == t) &&
                    (!p.b2.defined() || p.b2.scalar_type() == t);
  at::ScalarType wt = at::kFloat;
  if (acc == at::kDouble)
    wt = at::kDouble;
  else if (same && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16))
    wt = t;
  auto prep = [wt](const at::Tensor& w) {
    if (!w.defined()) return w;
    return (w.scalar_type() == wt ? w : w.to(wt)).contiguous();
  };
  return {prep(p.w1), prep(p.b1), prep(p.w2), prep(p.b2)};
}

// lanes per output of a dot product of length n: a power of 2, at most 32
int lanes_for(int64_t n) {
  int g = 1;
  while (g < 32 && g < n) g *= 2;
  return g;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename acc_t>
size_t conv_forward_smem(int k) {
  const int t = kTile + 2 * (k / 2);
  return size_t(2 * k * k + 2 * t * t) * sizeof(acc_t);
}

template <typename acc_t>
size_t conv_backward_smem(int k) {
  const int t = kTile + 2 * (k / 2), nw = 2 * k * k;
  const int gr = nw <= kThreads ? kThreads / nw : 1;
  return size_t(nw + 3 * t * t + std::max(nw * gr, kThreads)) * sizeof(acc_t);
}

bool aligned64(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 64 == 0; }

// what the kernels here cannot take: the generic orchestration runs those calls
bool supported(const at::Tensor& x, const OpParams& p) {
  const int k = static_cast<int>(p.cw.size(2));
  const size_t smem =
      x.scalar_type() == at::kDouble ? conv_backward_smem<double>(k) : conv_backward_smem<float>(k);
  return x.size(0) <= 65535 && k <= kMaxConvK && smem <= 48 * 1024;
}

BnArgs bn_args(const OpParams& p) {
  BnArgs bn;
  bn.mode = !p.spatial_bn ? kBnNone : (p.bn_training ? kBnTrain : kBnEval);
  bn.mean = p.bn_training ? AnyIn{nullptr, kF32} : any_in(p.rm);
  bn.var = p.bn_training ? AnyIn{nullptr, kF32} : any_in(p.rv);
  bn.weight = any_in(p.bnw);
  bn.bias = any_in(p.bnb);
  bn.eps = p.eps;
  return bn;
}

template <typename scalar_t, typename acc_t, bool GATED>
void launch_row_pool(const scalar_t* x, const acc_t* g, int64_t rows, int64_t len, int64_t rps, PoolOut<acc_t> out,
                     cudaStream_t stream) {
  const int v = pick_vec<scalar_t>(len, {x});
  with_vec<scalar_t>(v, [&](auto vt) {
    constexpr int V = decltype(vt)::value;
    CBAM_LAUNCH(static_cast<unsigned>(cdiv(rows, kWarps)), kThreads, 0, stream, row_pool_kernel<scalar_t, acc_t, V, GATED>)(
        x, g, rows, static_cast<int>(len), static_cast<int>(rps), out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, bool GATED>
void launch_col_pool(const scalar_t* x, const acc_t* roww, int64_t N, int64_t R, int64_t L, PoolOut<acc_t> out,
                     const at::TensorOptions& acc_opts, cudaStream_t stream) {
  const int v = pick_vec<scalar_t>(L, {x});
  const Geo G = make_geo(N, R, L, v);
  acc_t *psum = nullptr, *pmax = nullptr;
  int32_t *pidx = nullptr, *pcnt = nullptr;
  at::Tensor part;  // freed on return: the caching allocator reuses it only for later work on this stream
  const int64_t plane = int64_t(G.S) * N * L;
  if (G.S > 1) {
    part = at::empty({4 * plane}, acc_opts);
    acc_t* b = part.mutable_data_ptr<acc_t>();
    psum = b;
    pmax = b + plane;
    pidx = reinterpret_cast<int32_t*>(b + 2 * plane);
    pcnt = pidx + plane;
  }
  with_vec<scalar_t>(v, [&](auto vt) {
    constexpr int V = decltype(vt)::value;
    CBAM_LAUNCH(geo_grid(G, N), kThreads, 0, stream, col_pool_kernel<scalar_t, acc_t, V, GATED>)(x, roww, G, out, psum, pmax,
                                                                                        pidx, pcnt);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (G.S > 1) {
    CBAM_LAUNCH(static_cast<unsigned>(cdiv(N * L, kThreads)), kThreads, 0, stream, pool_merge_kernel<acc_t>)(
        psum, pmax, pidx, pcnt, G.S, static_cast<int>(N), static_cast<int>(L), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// ---------------------------------------------------------------- entry points

bool forward(const at::Tensor& x, bool cl, const OpParams& p, at::Tensor& out, at::Tensor& saved,
             at::Tensor& saved_idx) {
  if (!supported(x, p)) return false;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W, Cr = p.w1.size(0);
  const int k = static_cast<int>(p.cw.size(2));
  const SavedLayout Ls = SavedLayout::make(N, C, P, Cr, p.spatial_bn);
  const MlpWeights mw = mlp_weights(p, saved.scalar_type());
  const at::Tensor cw = p.cw.contiguous();
  const BnArgs bn = bn_args(p);
  const int64_t R = cl ? P : C, L = cl ? C : P;  // the per-sample matrix, L contiguous
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sv = saved.mutable_data_ptr<acc_t>();
    int32_t* si = saved_idx.mutable_data_ptr<int32_t>();
    acc_t *g = sv + Ls.g, *s = sv + Ls.s, *pc = sv + Ls.pc, *ps = sv + Ls.ps, *co = sv + Ls.co, *h = sv + Ls.h;
    acc_t* stats = sv + Ls.bn;
    int32_t *selc = si + Ls.selc, *sels = si + Ls.sels;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();

    // 1. channel pool: mean and max over p for each (n, c)
    const PoolOut<acc_t> cpo{pc, pc + N * C, selc, C, C, static_cast<acc_t>(P), p.first};
    if (!cl)
      launch_row_pool<scalar_t, acc_t, false>(xp, nullptr, N * C, P, C, cpo, stream);
    else
      launch_col_pool<scalar_t, acc_t, false>(xp, nullptr, N, R, L, cpo, saved.options(), stream);

    // 2. the MLP: h (kept for the backward), then g
    with_wt<acc_t>(mw.w1.scalar_type(), [&](auto tag) {
      using wt_t = decltype(tag);
      const int g1 = lanes_for(C), g2 = lanes_for(Cr);
      CBAM_LAUNCH(static_cast<unsigned>(cdiv(N * Cr * g1, kThreads)), kThreads, 0, stream, mlp_hidden_kernel<acc_t, wt_t>)(
          pc, mw.w1.const_data_ptr<wt_t>(), ptr_or_null<wt_t>(mw.b1), static_cast<int>(N), static_cast<int>(C),
          static_cast<int>(Cr), g1, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      CBAM_LAUNCH(static_cast<unsigned>(cdiv(N * C * g2, kThreads)), kThreads, 0, stream, mlp_out_kernel<acc_t, wt_t>)(
          h, mw.w2.const_data_ptr<wt_t>(), ptr_or_null<wt_t>(mw.b2), static_cast<int>(N), static_cast<int>(C),
          static_cast<int>(Cr), g2, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // 3. spatial pool of x*g: mean and max over c for each (n, p)
    const PoolOut<acc_t> spo{ps, ps + P, sels, 2 * P, P, static_cast<acc_t>(C), p.first};
    if (cl)
      launch_row_pool<scalar_t, acc_t, true>(xp, g, N * P, C, P, spo, stream);
    else
      launch_col_pool<scalar_t, acc_t, true>(xp, g, N, R, L, spo, saved.options(), stream);

    // 4. the spatial gate
    SavedGaps<acc_t> gaps;
    gaps.sv = sv;
    gaps.si = si;
    for (int r = 0; r < 6; ++r) {
      gaps.begin[r] = Ls.used[r];
      gaps.end[r] = Ls.next(r);
    }
    gaps.ibegin = Ls.iused;
    gaps.iend = Ls.sels;
    const unsigned tiles = static_cast<unsigned>(cdiv(H, kTile) * cdiv(W, kTile));
    CBAM_LAUNCH(dim3(tiles, static_cast<unsigned>(N)), kThreads, conv_forward_smem<acc_t>(k),
                                 stream, conv_forward_kernel<acc_t>)(ps, any_in(cw), p.mean_first, any_in(p.cb), bn, static_cast<int>(H),
                                           static_cast<int>(W), k, co, s, stats, gaps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (bn.mode == kBnTrain) {
      CBAM_LAUNCH(1, kBig, 0, stream, bn_train_forward_kernel<acc_t>)(co, N * P, bn, stats, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 5. out = (x*g)*s
    const int v = pick_vec<scalar_t>(L, {xp, op});
    const Geo G = make_geo(N, R, L, v);
    with_vec<scalar_t>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      with_bool(cl, [&](auto cl_tag) {
        CBAM_LAUNCH(geo_grid(G, N), kThreads, 0, stream, apply_kernel<scalar_t, acc_t, V, decltype(cl_tag)::value>)(
            xp, g, s, G, op);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

bool backward(const at::Tensor& dout, const at::Tensor& x, bool cl, const OpParams& p, const at::Tensor& saved,
              const at::Tensor& saved_idx, bool needs_input_grad, std::vector<at::Tensor>& grads) {
  if (!supported(x, p) || !aligned64(saved) || !aligned64(saved_idx)) return false;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W, Cr = p.w1.size(0);
  const int k = static_cast<int>(p.cw.size(2)), NW = 2 * k * k;
  const SavedLayout Ls = SavedLayout::make(N, C, P, Cr, p.spatial_bn);
  const MlpWeights mw = mlp_weights(p, saved.scalar_type());
  const at::Tensor cw = p.cw.contiguous();
  const int64_t R = cl ? P : C, L = cl ? C : P;
  const bool bn_train = p.spatial_bn && p.bn_training, bn_eval = p.spatial_bn && !p.bn_training;

  // the gradients, in the schema's order
  at::Tensor dx = needs_input_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor dw1 = at::empty(p.w1.sizes(), p.w1.options()), dw2 = at::empty(p.w2.sizes(), p.w2.options());
  at::Tensor dcw = at::empty(cw.sizes(), cw.options());
  auto like = [](const at::Tensor& t) { return t.defined() ? at::empty(t.sizes(), t.options()) : at::Tensor(); };
  at::Tensor db1 = like(p.b1), db2 = like(p.b2), dcb = like(p.cb);
  at::Tensor dbnw = p.spatial_bn ? like(p.bnw) : at::Tensor(), dbnb = p.spatial_bn ? like(p.bnb) : at::Tensor();

  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* sv = saved.const_data_ptr<acc_t>();
    const int32_t* si = saved_idx.const_data_ptr<int32_t>();
    const acc_t *g = sv + Ls.g, *s = sv + Ls.s, *pc = sv + Ls.pc, *ps = sv + Ls.ps, *co = sv + Ls.co, *h = sv + Ls.h;
    const acc_t* stats = sv + Ls.bn;
    const int32_t *selc = si + Ls.selc, *sels = si + Ls.sels;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dout.const_data_ptr<scalar_t>();
    scalar_t* dxp = needs_input_grad ? dx.mutable_data_ptr<scalar_t>() : nullptr;

    const int v = pick_vec<scalar_t>(L, {xp, dp, dxp});
    const Geo G = make_geo(N, R, L, v);
    const int Sds = cl ? G.nLc : G.S;  // slots of dL/ds (sums over c)
    const int Sdg = cl ? G.S : G.nLc;  // slots of dL/dg per pass (sums over p)
    const int64_t tiles = cdiv(H, kTile) * cdiv(W, kTile), nblk = N * tiles;

    // scratch, one allocation, every region 64-byte aligned
    int64_t off = 0;
    auto region = [&](int64_t n) {
      const int64_t o = off;
      off = pad16(off + n);
      return o;
    };
    const int64_t o_ds = region(Sds * N * P), o_dg = region(2 * Sdg * N * C), o_cp = region(nblk * (NW + 3));
    const int64_t o_wa = region(N * P), o_em = region(N * P), o_dy = region(bn_train ? N * P : 0);
    const int64_t o_dz = region(N * C), o_dh = region(2 * N * Cr), o_a2 = region(N * C), o_e2 = region(N * C);
    at::Tensor scratch = at::empty({off}, saved.options());
    acc_t* sc = scratch.mutable_data_ptr<acc_t>();
    acc_t *dsb = sc + o_ds, *dgb = sc + o_dg, *cpart = sc + o_cp, *wa = sc + o_wa, *em = sc + o_em;
    acc_t *dyb = bn_train ? sc + o_dy : nullptr, *dz = sc + o_dz, *dh = sc + o_dh, *a2 = sc + o_a2, *e2 = sc + o_e2;

    with_vec<scalar_t>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      // 1. sum_c dout*x*g (dL/ds) and sum_p dout*x*s (dL/dg, direct part), one read of both
      CBAM_LAUNCH(geo_grid(G, N), kThreads, 0, stream, dual_reduce_kernel<scalar_t, acc_t, V>)(
          dp, xp, cl ? g : s, cl ? s : g, G, cl ? dsb : dgb, cl ? dgb : dsb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // 2. the spatial gate: (BN) and the conv's backward -> wa, em and the conv's parameter sums
    BnArgs bn = bn_args(p);
    if (bn_train) {
      CBAM_LAUNCH(1, kBig, 0, stream, bn_train_backward_kernel<acc_t>)(dsb, Sds, N * P, s, co, stats, any_in(p.bnw), p.eps,
                                                               any_out(dbnw), any_out(dbnb), dyb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    CBAM_LAUNCH(dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(N)), kThreads,
                                  conv_backward_smem<acc_t>(k), stream, conv_backward_kernel<acc_t>)(
        dsb, Sds, dyb, s, co, stats, any_in(p.bnw), p.eps, bn.mode, ps, any_in(cw), p.mean_first, sels, p.first,
        static_cast<int>(N), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), k, wa, em, cpart);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 3. dL/dg through the spatial pool: one read of x
    with_vec<scalar_t>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      with_bool(cl, [&](auto cl_tag) {
        with_bool(p.first, [&](auto first_tag) {
          CBAM_LAUNCH(geo_grid(G, N), kThreads, 0, stream, gate_reduce_kernel<scalar_t, acc_t, V, decltype(cl_tag)::value, decltype(first_tag)::value>)(xp, g, wa, em, ps + P, sels, G, dgb + int64_t(Sdg) * N * C);
        });
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 4. dz = dL/dg * g(1-g), with the conv's parameter gradients
    const int64_t nb_dz = cdiv(N * C, kThreads);
    at::Tensor none;
    CBAM_LAUNCH(static_cast<unsigned>(nb_dz + NW + 3), kThreads, 0, stream, dz_finalize_kernel<acc_t>)(
        dgb, 2 * Sdg, g, static_cast<int>(N), static_cast<int>(C), static_cast<int>(nb_dz), dz, cpart,
        static_cast<int>(nblk), k, p.mean_first, any_out(dcw), any_out(dcb), any_out(bn_eval ? dbnb : none),
        any_out(bn_eval ? dbnw : none));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 5. the MLP's backward -> dW2, db2, dh; then dW1, db1 and the pools' gradients a2, e2
    with_wt<acc_t>(mw.w1.scalar_type(), [&](auto tag) {
      using wt_t = decltype(tag);
      const int64_t nb_w2 = cdiv(C * Cr, kBig);
      CBAM_LAUNCH(static_cast<unsigned>(nb_w2 + N * cdiv(Cr, 32)), kBig, 0, stream, mlp_bwd_a_kernel<acc_t, wt_t>)(
          dz, h, mw.w2.const_data_ptr<wt_t>(), static_cast<int>(N), static_cast<int>(C), static_cast<int>(Cr),
          static_cast<int>(nb_w2), any_out(dw2), any_out(db2), dh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t nb_w1 = cdiv(Cr * C, kThreads), nb_dx = needs_input_grad ? cdiv(N * C, kThreads) : 0;
      CBAM_LAUNCH(static_cast<unsigned>(nb_w1 + nb_dx), kThreads, 0, stream, mlp_bwd_b_kernel<acc_t, wt_t>)(
          dh, pc, mw.w1.const_data_ptr<wt_t>(), selc, p.first, static_cast<int>(N), static_cast<int>(C),
          static_cast<int>(Cr), static_cast<int>(P), static_cast<int>(nb_w1), any_out(dw1), any_out(db1), a2, e2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // 6. grad x: one elementwise pass
    if (needs_input_grad) {
      const DxArgs<acc_t> A{g, s, wa, em, ps + P, sels, a2, e2, pc + N * C, selc};
      with_vec<scalar_t>(v, [&](auto vt) {
        constexpr int V = decltype(vt)::value;
        with_bool(cl, [&](auto cl_tag) {
          with_bool(p.first, [&](auto first_tag) {
            CBAM_LAUNCH(geo_grid(G, N), kThreads, 0, stream, input_kernel<scalar_t, acc_t, V, decltype(cl_tag)::value, decltype(first_tag)::value>)(dp, xp, A, G, dxp);
          });
        });
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  grads.clear();
  if (needs_input_grad) grads.push_back(dx);
  grads.push_back(dw1);
  grads.push_back(dw2);
  grads.push_back(dcw);
  for (const at::Tensor* t : {&db1, &db2, &dcb, &dbnw, &dbnb})
    if (t->defined()) grads.push_back(*t);
  return true;
}

}  // namespace cuda
}  // namespace cbam
}  // namespace fastnn
