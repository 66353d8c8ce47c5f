// CBAM's passes over x on the CPU. See cbam_cpu.h for the assumptions and cbam_math.h for the math.
//
// Layouts: NCHW walks rows x[n, c, :] (contiguous over p); channels_last walks rows x[n, p, :]
// (contiguous over c). Every reduction keeps its accumulators in the accumulation type and the
// inner loops are written branch-free over a contiguous row so the compiler vectorizes them.
// Reductions across rows that run on different threads go through per-task partial buffers summed
// afterwards in a fixed order, so results do not depend on the thread count.
#include "cbam/cpu/cbam_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <vector>

#include "cbam/cbam_math.h"

namespace fastnn {
namespace cbam {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;  // pixels (NCHW) or channels (channels_last) per task-local tile

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// grain for parallel_for over rows of `len` elements: about 32K elements per chunk
inline int64_t grain_for(int64_t len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, len)); }

// sum, max, and then the max's first index / tie count of one contiguous row of v(i) values
template <typename acc_t, typename F>
inline void row_pool(int64_t len, bool first, F v, acc_t& mean_out, acc_t& max_out, int32_t& sel_out, acc_t div) {
  acc_t sum = 0, m = v(0);
#pragma omp simd reduction(+ : sum) reduction(max : m)
  for (int64_t i = 0; i < len; ++i) {
    acc_t t = v(i);
    sum += t;
    m = t > m ? t : m;
  }
  MaxState<acc_t> st;
  st.m = m;
  st.idx = INT32_MAX;
  st.cnt = 0;
  if (first) {
    for (int64_t i = 0; i < len; ++i) {
      if (v(i) == m) {
        st.idx = static_cast<int32_t>(i);
        st.cnt = 1;
        break;
      }
    }
  } else {
    int32_t cnt = 0;
#pragma omp simd reduction(+ : cnt)
    for (int64_t i = 0; i < len; ++i) cnt += v(i) == m ? 1 : 0;
    st.cnt = cnt;
    st.idx = 0;
  }
  st.finish(sum);
  mean_out = sum / div;
  max_out = st.m;
  sel_out = sel_of(st, first);
}

// ---------------------------------------------------------------- pools

template <typename scalar_t, typename acc_t>
void channel_pool_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, bool first, acc_t* mean,
                       acc_t* mx, int32_t* sel) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* row = x + r * P;
        row_pool<acc_t>(P, first, [&](int64_t i) { return static_cast<acc_t>(row[i]); }, mean[r], mx[r], sel[r],
                        static_cast<acc_t>(P));
      }
    });
    return;
  }
  // channels_last: accumulate a tile of channels over all pixels, vectorized over channels
  const int64_t nb = ceil_div(C, kBlock);
  at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
    acc_t sum[kBlock], m[kBlock];
    int32_t idx[kBlock], cnt[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, c0 = (t % nb) * kBlock, len = std::min(kBlock, C - c0);
      const scalar_t* xs = x + n * P * C + c0;
      for (int64_t j = 0; j < len; ++j) {
        acc_t v = static_cast<acc_t>(xs[j]);
        sum[j] = v;
        m[j] = v;
        idx[j] = 0;
        cnt[j] = 1;
      }
      for (int64_t p = 1; p < P; ++p) {
        const scalar_t* row = xs + p * C;
        const int32_t pi = static_cast<int32_t>(p);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          acc_t v = static_cast<acc_t>(row[j]);
          sum[j] += v;
          bool gt = v > m[j], eq = v == m[j];
          m[j] = gt ? v : m[j];
          idx[j] = gt ? pi : idx[j];
          cnt[j] = gt ? 1 : cnt[j] + (eq ? 1 : 0);
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        MaxState<acc_t> st{m[j], idx[j], cnt[j]};
        st.finish(sum[j]);
        const int64_t o = n * C + c0 + j;
        mean[o] = sum[j] / static_cast<acc_t>(P);
        mx[o] = st.m;
        sel[o] = sel_of(st, first);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void spatial_pool_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, const acc_t* g, bool first,
                       acc_t* pooled, int32_t* sel) {
  // pooled: [N, 2, P] (mean, max); g may be null (gate 1)
  if (cl) {
    at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / P, p = r % P;
        const scalar_t* row = x + r * C;
        acc_t* pm = pooled + n * 2 * P + p;
        if (g) {
          const acc_t* gn = g + n * C;
          row_pool<acc_t>(C, first, [&](int64_t i) { return static_cast<acc_t>(row[i]) * gn[i]; }, pm[0], pm[P],
                          sel[r], static_cast<acc_t>(C));
        } else {
          row_pool<acc_t>(C, first, [&](int64_t i) { return static_cast<acc_t>(row[i]); }, pm[0], pm[P], sel[r],
                          static_cast<acc_t>(C));
        }
      }
    });
    return;
  }
  // NCHW: a tile of pixels, walked channel by channel (rows of the tile are contiguous)
  const int64_t nb = ceil_div(P, kBlock);
  at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
    acc_t sum[kBlock], m[kBlock];
    int32_t idx[kBlock], cnt[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const scalar_t* xs = x + n * C * P + p0;
      const acc_t* gn = g ? g + n * C : nullptr;
      const acc_t g0 = gn ? gn[0] : acc_t(1);
      for (int64_t j = 0; j < len; ++j) {
        acc_t v = static_cast<acc_t>(xs[j]) * g0;
        sum[j] = v;
        m[j] = v;
        idx[j] = 0;
        cnt[j] = 1;
      }
      for (int64_t c = 1; c < C; ++c) {
        const scalar_t* row = xs + c * P;
        const acc_t gc = gn ? gn[c] : acc_t(1);
        const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          acc_t v = static_cast<acc_t>(row[j]) * gc;
          sum[j] += v;
          bool gt = v > m[j], eq = v == m[j];
          m[j] = gt ? v : m[j];
          idx[j] = gt ? ci : idx[j];
          cnt[j] = gt ? 1 : cnt[j] + (eq ? 1 : 0);
        }
      }
      acc_t* pm = pooled + n * 2 * P + p0;
      int32_t* sl = sel + n * P + p0;
      for (int64_t j = 0; j < len; ++j) {
        MaxState<acc_t> st{m[j], idx[j], cnt[j]};
        st.finish(sum[j]);
        pm[j] = sum[j] / static_cast<acc_t>(C);
        pm[P + j] = st.m;
        sl[j] = sel_of(st, first);
      }
    }
  });
}

// ---------------------------------------------------------------- out = (x*g)*s

template <typename scalar_t, typename acc_t>
void apply_impl(const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl, const acc_t* g, const acc_t* s,
                scalar_t* out) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const acc_t gc = g[r];
        const acc_t* sn = s + (r / C) * P;
        const scalar_t* xr = x + r * P;
        scalar_t* orow = out + r * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) orow[p] = static_cast<scalar_t>((static_cast<acc_t>(xr[p]) * gc) * sn[p]);
      }
    });
  } else {
    at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const acc_t sp = s[r];
        const acc_t* gn = g + (r / P) * C;
        const scalar_t* xr = x + r * C;
        scalar_t* orow = out + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) * gn[c]) * sp);
      }
    });
  }
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
void backward_reduce_impl(const scalar_t* dout, const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl,
                          const acc_t* g, const acc_t* s, acc_t* ds, acc_t* dg_part, int64_t nb) {
  // dg_part: [N, nb, C] partial sums over the pixel tiles, summed by the caller
  at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
    acc_t dsl[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const acc_t* gn = g + n * C;
      const acc_t* sn = s + n * P + p0;
      acc_t* part = dg_part + t * C;
      if (!cl) {
        const int64_t base = n * C * P + p0;
        for (int64_t j = 0; j < len; ++j) dsl[j] = 0;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xr = x + base + c * P;
          const scalar_t* dr = dout + base + c * P;
          const acc_t gc = gn[c];
          acc_t ra = 0;
#pragma omp simd reduction(+ : ra)
          for (int64_t j = 0; j < len; ++j) {
            acc_t tv = static_cast<acc_t>(dr[j]) * static_cast<acc_t>(xr[j]);
            dsl[j] += tv * gc;
            ra += tv * sn[j];
          }
          part[c] = ra;
        }
        for (int64_t j = 0; j < len; ++j) ds[n * P + p0 + j] = dsl[j];
      } else {
        for (int64_t c = 0; c < C; ++c) part[c] = 0;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t off = (n * P + p0 + j) * C;
          const scalar_t* xr = x + off;
          const scalar_t* dr = dout + off;
          const acc_t sp = sn[j];
          acc_t ra = 0;
#pragma omp simd reduction(+ : ra)
          for (int64_t c = 0; c < C; ++c) {
            acc_t tv = static_cast<acc_t>(dr[c]) * static_cast<acc_t>(xr[c]);
            ra += tv * gn[c];
            part[c] += tv * sp;
          }
          ds[n * P + p0 + j] = ra;
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
        const scalar_t* xr = x + r * P;
        const acc_t* wn = wa + n * P;
        const acc_t* en = em + n * P;
        const acc_t* mn = ms + n * 2 * P + P;
        const int32_t* sn = sel_s + n * P;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < P; ++p) {
          acc_t xv = static_cast<acc_t>(xr[p]);
          bool at = FIRST ? (sn[p] == c) : (xv * gc == mn[p]);
          acc += cbam_gate_term<acc_t>(xv, wn[p], at, en[p]);
        }
        dg_part[r] = acc;
      }
    });
    return;
  }
  at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, p0 = (t % nb) * kBlock, len = std::min(kBlock, P - p0);
      const acc_t* gn = g + n * C;
      acc_t* part = dg_part + t * C;
      for (int64_t c = 0; c < C; ++c) part[c] = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t p = p0 + j;
        const scalar_t* xr = x + (n * P + p) * C;
        const acc_t w = wa[n * P + p], ep = em[n * P + p], mp = ms[n * 2 * P + P + p];
        const int32_t sp = sel_s[n * P + p];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc_t xv = static_cast<acc_t>(xr[c]);
          bool at = FIRST ? (static_cast<int32_t>(c) == sp) : (xv * gn[c] == mp);
          part[c] += cbam_gate_term<acc_t>(xv, w, at, ep);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t, bool FIRST>
void backward_input_impl(const scalar_t* dout, const scalar_t* x, int64_t N, int64_t C, int64_t P, bool cl,
                         const acc_t* g, const acc_t* s, const acc_t* wa, const acc_t* em, const acc_t* ms,
                         const int32_t* sel_s, const acc_t* a2, const acc_t* e2, const acc_t* mc,
                         const int32_t* sel_c, scalar_t* dx) {
  // ms: the max channel of pooled_s ([N, 2, P] -> offset P), mc: max row of pooled_c ([N, C]).
  // Absent parts contribute zero: their pointers are null and the loops use zero coefficients.
  const bool has_d = dout != nullptr, has_s = wa != nullptr, has_c = a2 != nullptr;
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t b, int64_t e) {
      std::vector<acc_t> zeros(has_s && has_d ? 0 : P, acc_t(0));
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
        const int32_t c = static_cast<int32_t>(r % C);
        const acc_t gc = g ? g[r] : acc_t(1);
        const scalar_t* xr = x + r * P;
        const scalar_t* dr = has_d ? dout + r * P : x + r * P;  // read but multiplied by s == 0 when absent
        const acc_t* sn = has_d ? s + n * P : zeros.data();
        const acc_t* wn = has_s ? wa + n * P : zeros.data();
        const acc_t* en = has_s ? em + n * P : zeros.data();
        const acc_t* mn = has_s ? ms + n * 2 * P + P : zeros.data();
        const int32_t* ss = has_s ? sel_s + n * P : nullptr;
        const acc_t a2c = has_c ? a2[r] : acc_t(0), e2c = has_c ? e2[r] : acc_t(0);
        const acc_t mcc = has_c ? mc[r] : acc_t(0);
        const int32_t scc = has_c ? sel_c[r] : -1;
        scalar_t* dxr = dx + r * P;
        if (has_s) {
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) {
            acc_t xv = static_cast<acc_t>(xr[p]);
            bool ats = FIRST ? (ss[p] == c) : (xv * gc == mn[p]);
            bool atc = has_c && (FIRST ? (static_cast<int32_t>(p) == scc) : (xv == mcc));
            acc_t d = has_d ? static_cast<acc_t>(dr[p]) : acc_t(0);
            dxr[p] = static_cast<scalar_t>(cbam_dx<acc_t>(d, sn[p], gc, wn[p], ats, en[p], a2c, atc, e2c));
          }
        } else {
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) {
            acc_t xv = static_cast<acc_t>(xr[p]);
            bool atc = has_c && (FIRST ? (static_cast<int32_t>(p) == scc) : (xv == mcc));
            acc_t d = has_d ? static_cast<acc_t>(dr[p]) * sn[p] : acc_t(0);
            dxr[p] = static_cast<scalar_t>(cbam_dx<acc_t>(d, acc_t(1), gc, acc_t(0), false, acc_t(0), a2c, atc, e2c));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * P, grain_for(C), [&](int64_t b, int64_t e) {
    std::vector<acc_t> zeros(C, acc_t(0));
    std::vector<int32_t> nosel(C, -1);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / P, p = r % P;
      const int32_t pi = static_cast<int32_t>(p);
      const acc_t* gn = g ? g + n * C : nullptr;
      const scalar_t* xr = x + r * C;
      const scalar_t* dr = has_d ? dout + r * C : x + r * C;
      const acc_t sp = has_d ? s[r] : acc_t(0);
      const acc_t w = has_s ? wa[r] : acc_t(0), ep = has_s ? em[r] : acc_t(0);
      const acc_t mp = has_s ? ms[n * 2 * P + P + p] : acc_t(0);
      const int32_t ssp = has_s ? sel_s[r] : -1;
      const acc_t* a2n = has_c ? a2 + n * C : zeros.data();
      const acc_t* e2n = has_c ? e2 + n * C : zeros.data();
      const acc_t* mcn = has_c ? mc + n * C : zeros.data();
      const int32_t* scn = has_c ? sel_c + n * C : nosel.data();
      scalar_t* dxr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        acc_t xv = static_cast<acc_t>(xr[c]);
        acc_t gc = gn ? gn[c] : acc_t(1);
        bool ats = has_s && (FIRST ? (static_cast<int32_t>(c) == ssp) : (xv * gc == mp));
        bool atc = has_c && (FIRST ? (scn[c] == pi) : (xv == mcn[c]));
        acc_t d = has_d ? static_cast<acc_t>(dr[c]) : acc_t(0);
        dxr[c] = static_cast<scalar_t>(cbam_dx<acc_t>(d, sp, gc, w, ats, ep, a2n[c], atc, e2n[c]));
      }
    }
  });
}

inline void sizes(const at::Tensor& x, int64_t& N, int64_t& C, int64_t& P) {
  N = x.size(0);
  C = x.size(1);
  P = x.size(2) * x.size(3);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

void channel_pool(const at::Tensor& x, bool cl, bool first, at::Tensor& pooled_c, at::Tensor& sel_c) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_channel_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pc = pooled_c.mutable_data_ptr<acc_t>();
    channel_pool_impl<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, P, cl, first, pc, pc + N * C,
                                       sel_c.mutable_data_ptr<int32_t>());
  });
}

void spatial_pool(const at::Tensor& x, bool cl, const at::Tensor& g, bool first, at::Tensor& pooled_s,
                  at::Tensor& sel_s) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    spatial_pool_impl<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, P, cl, ptr_or_null<acc_t>(g), first,
                                       pooled_s.mutable_data_ptr<acc_t>(), sel_s.mutable_data_ptr<int32_t>());
  });
}

void apply_gates(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s, at::Tensor& out) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_impl<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, P, cl, g.const_data_ptr<acc_t>(),
                                s.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

void backward_reduce(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                     at::Tensor& ds, at::Tensor& dg) {
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

void backward_gate(const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& wa, const at::Tensor& em,
                   const at::Tensor& pooled_s, const at::Tensor& sel_s, bool first, at::Tensor& dg2) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  const int64_t nb = cl ? ceil_div(P, kBlock) : 1;
  at::Tensor part = cl ? at::empty({N, nb, C}, g.options()) : dg2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto first_tag) {
      backward_gate_impl<scalar_t, acc_t, decltype(first_tag)::value>(
          x.const_data_ptr<scalar_t>(), N, C, P, cl, g.const_data_ptr<acc_t>(), wa.const_data_ptr<acc_t>(),
          em.const_data_ptr<acc_t>(), pooled_s.const_data_ptr<acc_t>(), sel_s.const_data_ptr<int32_t>(),
          part.mutable_data_ptr<acc_t>(), nb);
    };
    if (first)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
  if (cl) at::sum_out(dg2, part, {1});
}

void backward_input(const at::Tensor& dout, const at::Tensor& x, bool cl, const at::Tensor& g, const at::Tensor& s,
                    const at::Tensor& wa, const at::Tensor& em, const at::Tensor& pooled_s, const at::Tensor& sel_s,
                    const at::Tensor& a2, const at::Tensor& e2, const at::Tensor& pooled_c, const at::Tensor& sel_c,
                    bool first, at::Tensor& dx) {
  int64_t N, C, P;
  sizes(x, N, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mc = pooled_c.defined() ? pooled_c.const_data_ptr<acc_t>() + N * C : nullptr;
    auto run = [&](auto first_tag) {
      backward_input_impl<scalar_t, acc_t, decltype(first_tag)::value>(
          ptr_or_null<scalar_t>(dout), x.const_data_ptr<scalar_t>(), N, C, P, cl, ptr_or_null<acc_t>(g),
          ptr_or_null<acc_t>(s), ptr_or_null<acc_t>(wa), ptr_or_null<acc_t>(em), ptr_or_null<acc_t>(pooled_s),
          ptr_or_null<int32_t>(sel_s), ptr_or_null<acc_t>(a2), ptr_or_null<acc_t>(e2), mc, ptr_or_null<int32_t>(sel_c),
          dx.mutable_data_ptr<scalar_t>());
    };
    if (first)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
}

}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
