// The CPU kernels themselves. Included twice by conv_bn_relu_cpu.cpp, once per instruction set
// (inside a namespace each, the second time under an AVX2 target pragma), so: no include guard,
// no #include here (conv_bn_relu_cpu.cpp includes what this needs first).
// NOLINT(build/header_guard)


constexpr int64_t kChunk = 1024;     // values summed in acc_t before they are added in double
constexpr int64_t kRowBlock = 64;    // NHWC rows summed in acc_t before they are added in double
constexpr int64_t kGrainElems = 16384;  // elementwise work below which a task is not split

template <typename acc_t>
struct ChannelCoefs {  // per-channel forward constants, as arrays (NHWC inner loops)
  std::vector<acc_t> mean, alpha, beta;
};

template <typename acc_t>
ChannelCoefs<acc_t> make_coefs(const Params& p, int64_t C) {
  ChannelCoefs<acc_t> k;
  k.mean.resize(C);
  k.alpha.resize(C);
  k.beta.resize(C);
  const acc_t* mean = p.mean.data_ptr<acc_t>();
  const acc_t* var = p.var.data_ptr<acc_t>();
  const acc_t* w = p.weight.defined() ? p.weight.data_ptr<acc_t>() : nullptr;
  const acc_t* b = p.bias.defined() ? p.bias.data_ptr<acc_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const FwdCoef<acc_t> f = fwd_coef<acc_t>(mean[c], var[c], w, b, c, static_cast<acc_t>(p.eps));
    k.mean[c] = f.mean;
    k.alpha[c] = f.alpha;
    k.beta[c] = f.beta;
  }
  return k;
}

template <typename acc_t>
FwdCoef<acc_t> coef_of(const Params& p, int64_t c) {
  const acc_t* w = p.weight.defined() ? p.weight.data_ptr<acc_t>() : nullptr;
  const acc_t* b = p.bias.defined() ? p.bias.data_ptr<acc_t>() : nullptr;
  return fwd_coef<acc_t>(p.mean.data_ptr<acc_t>()[c], p.var.data_ptr<acc_t>()[c], w, b, c,
                         static_cast<acc_t>(p.eps));
}

// ---------------------------------------------------------------- contiguous rows (NCHW)

// A single running sum per SIMD lane would make these loops latency-bound (one add every few
// cycles); kLanes independent partial sums keep the adders busy.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t>
inline void row_shifted_sums(const scalar_t* x, int64_t len, acc_t shift, double& s1, double& s2) {
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    const int64_t i1 = std::min(len, i0 + kChunk);
    acc_t a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const acc_t d = static_cast<acc_t>(x[i + j]) - shift;
        a1[j] += d;
        a2[j] += d * d;
      }
    }
    for (int j = 0; i < i1; ++i, ++j) {
      const acc_t d = static_cast<acc_t>(x[i]) - shift;
      a1[j] += d;
      a2[j] += d * d;
    }
    acc_t t1 = 0, t2 = 0;
    for (int j = 0; j < kLanes; ++j) {
      t1 += a1[j];
      t2 += a2[j];
    }
    s1 += t1;
    s2 += t2;
  }
}

template <bool RELU, typename scalar_t, typename acc_t>
inline void row_apply(const scalar_t* x, scalar_t* y, int64_t len, const FwdCoef<acc_t> k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<scalar_t>(relu_if(bn_pre(static_cast<acc_t>(x[i]), k), RELU));
  }
}

template <bool RELU, typename scalar_t, typename acc_t>
inline void row_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t len, const FwdCoef<acc_t> k,
                          double& sdz, double& sdzx) {
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    const int64_t i1 = std::min(len, i0 + kChunk);
    acc_t a[kLanes] = {}, b[kLanes] = {};
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const acc_t xv = static_cast<acc_t>(x[i + j]);
        const acc_t dz = relu_grad(static_cast<acc_t>(dy[i + j]), bn_pre(xv, k), RELU);
        a[j] += dz;
        b[j] += dz * (xv - k.mean);
      }
    }
    for (int j = 0; i < i1; ++i, ++j) {
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t dz = relu_grad(static_cast<acc_t>(dy[i]), bn_pre(xv, k), RELU);
      a[j] += dz;
      b[j] += dz * (xv - k.mean);
    }
    acc_t ta = 0, tb = 0;
    for (int j = 0; j < kLanes; ++j) {
      ta += a[j];
      tb += b[j];
    }
    sdz += ta;
    sdzx += tb;
  }
}

template <bool RELU, typename scalar_t, typename acc_t>
inline void row_dx(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, const FwdCoef<acc_t> k,
                   const BwdCoef<acc_t> bk) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t dz = relu_grad(static_cast<acc_t>(dy[i]), bn_pre(xv, k), RELU);
    dx[i] = static_cast<scalar_t>(bn_dx(dz, xv - k.mean, bk));
  }
}

// The rows of one NCHW channel are C*S values apart: too short a stream for the hardware prefetcher
// to follow, so the next row is requested while the current one is summed.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t len) {
  constexpr int64_t step = 64 / sizeof(scalar_t);  // one cache line
  for (int64_t i = 0; i < len; i += step) __builtin_prefetch(p + i);
}

// Statistics of channel c from its N rows; writes mean/var[c].
template <typename scalar_t, typename acc_t>
inline void nchw_channel_stats(const scalar_t* x, const Geometry& g, int64_t c, acc_t* mean, acc_t* var) {
  const int64_t n = g.count();
  if (n == 0) {
    mean[c] = 0;
    var[c] = 0;
    return;
  }
  const acc_t shift = static_cast<acc_t>(x[c * g.S]);
  double s1 = 0, s2 = 0;
  for (int64_t b = 0; b < g.N; ++b) {
    if (b + 1 < g.N) prefetch_row(x + ((b + 1) * g.C + c) * g.S, g.S);
    row_shifted_sums<scalar_t, acc_t>(x + (b * g.C + c) * g.S, g.S, shift, s1, s2);
  }
  const Welford<double> w = welford_from_shifted<double>(double(n), s1, s2, double(shift));
  mean[c] = static_cast<acc_t>(w.mean);
  var[c] = static_cast<acc_t>(welford_var(w));
}

template <bool RELU, typename scalar_t, typename acc_t>
inline void nchw_channel_grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g, int64_t c,
                                   const FwdCoef<acc_t> k, acc_t* sum_dz, acc_t* sum_dz_xmu) {
  double a = 0, b = 0;
  for (int64_t i = 0; i < g.N; ++i) {
    const int64_t off = (i * g.C + c) * g.S;
    if (i + 1 < g.N) {
      prefetch_row(x + off + g.C * g.S, g.S);
      prefetch_row(dy + off + g.C * g.S, g.S);
    }
    row_grad_sums<RELU, scalar_t, acc_t>(dy + off, x + off, g.S, k, a, b);
  }
  sum_dz[c] = static_cast<acc_t>(a);
  sum_dz_xmu[c] = static_cast<acc_t>(b);
}

// ---------------------------------------------------------------- channels_last rows (NHWC)

// Partial shifted sums of rows [r0, r1) into d1/d2 (size C, double).
template <typename scalar_t, typename acc_t>
void nhwc_shifted_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, const acc_t* shift, double* d1,
                       double* d2) {
  std::vector<acc_t> a1(C), a2(C);
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    std::fill(a1.begin(), a1.end(), acc_t(0));
    std::fill(a2.begin(), a2.end(), acc_t(0));
    acc_t* A1 = a1.data();
    acc_t* A2 = a2.data();
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* row = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
        A1[c] += d;
        A2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      d1[c] += A1[c];
      d2[c] += A2[c];
    }
  }
}

template <bool RELU, typename scalar_t, typename acc_t>
void nhwc_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
                    const ChannelCoefs<acc_t>& k, double* d1, double* d2) {
  std::vector<acc_t> a1(C), a2(C);
  const acc_t* M = k.mean.data();
  const acc_t* AL = k.alpha.data();
  const acc_t* BE = k.beta.data();
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    std::fill(a1.begin(), a1.end(), acc_t(0));
    std::fill(a2.begin(), a2.end(), acc_t(0));
    acc_t* A1 = a1.data();
    acc_t* A2 = a2.data();
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* xr = x + r * C;
      const scalar_t* gr = dy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const FwdCoef<acc_t> f{M[c], AL[c], BE[c]};
        const acc_t xv = static_cast<acc_t>(xr[c]);
        const acc_t dz = relu_grad(static_cast<acc_t>(gr[c]), bn_pre(xv, f), RELU);
        A1[c] += dz;
        A2[c] += dz * (xv - M[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      d1[c] += A1[c];
      d2[c] += A2[c];
    }
  }
}

// Splits M rows into tasks, runs fn(task, r0, r1, d1, d2) in parallel with per-task double
// arrays of size C, and returns the per-channel totals (deterministic for a thread count).
template <typename Fn>
void nhwc_reduce(int64_t M, int64_t C, std::vector<double>& t1, std::vector<double>& t2, const Fn& fn) {
  const int64_t max_tasks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ntask = std::max<int64_t>(1, std::min<int64_t>(max_tasks, M / kRowBlock));
  std::vector<double> part(static_cast<size_t>(ntask * 2 * C), 0.0);
  at::parallel_for(0, ntask, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = M * t / ntask, r1 = M * (t + 1) / ntask;
      fn(r0, r1, part.data() + t * 2 * C, part.data() + t * 2 * C + C);
    }
  });
  t1.assign(C, 0.0);
  t2.assign(C, 0.0);
  for (int64_t t = 0; t < ntask; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      t1[c] += part[t * 2 * C + c];
      t2[c] += part[t * 2 * C + C + c];
    }
  }
}

template <typename scalar_t, typename acc_t>
void nhwc_stats(const scalar_t* x, const Geometry& g, acc_t* mean, acc_t* var) {
  const int64_t C = g.C, M = g.count();
  if (M == 0) {
    std::fill(mean, mean + C, acc_t(0));
    std::fill(var, var + C, acc_t(0));
    return;
  }
  std::vector<acc_t> shift(x, x + C);  // row 0 (converted to acc_t)
  std::vector<double> s1, s2;
  nhwc_reduce(M, C, s1, s2, [&](int64_t r0, int64_t r1, double* d1, double* d2) {
    nhwc_shifted_sums<scalar_t, acc_t>(x, C, r0, r1, shift.data(), d1, d2);
  });
  for (int64_t c = 0; c < C; ++c) {
    const Welford<double> w = welford_from_shifted<double>(double(M), s1[c], s2[c], double(shift[c]));
    mean[c] = static_cast<acc_t>(w.mean);
    var[c] = static_cast<acc_t>(welford_var(w));
  }
}

template <bool RELU, typename scalar_t, typename acc_t>
void nhwc_apply(const scalar_t* x, scalar_t* y, const Geometry& g, const ChannelCoefs<acc_t>& k) {
  const int64_t C = g.C;
  const acc_t* M = k.mean.data();
  const acc_t* AL = k.alpha.data();
  const acc_t* BE = k.beta.data();
  at::parallel_for(0, g.count(), std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                   [&](int64_t rb, int64_t re) {
                     for (int64_t r = rb; r < re; ++r) {
                       const scalar_t* xr = x + r * C;
                       scalar_t* yr = y + r * C;
#pragma omp simd
                       for (int64_t c = 0; c < C; ++c) {
                         const FwdCoef<acc_t> f{M[c], AL[c], BE[c]};
                         yr[c] = static_cast<scalar_t>(relu_if(bn_pre(static_cast<acc_t>(xr[c]), f), RELU));
                       }
                     }
                   });
}

template <bool RELU, typename scalar_t, typename acc_t>
void nhwc_dx(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, const ChannelCoefs<acc_t>& k,
             const std::vector<acc_t>& k1, const std::vector<acc_t>& k2, const std::vector<acc_t>& k3) {
  const int64_t C = g.C;
  const acc_t* M = k.mean.data();
  const acc_t* AL = k.alpha.data();
  const acc_t* BE = k.beta.data();
  const acc_t* K1 = k1.data();
  const acc_t* K2 = k2.data();
  const acc_t* K3 = k3.data();
  at::parallel_for(0, g.count(), std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                   [&](int64_t rb, int64_t re) {
                     for (int64_t r = rb; r < re; ++r) {
                       const scalar_t* xr = x + r * C;
                       const scalar_t* gr = dy + r * C;
                       scalar_t* dr = dx + r * C;
#pragma omp simd
                       for (int64_t c = 0; c < C; ++c) {
                         const FwdCoef<acc_t> f{M[c], AL[c], BE[c]};
                         const BwdCoef<acc_t> b{K1[c], K2[c], K3[c]};
                         const acc_t xv = static_cast<acc_t>(xr[c]);
                         const acc_t dz = relu_grad(static_cast<acc_t>(gr[c]), bn_pre(xv, f), RELU);
                         dr[c] = static_cast<scalar_t>(bn_dx(dz, xv - M[c], b));
                       }
                     }
                   });
}

// ---------------------------------------------------------------- per-op drivers

template <bool RELU, typename scalar_t, typename acc_t>
void apply_impl(const scalar_t* x, scalar_t* y, const Geometry& g, const Params& p) {
  if (g.nhwc) {
    nhwc_apply<RELU>(x, y, g, make_coefs<acc_t>(p, g.C));
    return;
  }
  const int64_t rows = g.N * g.C;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.S, 1)),
                   [&](int64_t rb, int64_t re) {
                     for (int64_t r = rb; r < re; ++r) {
                       const FwdCoef<acc_t> k = coef_of<acc_t>(p, r % g.C);
                       row_apply<RELU>(x + r * g.S, y + r * g.S, g.S, k);
                     }
                   });
}

template <bool RELU, typename scalar_t, typename acc_t>
void train_impl(const scalar_t* x, scalar_t* y, const Geometry& g, const Params& p) {
  acc_t* mean = p.mean.data_ptr<acc_t>();
  acc_t* var = p.var.data_ptr<acc_t>();
  if (g.nhwc) {
    nhwc_stats<scalar_t, acc_t>(x, g, mean, var);
    nhwc_apply<RELU>(x, y, g, make_coefs<acc_t>(p, g.C));
    return;
  }
  at::parallel_for(0, g.C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      nchw_channel_stats<scalar_t, acc_t>(x, g, c, mean, var);
      const FwdCoef<acc_t> k = coef_of<acc_t>(p, c);
      for (int64_t i = 0; i < g.N; ++i) {
        const int64_t off = (i * g.C + c) * g.S;
        row_apply<RELU>(x + off, y + off, g.S, k);
      }
    }
  });
}

template <bool RELU, typename scalar_t, typename acc_t>
void reduce_impl(const scalar_t* dy, const scalar_t* x, const Geometry& g, const Params& p, acc_t* sum_dz,
                 acc_t* sum_dz_xmu) {
  if (g.nhwc) {
    const ChannelCoefs<acc_t> k = make_coefs<acc_t>(p, g.C);
    std::vector<double> t1, t2;
    nhwc_reduce(g.count(), g.C, t1, t2, [&](int64_t r0, int64_t r1, double* d1, double* d2) {
      nhwc_grad_sums<RELU, scalar_t, acc_t>(dy, x, g.C, r0, r1, k, d1, d2);
    });
    for (int64_t c = 0; c < g.C; ++c) {
      sum_dz[c] = static_cast<acc_t>(t1[c]);
      sum_dz_xmu[c] = static_cast<acc_t>(t2[c]);
    }
    return;
  }
  at::parallel_for(0, g.C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      nchw_channel_grad_sums<RELU, scalar_t, acc_t>(dy, x, g, c, coef_of<acc_t>(p, c), sum_dz, sum_dz_xmu);
    }
  });
}

template <typename acc_t>
BwdCoef<acc_t> bwd_coef_of(const Params& p, int64_t c, acc_t sdz, acc_t sdzx, acc_t inv_count) {
  const acc_t* w = p.weight.defined() ? p.weight.data_ptr<acc_t>() : nullptr;
  return bwd_coef<acc_t>(p.var.data_ptr<acc_t>()[c], w, c, static_cast<acc_t>(p.eps), sdz, sdzx, inv_count);
}

template <bool RELU, typename scalar_t, typename acc_t>
void elemt_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, const Params& p,
                const acc_t* sum_dz, const acc_t* sum_dz_xmu, acc_t inv_count) {
  if (g.nhwc) {
    std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const BwdCoef<acc_t> b = bwd_coef_of<acc_t>(p, c, sum_dz[c], sum_dz_xmu[c], inv_count);
      k1[c] = b.k1;
      k2[c] = b.k2;
      k3[c] = b.k3;
    }
    nhwc_dx<RELU>(dy, x, dx, g, make_coefs<acc_t>(p, g.C), k1, k2, k3);
    return;
  }
  const int64_t rows = g.N * g.C;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.S, 1)),
                   [&](int64_t rb, int64_t re) {
                     for (int64_t r = rb; r < re; ++r) {
                       const int64_t c = r % g.C;
                       const BwdCoef<acc_t> b = bwd_coef_of<acc_t>(p, c, sum_dz[c], sum_dz_xmu[c], inv_count);
                       row_dx<RELU>(dy + r * g.S, x + r * g.S, dx + r * g.S, g.S, coef_of<acc_t>(p, c), b);
                     }
                   });
}

template <bool RELU, typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g, const Params& p,
                   acc_t* sum_dz, acc_t* sum_dz_xmu) {
  const acc_t inv_count = g.count() > 0 ? acc_t(1) / static_cast<acc_t>(g.count()) : acc_t(0);
  if (g.nhwc) {
    reduce_impl<RELU, scalar_t, acc_t>(dy, x, g, p, sum_dz, sum_dz_xmu);
    elemt_impl<RELU, scalar_t, acc_t>(dy, x, dx, g, p, sum_dz, sum_dz_xmu, inv_count);
    return;
  }
  at::parallel_for(0, g.C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const FwdCoef<acc_t> k = coef_of<acc_t>(p, c);
      nchw_channel_grad_sums<RELU, scalar_t, acc_t>(dy, x, g, c, k, sum_dz, sum_dz_xmu);
      const BwdCoef<acc_t> b = bwd_coef_of<acc_t>(p, c, sum_dz[c], sum_dz_xmu[c], inv_count);
      for (int64_t i = 0; i < g.N; ++i) {
        const int64_t off = (i * g.C + c) * g.S;
        row_dx<RELU>(dy + off, x + off, dx + off, g.S, k, b);
      }
    }
  });
}

#define CBR_DISPATCH(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

inline void stats_kernel(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var) {
  CBR_DISPATCH(x, "fastnn::bn_relu_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* v = var.data_ptr<acc_t>();
    if (g.nhwc) {
      nhwc_stats<scalar_t, acc_t>(xp, g, m, v);
    } else {
      at::parallel_for(0, g.C, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) nchw_channel_stats<scalar_t, acc_t>(xp, g, c, m, v);
      });
    }
  });
}

inline void apply_kernel(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  CBR_DISPATCH(x, "fastnn::bn_relu_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (p.relu) {
      apply_impl<true, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, p);
    } else {
      apply_impl<false, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, p);
    }
  });
}

inline void train_kernel(const at::Tensor& x, const Geometry& g, const Params& p, const at::Tensor& y) {
  CBR_DISPATCH(x, "fastnn::bn_relu_train", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (p.relu) {
      train_impl<true, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, p);
    } else {
      train_impl<false, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, p);
    }
  });
}

inline void backward_reduce_kernel(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu) {
  CBR_DISPATCH(x, "fastnn::bn_relu_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (p.relu) {
      reduce_impl<true, scalar_t, acc_t>(gp, xp, g, p, sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>());
    } else {
      reduce_impl<false, scalar_t, acc_t>(gp, xp, g, p, sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>());
    }
  });
}

inline void backward_elemt_kernel(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                        const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu, double inv_count,
                        const at::Tensor& dx) {
  CBR_DISPATCH(x, "fastnn::bn_relu_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const acc_t* s1 = sum_dz.const_data_ptr<acc_t>();
    const acc_t* s2 = sum_dz_xmu.const_data_ptr<acc_t>();
    if (p.relu) {
      elemt_impl<true, scalar_t, acc_t>(gp, xp, dp, g, p, s1, s2, static_cast<acc_t>(inv_count));
    } else {
      elemt_impl<false, scalar_t, acc_t>(gp, xp, dp, g, p, s1, s2, static_cast<acc_t>(inv_count));
    }
  });
}

inline void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const Params& p,
                  const at::Tensor& dx, const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                  const at::Tensor& grad_weight) {
  CBR_DISPATCH(x, "fastnn::bn_relu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (p.relu) {
      backward_impl<true, scalar_t, acc_t>(gp, xp, dp, g, p, sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>());
    } else {
      backward_impl<false, scalar_t, acc_t>(gp, xp, dp, g, p, sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>());
    }
    const acc_t* var = p.var.const_data_ptr<acc_t>();
    const acc_t* s2 = sum_dz_xmu.const_data_ptr<acc_t>();
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) gw[c] = s2[c] * bn_invstd(var[c], static_cast<acc_t>(p.eps));
  });
}


#undef CBR_DISPATCH
