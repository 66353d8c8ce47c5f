// DropBlock CPU kernels (OpenMP through at::parallel_for).
//
// Seeds: each seed plane (one per (n, c), or per n when channels are coupled) has its own
// counter-based stream keyed by (seed, plane), so the result does not depend on the thread
// count or the memory layout. Seeds are Bernoulli(gamma) over the seed grid; we draw the gaps
// between them (geometric), which costs O(#seeds) instead of O(#positions).
// Blocks: sparse planes paint each seed's (clipped) block; dense ones run a separable
// sliding-window OR, O(D*H*W) whatever the density.
// Apply: one pass over memory reading the bit mask.
#include "drop_block/cpu/drop_block_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "drop_block/drop_block_math.h"

namespace fastnn {
namespace drop_block {

namespace {

constexpr uint64_t kSeedSalt = 1;
constexpr uint64_t kNoiseSalt = 2;

struct Range {
  int64_t lo, n;  // valid seed positions along an axis: [lo, lo + n)
};

Range seed_range(int64_t size, int k, bool valid_only) {
  if (!valid_only) return {0, size};
  // a block around s covers [s - after(k), s + before(k)]; it fits when both ends are inside
  return {after(k), size - k + 1};
}

// Calls f(d, h, w) for each seed of plane `key`, in increasing position order.
template <class F>
void for_each_seed(const Geometry& g, uint64_t seed, int64_t key, double gamma, F&& f) {
  const Range rd = seed_range(g.D, g.kd, g.valid_only), rh = seed_range(g.H, g.kh, g.valid_only),
              rw = seed_range(g.W, g.kw, g.valid_only);
  const int64_t R = rd.n * rh.n * rw.n;
  if (R <= 0 || !(gamma > 0.0)) return;
  auto emit = [&](int64_t pos) {
    const int64_t w = pos % rw.n, t = pos / rw.n;
    f(rd.lo + t / rh.n, rh.lo + t % rh.n, rw.lo + w);
  };
  if (gamma >= 1.0) {
    for (int64_t p = 0; p < R; ++p) emit(p);
    return;
  }
  const uint64_t k = stream_key(seed, static_cast<uint64_t>(key), kSeedSalt);
  const double inv_log1m = 1.0 / std::log1p(-gamma);  // < 0
  int64_t pos = -1;
  uint64_t ctr = 0;
  for (;;) {
    // P(gap >= j) = (1 - gamma)^j: the number of non-seeds before the next seed
    const double gap = std::floor(std::log(unit_open0(mix64(k + (++ctr) * kGolden))) * inv_log1m);
    if (!(gap < static_cast<double>(R - 1 - pos))) break;  // also stops on NaN
    pos += 1 + static_cast<int64_t>(gap);
    emit(pos);
  }
}

// out[i] = any(in[s] for s in [i - lo, i + hi]) along one axis, for all lines.
void dilate_axis(uint8_t* buf, int64_t nouter, int64_t L, int64_t ninner, int lo, int hi, uint8_t* tmp) {
  if (lo == 0 && hi == 0) return;
  for (int64_t a = 0; a < nouter; ++a) {
    for (int64_t b = 0; b < ninner; ++b) {
      uint8_t* line = buf + a * L * ninner + b;
      for (int64_t i = 0; i < L; ++i) tmp[i] = line[i * ninner];
      int64_t cnt = 0;
      for (int64_t i = 0; i <= std::min<int64_t>(hi, L - 1); ++i) cnt += tmp[i];
      for (int64_t i = 0; i < L; ++i) {
        line[i * ninner] = cnt > 0;
        if (i + hi + 1 < L) cnt += tmp[i + hi + 1];
        if (i - lo >= 0) cnt -= tmp[i - lo];
      }
    }
  }
}

struct PlaneWork {
  std::vector<int64_t> seeds;  // d, h, w triples
  std::vector<uint8_t> tmp;
};

// drop[0 .. D*H*W) = 1 where plane `key` is dropped; returns the number dropped.
int64_t plane_mask(const Geometry& g, uint64_t seed, int64_t key, double gamma, uint8_t* drop, PlaneWork& w) {
  const int64_t plane = g.D * g.H * g.W;
  w.seeds.clear();
  for_each_seed(g, seed, key, gamma, [&](int64_t d, int64_t h, int64_t x) {
    w.seeds.push_back(d);
    w.seeds.push_back(h);
    w.seeds.push_back(x);
  });
  std::memset(drop, 0, plane);
  const int64_t nseeds = static_cast<int64_t>(w.seeds.size() / 3);
  if (nseeds == 0) return 0;
  const int64_t block = static_cast<int64_t>(g.kd) * g.kh * g.kw;
  if (nseeds * block <= 2 * plane) {
    // sparse: paint each clipped block
    for (int64_t i = 0; i < nseeds; ++i) {
      const int64_t d = w.seeds[3 * i], h = w.seeds[3 * i + 1], x = w.seeds[3 * i + 2];
      const int64_t d0 = std::max<int64_t>(0, d - after(g.kd)), d1 = std::min<int64_t>(g.D - 1, d + before(g.kd));
      const int64_t h0 = std::max<int64_t>(0, h - after(g.kh)), h1 = std::min<int64_t>(g.H - 1, h + before(g.kh));
      const int64_t x0 = std::max<int64_t>(0, x - after(g.kw)), x1 = std::min<int64_t>(g.W - 1, x + before(g.kw));
      for (int64_t dd = d0; dd <= d1; ++dd)
        for (int64_t hh = h0; hh <= h1; ++hh) std::memset(drop + (dd * g.H + hh) * g.W + x0, 1, x1 - x0 + 1);
    }
  } else {
    // dense: mark the seeds, then a separable sliding-window OR per axis
    for (int64_t i = 0; i < nseeds; ++i)
      drop[(w.seeds[3 * i] * g.H + w.seeds[3 * i + 1]) * g.W + w.seeds[3 * i + 2]] = 1;
    w.tmp.resize(std::max({g.D, g.H, g.W}));
    dilate_axis(drop, g.D * g.H, g.W, 1, before(g.kw), after(g.kw), w.tmp.data());
    dilate_axis(drop, g.D, g.H, g.W, before(g.kh), after(g.kh), w.tmp.data());
    dilate_axis(drop, 1, g.D, g.H * g.W, before(g.kd), after(g.kd), w.tmp.data());
  }
  int64_t n = 0;
  for (int64_t i = 0; i < plane; ++i) n += drop[i];
  return n;
}

}  // namespace

Geometry make_geometry(const at::Tensor& x, c10::IntArrayRef block, bool couple_channels, bool valid_only,
                       bool channels_last) {
  Geometry g;
  const int64_t nd = x.dim() - 2;
  g.N = x.size(0);
  g.C = x.size(1);
  g.D = nd >= 3 ? x.size(2) : 1;
  g.H = nd >= 2 ? x.size(x.dim() - 2) : 1;
  g.W = x.size(x.dim() - 1);
  g.kd = nd >= 3 ? static_cast<int>(block[0]) : 1;
  g.kh = nd >= 2 ? static_cast<int>(block[nd - 2]) : 1;
  g.kw = static_cast<int>(block[nd - 1]);
  g.couple = couple_channels;
  g.valid_only = valid_only;
  g.channels_last = channels_last;
  g.inner = channels_last ? g.C : g.W;
  g.outer = channels_last ? g.N * g.D * g.H * g.W : g.N * g.C * g.D * g.H;
  g.nb = (g.inner + 7) / 8;
  return g;
}

int64_t build_mask_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask) {
  const int64_t plane = g.D * g.H * g.W;
  std::atomic<int64_t> dropped{0};
  auto key_of = [&](int64_t n, int64_t c) { return g.couple ? n : n * g.C + c; };
  if (!g.channels_last) {
    // one task per (n, c) plane; the plane's rows are mask rows [(n*C + c)*D*H, +D*H)
    const int64_t nplanes = g.N * g.C;
    const uint8_t last = static_cast<uint8_t>(g.W % 8 == 0 ? 0xFF : (1u << (g.W % 8)) - 1);
    at::parallel_for(0, nplanes, std::max<int64_t>(1, 4096 / std::max<int64_t>(plane, 1)), [&](int64_t b, int64_t e) {
      PlaneWork w;
      std::vector<uint8_t> drop(plane);
      int64_t prev_key = -1, prev_n = 0, local = 0;
      for (int64_t p = b; p < e; ++p) {
        const int64_t key = key_of(p / g.C, p % g.C);
        if (key != prev_key) {  // coupled channels share the plane just built
          prev_n = plane_mask(g, seed, key, gamma, drop.data(), w);
          prev_key = key;
        }
        if (!g.couple || p % g.C == 0) local += prev_n;  // count each seed plane once
        uint8_t* out = mask + p * g.D * g.H * g.nb;
        if (prev_n == 0) {
          for (int64_t r = 0; r < g.D * g.H; ++r) {
            std::memset(out + r * g.nb, 0xFF, g.nb - 1);
            out[r * g.nb + g.nb - 1] = last;
          }
          continue;
        }
        for (int64_t r = 0; r < g.D * g.H; ++r) {
          const uint8_t* dr = drop.data() + r * g.W;
          uint8_t* mr = out + r * g.nb;
          for (int64_t jb = 0; jb < g.nb; ++jb) {
            const int64_t j0 = jb * 8, j1 = std::min<int64_t>(g.W, j0 + 8);
            unsigned byte = 0;
            for (int64_t j = j0; j < j1; ++j) byte |= static_cast<unsigned>(dr[j] == 0) << (j - j0);
            mr[jb] = static_cast<uint8_t>(byte);
          }
        }
      }
      dropped += local;
    });
  } else {
    // one task per (n, group of 8 channels) = one byte column of the mask
    const int64_t units = g.N * g.nb;
    at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
      PlaneWork w;
      std::vector<uint8_t> drop(8 * plane);
      int64_t local = 0, prev_key = -1, prev_cnt = 0;
      for (int64_t u = b; u < e; ++u) {
        const int64_t n = u / g.nb, cb = u % g.nb, c0 = cb * 8, nc = std::min<int64_t>(8, g.C - c0);
        uint8_t* out = mask + n * plane * g.nb + cb;
        if (g.couple) {
          if (n != prev_key) {
            prev_cnt = plane_mask(g, seed, n, gamma, drop.data(), w);
            prev_key = n;
          }
          if (cb == 0) local += prev_cnt;  // count each seed plane once
          const uint8_t all = static_cast<uint8_t>((1u << nc) - 1);
          for (int64_t s = 0; s < plane; ++s) out[s * g.nb] = drop[s] ? 0 : all;
        } else {
          for (int64_t k = 0; k < nc; ++k)
            local += plane_mask(g, seed, n * g.C + c0 + k, gamma, drop.data() + k * plane, w);
          for (int64_t s = 0; s < plane; ++s) {
            unsigned byte = 0;
            for (int64_t k = 0; k < nc; ++k) byte |= static_cast<unsigned>(drop[k * plane + s] == 0) << k;
            out[s * g.nb] = static_cast<uint8_t>(byte);
          }
        }
      }
      dropped += local;
    });
  }
  return dropped.load();
}

namespace {

template <typename scalar_t>
void apply_rows(const scalar_t* src, scalar_t* dst, const uint8_t* mask, int64_t outer, int64_t inner, int64_t nb,
                float s, bool noise, uint64_t noise_key) {
  using opmath_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const opmath_t sc = static_cast<opmath_t>(s);
  const int64_t full = inner / 8;
  at::parallel_for(0, outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const scalar_t* x = src + o * inner;
      scalar_t* y = dst + o * inner;
      const uint8_t* m = mask + o * nb;
      if (!noise) {
        for (int64_t jb = 0; jb < full; ++jb) {
          const unsigned byte = m[jb];
          // fixed trip count: the compiler unrolls and vectorizes this
          for (int k = 0; k < 8; ++k) {
            const opmath_t mult = static_cast<opmath_t>((byte >> k) & 1u) * sc;
            y[jb * 8 + k] = static_cast<scalar_t>(static_cast<opmath_t>(x[jb * 8 + k]) * mult);
          }
        }
        for (int64_t j = full * 8; j < inner; ++j) {
          const opmath_t mult = static_cast<opmath_t>((m[j >> 3] >> (j & 7)) & 1u) * sc;
          y[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) * mult);
        }
      } else {
        // timm: x * keep + noise * (1 - keep), no rescaling
        for (int64_t j = 0; j < inner; ++j) {
          const bool keep = (m[j >> 3] >> (j & 7)) & 1u;
          const opmath_t xv = static_cast<opmath_t>(x[j]);
          if (keep) {
            y[j] = static_cast<scalar_t>(xv);
          } else {
            const uint64_t idx = static_cast<uint64_t>(o * inner + j);
            const opmath_t z = static_cast<opmath_t>(normal_from_bits(mix64(noise_key + (idx + 1) * kGolden)));
            y[j] = static_cast<scalar_t>(xv * opmath_t(0) + z);
          }
        }
      }
    }
  });
}

}  // namespace

void apply_mask_cpu(const Geometry& g, const at::Tensor& src, const at::Tensor& dst, const uint8_t* mask,
                    int64_t units, int64_t dropped, bool scale, bool noise, uint64_t seed) {
  const float s = (scale && !noise) ? keep_scale(units, dropped) : 1.0f;
  const uint64_t noise_key = stream_key(seed, 0, kNoiseSalt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "drop_block_apply_cpu", [&] {
    apply_rows<scalar_t>(src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), mask, g.outer, g.inner,
                         g.nb, s, noise, noise_key);
  });
}

void seeds_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* out) {
  const int64_t plane = g.D * g.H * g.W;
  const int64_t nplanes = g.N * (g.couple ? 1 : g.C);
  at::parallel_for(0, nplanes, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      uint8_t* o = out + p * plane;
      std::memset(o, 0, plane);
      for_each_seed(g, seed, p, gamma, [&](int64_t d, int64_t h, int64_t w) { o[(d * g.H + h) * g.W + w] = 1; });
    }
  });
}

}  // namespace drop_block
}  // namespace fastnn
