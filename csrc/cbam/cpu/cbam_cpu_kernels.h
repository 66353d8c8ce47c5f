// CBAM's passes over x on the CPU: the kernel bodies. See cbam_cpu.h for the assumptions and
// cbam_math.h for the math.
//
// This header is compiled once per instruction set, inside namespace FASTNN_CBAM_ISA (baseline
// x86-64 in cbam_cpu.cpp, AVX2+FMA in cbam_cpu_avx2.cpp; the right one is chosen at run time).
// Include it only after every other header, with FASTNN_CBAM_ISA defined.
//
// Layouts: NCHW walks rows x[n, c, :] (contiguous over p); channels_last walks rows x[n, p, :]
// (contiguous over c). Accumulators are in the accumulation type. Inner loops are branch-free over
// a contiguous row and store unconditionally (a select written back to the same array would become
// a slow masked store), so the compiler vectorizes them. Reductions across tasks go through
// per-task partial buffers summed afterwards in a fixed order: results do not depend on the
// thread count.
#ifndef FASTNN_CBAM_ISA
#error "define FASTNN_CBAM_ISA before including cbam_cpu_kernels.h"
#endif

namespace fastnn {
namespace cbam {
namespace cpu {
namespace FASTNN_CBAM_ISA {

constexpr int64_t kBlock = 256;  // pixels (NCHW) or channels (channels_last) per task-local tile
constexpr int kLanes = 16;       // independent running maxima in a row reduction

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// grain for parallel_for over tasks of `len` elements each: about 32K elements per chunk, so small
// inputs run on the calling thread (starting a parallel region costs more than they take)
inline int64_t grain_for(int64_t len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, len)); }

// the same for the small conv's multiply-adds: a chunk of at least 1M of them (~0.1 ms), so the
// maps of ResNet-sized inputs stay on one thread (a parallel region costs more on a busy machine)
inline int64_t conv_grain(int64_t macs_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, macs_per_task));
}

// select without a conditional store: b where take, else a
inline int32_t pick(int32_t a, int32_t b, bool take) { return a ^ ((a ^ b) & -static_cast<int32_t>(take)); }

// mean, max and the max's first index / tie count of one row of values v(0..len-1), in one pass:
// kLanes lanes each keep the first maximum of the elements i = lane (mod kLanes); merging the
// lanes keeps the smallest index among equal maxima (MaxState::combine).
template <typename acc_t, bool FIRST, typename F>
inline void row_pool(int64_t len, F v, acc_t div, acc_t& mean_out, acc_t& max_out, int32_t& sel_out) {
  MaxState<acc_t> st;
  st.init();
  acc_t sum = 0;
  int64_t i = 0;
  if (len >= kLanes) {
    acc_t s[kLanes], m[kLanes];
    int32_t id[kLanes], ct[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      acc_t t = v(j);
      s[j] = t;
      m[j] = t;
      id[j] = j;
      ct[j] = 1;
    }
    for (i = kLanes; i + kLanes <= len; i += kLanes) {
      const int32_t base = static_cast<int32_t>(i);
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        acc_t t = v(i + j);
        s[j] += t;
        const acc_t cur = m[j];
        const bool gt = t > cur, eq = t == cur;
        m[j] = gt ? t : cur;
        if (FIRST)
          id[j] = pick(id[j], base + j, gt);
        else
          ct[j] = pick(ct[j] + (eq ? 1 : 0), 1, gt);
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      sum += s[j];
      st.combine(m[j], id[j], ct[j]);
    }
  }
  for (; i < len; ++i) {
    acc_t t = v(i);
    sum += t;
    st.update(t, static_cast<int32_t>(i));
  }
  st.finish(sum);
  mean_out = sum / div;
  max_out = st.m;
  sel_out = sel_of(st, FIRST);
}

// one step of a tile reduction: rows of the tile are `row`, the reduced index is `ri`
template <typename scalar_t, typename acc_t, bool FIRST>
inline void tile_pool_step(const scalar_t* __restrict row, acc_t gate, int32_t ri, int64_t len,
                           acc_t* __restrict sum, acc_t* __restrict m, int32_t* __restrict idx,
                           int32_t* __restrict cnt) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]) * gate;
    sum[j] += v;
    const acc_t cur = m[j];
    const bool gt = v > cur, eq = v == cur;
    m[j] = gt ? v : cur;
    if (FIRST)
      idx[j] = pick(idx[j], ri, gt);
    else
      cnt[j] = pick(cnt[j] + (eq ? 1 : 0), 1, gt);
  }
}

template <typename scalar_t, typename acc_t, bool FIRST>
inline void tile_pool_init(const scalar_t* __restrict row, acc_t gate, int64_t len, acc_t* __restrict sum,
                           acc_t* __restrict m, int32_t* __restrict idx, int32_t* __restrict cnt) {
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]) * gate;
    sum[j] = v;
    m[j] = v;
    idx[j] = 0;
    cnt[j] = 1;
  }
}

// ---------------------------------------------------------------- pools

template <typename scalar_t, typename acc_t, bool FIRST>
void channel_pool_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, acc_t* mean, acc_t* mx,
                       int32_t* sel) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* __restrict row = x + r * P;
        row_pool<acc_t, FIRST>(P, [&](int64_t i) { return static_cast<acc_t>(row[i]); }, static_cast<acc_t>(P),
                               mean[r], mx[r], sel[r]);
      }
    });
    return;
  }
  // channels_last: a tile of channels accumulated over all pixels, vectorized over channels
  const int64_t nb = ceil_div(C, kBlock);
  at::parallel_for(0, N * nb, grain_for(P * std::min(kBlock, C)), [&](int64_t b, int64_t e) {
    acc_t sum[kBlock], m[kBlock];
    int32_t idx[kBlock], cnt[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, c0 = (t % nb) * kBlock, len = std::min(kBlock, C - c0);
      const scalar_t* xs = x + n * P * C + c0;
      tile_pool_init<scalar_t, acc_t, FIRST>(xs, acc_t(1), len, sum, m, idx, cnt);
      for (int64_t p = 1; p < P; ++p)
        tile_pool_step<scalar_t, acc_t, FIRST>(xs + p * C, acc_t(1), static_cast<int32_t>(p), len, sum, m, idx, cnt);
      for (int64_t j = 0; j < len; ++j) {
        MaxState<acc_t> st{m[j], idx[j], cnt[j]};
        st.finish(sum[j]);
        const int64_t o = n * C + c0 + j;
        mean[o] = sum[j] / static_cast<acc_t>(P);
        mx[o] = st.m;
        sel[o] = sel_of(st, FIRST);
      }
    }
  });
}

template <typename scalar_t, typename acc_t, bool FIRST>
void spatial_pool_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, const acc_t* g, acc_t* pooled,
                       int32_t* sel) {
  // pooled: [N, 2, P] (mean, max); g may be null (gate 1)
  if (cl) {
    at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / P, p = r % P;
        const scalar_t* __restrict row = x + r * C;
        acc_t* pm = pooled + n * 2 * P + p;
        if (g) {
          const acc_t* __restrict gn = g + n * C;
          row_pool<acc_t, FIRST>(C, [&](int64_t i) { return static_cast<acc_t>(row[i]) * gn[i]; },
                                 static_cast<acc_t>(C), pm[0], pm[P], sel[r]);
        } else {
          row_pool<acc_t, FIRST>(C, [&](int64_t i) { return static_cast<acc_t>(row[i]); }, static_cast<acc_t>(C),
                                 pm[0], pm[P], sel[r]);
        }
      }
    });
    return;
  }
  // NCHW: a tile of pixels, walked channel by channel (rows of the tile are contiguous)
  const int64_t nb = ceil_div(P, kBlock);
  at::parallel_for(0, N * nb, grain_for(C * std::min(kBlock, P)), [&](int64_t b, int64_t e) {
    acc_t sum[kBlock], m[kBlock];
    int32_t idx[kBlock], cnt[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const scalar_t* xs = x + n * C * P + p0;
      const acc_t* gn = g ? g + n * C : nullptr;
      tile_pool_init<scalar_t, acc_t, FIRST>(xs, gn ? gn[0] : acc_t(1), len, sum, m, idx, cnt);
      for (int64_t c = 1; c < C; ++c)
        tile_pool_step<scalar_t, acc_t, FIRST>(xs + c * P, gn ? gn[c] : acc_t(1), static_cast<int32_t>(c), len, sum,
                                               m, idx, cnt);
      acc_t* pm = pooled + n * 2 * P + p0;
      int32_t* sl = sel + n * P + p0;
      for (int64_t j = 0; j < len; ++j) {
        MaxState<acc_t> st{m[j], idx[j], cnt[j]};
        st.finish(sum[j]);
        pm[j] = sum[j] / static_cast<acc_t>(C);
        pm[P + j] = st.m;
        sl[j] = sel_of(st, FIRST);
      }
    }
  });
}

// ---------------------------------------------------------------- out = (x*g)*s

template <typename scalar_t, typename acc_t>
inline void scale_row(const scalar_t* __restrict xr, const acc_t* __restrict w, acc_t a, int64_t len,
                      scalar_t* __restrict o, bool w_first) {
  // w_first: o = (x*w[i])*a (channels_last: w = g, a = s[p]); else o = (x*a)*w[i] (NCHW: a = g[c], w = s)
  if (w_first) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] = static_cast<scalar_t>((static_cast<acc_t>(xr[i]) * w[i]) * a);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] = static_cast<scalar_t>((static_cast<acc_t>(xr[i]) * a) * w[i]);
  }
}

template <typename scalar_t, typename acc_t>
void apply_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, const acc_t* g, const acc_t* s,
                scalar_t* out) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        scale_row<scalar_t, acc_t>(x + r * P, s + (r / C) * P, g[r], P, out + r * P, false);
    });
  } else {
    at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        scale_row<scalar_t, acc_t>(x + r * C, g + (r / P) * C, s[r], C, out + r * C, true);
    });
  }
}

// ---------------------------------------------------------------- backward

// t = dout*x; colacc[i] += t*wcol; returns sum_i t*wrow[i]
template <typename scalar_t, typename acc_t>
inline acc_t dual_reduce_row(const scalar_t* __restrict dr, const scalar_t* __restrict xr, const acc_t* __restrict wrow,
                             acc_t wcol, acc_t* __restrict colacc, int64_t len) {
  acc_t ra = 0;
#pragma omp simd reduction(+ : ra)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t tv = static_cast<acc_t>(dr[i]) * static_cast<acc_t>(xr[i]);
    colacc[i] += tv * wcol;
    ra += tv * wrow[i];
  }
  return ra;
}

template <typename scalar_t, typename acc_t>
void backward_reduce_impl(const scalar_t* dout, const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl,
                          const acc_t* g, const acc_t* s, acc_t* ds, acc_t* dg_part, int64_t nb) {
  // dg_part: [N, nb, C] partial sums over the pixel tiles, summed by the caller
  at::parallel_for(0, N * nb, grain_for(C * std::min(kBlock, P)), [&](int64_t b, int64_t e) {
    acc_t dsl[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const acc_t* gn = g + n * C;
      const acc_t* sn = s + n * P + p0;
      acc_t* part = dg_part + t * C;
      if (!cl) {
        // rows are channels: ds accumulates across rows, dg is each row's sum
        const int64_t base = n * C * P + p0;
        for (int64_t j = 0; j < len; ++j) dsl[j] = 0;
        for (int64_t c = 0; c < C; ++c)
          part[c] = dual_reduce_row<scalar_t, acc_t>(dout + base + c * P, x + base + c * P, sn, gn[c], dsl, len);
        for (int64_t j = 0; j < len; ++j) ds[n * P + p0 + j] = dsl[j];
      } else {
        // rows are pixels: dg accumulates across rows, ds is each row's sum
        for (int64_t c = 0; c < C; ++c) part[c] = 0;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t off = (n * P + p0 + j) * C;
          ds[n * P + p0 + j] = dual_reduce_row<scalar_t, acc_t>(dout + off, x + off, gn, sn[j], part, C);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t, bool FIRST>
void backward_gate_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, const acc_t* g, const acc_t* wa,
                        const acc_t* em, const acc_t* ms, const int32_t* sel_s, acc_t* dg_part, int64_t nb) {
  if (!cl) {
    // one channel row per step; dg_part is [N, 1, C] (nb == 1)
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
        const int32_t c = static_cast<int32_t>(r % C);
        const acc_t gc = g[r];
        const scalar_t* __restrict xr = x + r * P;
        const acc_t* __restrict wn = wa + n * P;
        const acc_t* __restrict en = em + n * P;
        const acc_t* __restrict mn = ms + n * 2 * P + P;
        const int32_t* __restrict sn = sel_s + n * P;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < P; ++p) {
          const acc_t xv = static_cast<acc_t>(xr[p]);
          const bool at = FIRST ? (sn[p] == c) : (xv * gc == mn[p]);
          acc += cbam_gate_term<acc_t>(xv, wn[p], at, en[p]);
        }
        dg_part[r] = acc;
      }
    });
    return;
  }
  at::parallel_for(0, N * nb, grain_for(C * std::min(kBlock, P)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const acc_t* __restrict gn = g + n * C;
      acc_t* __restrict part = dg_part + t * C;
      for (int64_t c = 0; c < C; ++c) part[c] = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t p = p0 + j;
        const scalar_t* __restrict xr = x + (n * P + p) * C;
        const acc_t w = wa[n * P + p], ep = em[n * P + p], mp = ms[n * 2 * P + P + p];
        const int32_t sp = sel_s[n * P + p];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(xr[c]);
          const bool at = FIRST ? (static_cast<int32_t>(c) == sp) : (xv * gn[c] == mp);
          part[c] += cbam_gate_term<acc_t>(xv, w, at, ep);
        }
      }
    }
  });
}

// Pointers of the optional parts of dx (null when absent).
template <typename scalar_t, typename acc_t>
struct DxArgs {
  const scalar_t* dout;  // with s
  const acc_t* g;        // null: gate 1
  const acc_t* s;
  const acc_t* wa;       // spatial part: wa, em, ms (max row of pooled_s), sel_s
  const acc_t* em;
  const acc_t* ms;
  const int32_t* sel_s;
  const acc_t* a2;       // channel part: a2, e2, mc (max row of pooled_c), sel_c
  const acc_t* e2;
  const acc_t* mc;
  const int32_t* sel_c;
};

template <typename scalar_t, typename acc_t, bool FIRST, bool HAS_D, bool HAS_S, bool HAS_C>
void backward_input_impl(const DxArgs<scalar_t, acc_t>& A, const scalar_t* x, int64_t N, int64_t C, int64_t P,
                         bool cl, scalar_t* dx) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
        const int32_t c = static_cast<int32_t>(r % C);
        const acc_t gc = A.g ? A.g[r] : acc_t(1);
        const scalar_t* __restrict xr = x + r * P;
        const scalar_t* __restrict dr = HAS_D ? A.dout + r * P : nullptr;
        const acc_t* __restrict sn = HAS_D ? A.s + n * P : nullptr;
        const acc_t* __restrict wn = HAS_S ? A.wa + n * P : nullptr;
        const acc_t* __restrict en = HAS_S ? A.em + n * P : nullptr;
        const acc_t* __restrict mn = HAS_S ? A.ms + n * 2 * P + P : nullptr;
        const int32_t* __restrict ss = HAS_S ? A.sel_s + n * P : nullptr;
        const acc_t a2c = HAS_C ? A.a2[r] : acc_t(0), e2c = HAS_C ? A.e2[r] : acc_t(0);
        const acc_t mcc = HAS_C ? A.mc[r] : acc_t(0);
        const int32_t scc = HAS_C ? A.sel_c[r] : -1;
        scalar_t* __restrict dxr = dx + r * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) {
          const acc_t xv = static_cast<acc_t>(xr[p]);
          const bool ats = HAS_S && (FIRST ? (ss[p] == c) : (xv * gc == mn[p]));
          const bool atc = HAS_C && (FIRST ? (static_cast<int32_t>(p) == scc) : (xv == mcc));
          const acc_t d = HAS_D ? static_cast<acc_t>(dr[p]) : acc_t(0);
          dxr[p] = static_cast<scalar_t>(cbam_dx<acc_t>(d, HAS_D ? sn[p] : acc_t(0), gc, HAS_S ? wn[p] : acc_t(0), ats,
                                                        HAS_S ? en[p] : acc_t(0), a2c, atc, e2c));
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / P;
      const int32_t pi = static_cast<int32_t>(r % P);
      const acc_t* __restrict gn = A.g ? A.g + n * C : nullptr;
      const scalar_t* __restrict xr = x + r * C;
      const scalar_t* __restrict dr = HAS_D ? A.dout + r * C : nullptr;
      const acc_t sp = HAS_D ? A.s[r] : acc_t(0);
      const acc_t w = HAS_S ? A.wa[r] : acc_t(0), ep = HAS_S ? A.em[r] : acc_t(0);
      const acc_t mp = HAS_S ? A.ms[n * 2 * P + P + pi] : acc_t(0);
      const int32_t ssp = HAS_S ? A.sel_s[r] : -1;
      const acc_t* __restrict a2n = HAS_C ? A.a2 + n * C : nullptr;
      const acc_t* __restrict e2n = HAS_C ? A.e2 + n * C : nullptr;
      const acc_t* __restrict mcn = HAS_C ? A.mc + n * C : nullptr;
      const int32_t* __restrict scn = HAS_C ? A.sel_c + n * C : nullptr;
      scalar_t* __restrict dxr = dx + r * C;
      if (gn) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(xr[c]);
          const bool ats = HAS_S && (FIRST ? (static_cast<int32_t>(c) == ssp) : (xv * gn[c] == mp));
          const bool atc = HAS_C && (FIRST ? (scn[c] == pi) : (xv == mcn[c]));
          const acc_t d = HAS_D ? static_cast<acc_t>(dr[c]) : acc_t(0);
          dxr[c] = static_cast<scalar_t>(cbam_dx<acc_t>(d, sp, gn[c], w, ats, ep, HAS_C ? a2n[c] : acc_t(0), atc,
                                                        HAS_C ? e2n[c] : acc_t(0)));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(xr[c]);
          const bool ats = HAS_S && (FIRST ? (static_cast<int32_t>(c) == ssp) : (xv == mp));
          const bool atc = HAS_C && (FIRST ? (scn[c] == pi) : (xv == mcn[c]));
          const acc_t d = HAS_D ? static_cast<acc_t>(dr[c]) : acc_t(0);
          dxr[c] = static_cast<scalar_t>(cbam_dx<acc_t>(d, sp, acc_t(1), w, ats, ep, HAS_C ? a2n[c] : acc_t(0), atc,
                                                        HAS_C ? e2n[c] : acc_t(0)));
        }
      }
    }
  });
}


// ---------------------------------------------------------------- the small k x k conv of the spatial gate
// ATen's CPU convolution takes milliseconds for a 2 -> 1 channel map (oneDNN setup); these direct
// loops take tens of microseconds. ps: [N, 2, H, W], w: [1, 2, k, k], y / dy: [N, 1, H, W], all
// contiguous in the accumulation type; padding k/2, stride 1.

template <typename acc_t>
void spatial_conv_impl(const acc_t* ps, const acc_t* w, int64_t N, int64_t H, int64_t W, int64_t k, acc_t* y) {
  const int64_t r = k / 2;
  at::parallel_for(0, N * H, conv_grain(W * k * k * 2), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / H, h = t % H;
      acc_t* __restrict yr = y + t * W;
      for (int64_t i = 0; i < W; ++i) yr[i] = 0;
      for (int64_t ci = 0; ci < 2; ++ci)
        for (int64_t kh = 0; kh < k; ++kh) {
          const int64_t hi = h + kh - r;
          if (hi < 0 || hi >= H) continue;
          const acc_t* __restrict row = ps + ((n * 2 + ci) * H + hi) * W;
          for (int64_t kw = 0; kw < k; ++kw) {
            const acc_t wt = w[(ci * k + kh) * k + kw];
            const int64_t lo = std::max<int64_t>(0, r - kw), hi_w = std::min<int64_t>(W, W + r - kw);
#pragma omp simd
            for (int64_t i = lo; i < hi_w; ++i) yr[i] += row[i + kw - r] * wt;
          }
        }
    }
  });
}

template <typename acc_t>
void spatial_conv_backward_impl(const acc_t* dy, const acc_t* ps, const acc_t* w, int64_t N, int64_t H, int64_t W,
                                int64_t k, acc_t* dps, acc_t* dw) {
  const int64_t r = k / 2;
  // input gradient: dps[n, ci, h, :] = sum_{kh, kw} dy[n, h - kh + r, : - kw + r] * w[ci, kh, kw]
  at::parallel_for(0, N * 2 * H, conv_grain(W * k * k), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t h = t % H, ci = (t / H) % 2, n = t / (2 * H);
      acc_t* __restrict o = dps + t * W;
      for (int64_t i = 0; i < W; ++i) o[i] = 0;
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t hy = h - kh + r;
        if (hy < 0 || hy >= H) continue;
        const acc_t* __restrict row = dy + (n * H + hy) * W;
        for (int64_t kw = 0; kw < k; ++kw) {
          const acc_t wt = w[(ci * k + kh) * k + kw];
          const int64_t lo = std::max<int64_t>(0, kw - r), hi_w = std::min<int64_t>(W, W + kw - r);
#pragma omp simd
          for (int64_t i = lo; i < hi_w; ++i) o[i] += row[i - kw + r] * wt;
        }
      }
    }
  });
  // weight gradient: dw[ci, kh, kw] = sum_{n, h, w} dy[n, h, w] * ps[n, ci, h + kh - r, w + kw - r]
  at::parallel_for(0, 2 * k * k, conv_grain(N * H * W), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t kw = t % k, kh = (t / k) % k, ci = t / (k * k);
      const int64_t lo = std::max<int64_t>(0, r - kw), hi_w = std::min<int64_t>(W, W + r - kw);
      acc_t acc = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hi = h + kh - r;
          if (hi < 0 || hi >= H) continue;
          const acc_t* __restrict dr = dy + (n * H + h) * W;
          const acc_t* __restrict pr = ps + ((n * 2 + ci) * H + hi) * W + kw - r;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = lo; i < hi_w; ++i) acc += dr[i] * pr[i];
        }
      dw[t] = acc;
    }
  });
}

// ---------------------------------------------------------------- entry points of this ISA

inline void sizes(const at::Tensor& x, int64_t& N, int64_t& C, int64_t& P) {
  N = x.size(0);
  C = x.size(1);
  P = x.size(2) * x.size(3);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename F>
inline void with_first(bool first, F f) {
  if (first)
    f(std::true_type{});
  else
    f(std::false_type{});
}

inline void channel_pool(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_channel_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pc = pooled_c.mutable_data_ptr<acc_t>();
    with_first(first, [&](auto F) {
      channel_pool_impl<scalar_t, acc_t, decltype(F)::value>(x.const_data_ptr<scalar_t>(), N, C, P, cl, pc,
                                                             pc + N * C, sel_c.mutable_data_ptr<int32_t>());
    });
  });
}

inline void spatial_pool(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,
                         at::Tensor& sel_s) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_first(first, [&](auto F) {
      spatial_pool_impl<scalar_t, acc_t, decltype(F)::value>(x.const_data_ptr<scalar_t>(), N, C, P, cl,
                                                             ptr_or_null<acc_t>(g), pooled_s.mutable_data_ptr<acc_t>(),
                                                             sel_s.mutable_data_ptr<int32_t>());
    });
  });
}

inline void apply_gates(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_impl<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, P, cl, g.const_data_ptr<acc_t>(),
                                s.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

inline void backward_reduce(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,
                            const at::Tensor& s, at::Tensor& ds, at::Tensor& dg) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  const int64_t nb = ceil_div(P, kBlock);
  at::Tensor part = at::empty({N, nb, C}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_impl<scalar_t, acc_t>(dout.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), N, C, P, cl,
                                          g.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
                                          ds.mutable_data_ptr<acc_t>(), part.mutable_data_ptr<acc_t>(), nb);
  });
  at::sum_out(dg, part, {1});
}

inline void backward_gate(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa,
                          const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first,
                          at::Tensor& dg2) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  const int64_t nb = cl ? ceil_div(P, kBlock) : 1;
  at::Tensor part = cl ? at::empty({N, nb, C}, g.options()) : dg2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_first(first, [&](auto F) {
      backward_gate_impl<scalar_t, acc_t, decltype(F)::value>(
          x.const_data_ptr<scalar_t>(), N, C, P, cl, g.const_data_ptr<acc_t>(), wa.const_data_ptr<acc_t>(),
          em.const_data_ptr<acc_t>(), pooled_s.const_data_ptr<acc_t>(), sel_s.const_data_ptr<int32_t>(),
          part.mutable_data_ptr<acc_t>(), nb);
    });
  });
  if (cl) at::sum_out(dg2, part, {1});
}

inline void backward_input(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g,
                           const at::Tensor& s, const at::Tensor& wa, const at::Tensor& em, const at::Tensor& pooled_s,
                           const at::Tensor& sel_s, const at::Tensor& a2, const at::Tensor& e2,
                           const at::Tensor& pooled_c, const at::Tensor& sel_c, bool first, at::Tensor& dx) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DxArgs<scalar_t, acc_t> A{ptr_or_null<scalar_t>(dout),
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
    with_first(first, [&](auto F) {
      constexpr bool FI = decltype(F)::value;
      // the three combinations the ops use: CBAM (all parts), channel pool alone, spatial pool alone
      if (A.dout && A.wa && A.a2)
        backward_input_impl<scalar_t, acc_t, FI, true, true, true>(A, xp, N, C, P, cl, dxp);
      else if (A.a2 && !A.dout && !A.wa)
        backward_input_impl<scalar_t, acc_t, FI, false, false, true>(A, xp, N, C, P, cl, dxp);
      else if (A.wa && !A.dout && !A.a2)
        backward_input_impl<scalar_t, acc_t, FI, false, true, false>(A, xp, N, C, P, cl, dxp);
      else
        TORCH_CHECK(false, "cbam backward_input: unsupported combination of parts");
    });
  });
}

inline void spatial_conv(const at::Tensor& ps, const at::Tensor& w, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(ps.scalar_type(), "cbam_spatial_conv_cpu", [&] {
    spatial_conv_impl<scalar_t>(ps.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), ps.size(0), ps.size(2),
                                ps.size(3), w.size(3), y.mutable_data_ptr<scalar_t>());
  });
}

inline void spatial_conv_backward(const at::Tensor& dy, const at::Tensor& ps, const at::Tensor& w, at::Tensor& dps,
                                  at::Tensor& dw) {
  AT_DISPATCH_FLOATING_TYPES(ps.scalar_type(), "cbam_spatial_conv_backward_cpu", [&] {
    spatial_conv_backward_impl<scalar_t>(dy.const_data_ptr<scalar_t>(), ps.const_data_ptr<scalar_t>(),
                                         w.const_data_ptr<scalar_t>(), ps.size(0), ps.size(2), ps.size(3), w.size(3),
                                         dps.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace FASTNN_CBAM_ISA
}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
