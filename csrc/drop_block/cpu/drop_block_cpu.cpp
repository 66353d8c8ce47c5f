// DropBlock CPU kernels (OpenMP: at::parallel_for, and one two-phase region for the forward).
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
#ifdef _OPENMP
#include <omp.h>
#endif
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
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

// Packs 8 bytes of 0/1 (drop flags) into the keep bits of one mask byte (bit k = !byte k).
inline uint8_t pack_keep8(const uint8_t* drop) {
  uint64_t v;
  std::memcpy(&v, drop, 8);
  v ^= 0x0101010101010101ULL;
  return static_cast<uint8_t>((v * 0x0102040810204080ULL) >> 56);  // bit k <- byte k (little endian)
}

// Clears bits [x0, x1] of a bit row (bit j of byte j / 8 is unit j).
inline void clear_bits(uint8_t* row, int64_t x0, int64_t x1) {
  const int64_t b0 = x0 >> 3, b1 = x1 >> 3;
  const unsigned lo = 0xFFu << (x0 & 7), hi = 0xFFu >> (7 - (x1 & 7));
  if (b0 == b1) {
    row[b0] &= static_cast<uint8_t>(~(lo & hi));
    return;
  }
  row[b0] &= static_cast<uint8_t>(~lo);
  if (b1 > b0 + 1) std::memset(row + b0 + 1, 0, b1 - b0 - 1);
  row[b1] &= static_cast<uint8_t>(~hi);
}

inline int64_t popcount_bytes(const uint8_t* p, int64_t n) {
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    c += __builtin_popcountll(v);
  }
  for (; i < n; ++i) c += __builtin_popcount(p[i]);
  return c;
}

struct PlaneWork {
  std::vector<int64_t> seeds;  // d, h, w triples
  std::vector<uint8_t> tmp, drop;
};

void draw_plane(const Geometry& g, uint64_t seed, int64_t key, double gamma, PlaneWork& w) {
  w.seeds.clear();
  for_each_seed(g, seed, key, gamma, [&](int64_t d, int64_t h, int64_t x) {
    w.seeds.push_back(d);
    w.seeds.push_back(h);
    w.seeds.push_back(x);
  });
}

// Painting costs ~#seeds * block; the separable pass ~3 * plane.
bool sparse_plane(const Geometry& g, const PlaneWork& w) {
  const int64_t nseeds = static_cast<int64_t>(w.seeds.size() / 3);
  return nseeds * static_cast<int64_t>(g.kd) * g.kh * g.kw <= 2 * g.D * g.H * g.W;
}

// drop[0 .. D*H*W) = 1 where plane `key` is dropped; returns the number dropped.
// (the seeds are in w.seeds, from draw_plane)
int64_t plane_mask(const Geometry& g, uint8_t* drop, PlaneWork& w) {
  const int64_t plane = g.D * g.H * g.W;
  std::memset(drop, 0, plane);
  const int64_t nseeds = static_cast<int64_t>(w.seeds.size() / 3);
  if (nseeds == 0) return 0;
  if (sparse_plane(g, w)) {
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

namespace {

// Tasks of the mask build: (n, c) planes (contiguous) or (n, 8-channel group) byte columns.
int64_t mask_tasks(const Geometry& g) { return g.channels_last ? g.N * g.nb : g.N * g.C; }

// Builds the mask of tasks [b, e) (serial); returns their dropped count.
int64_t build_mask_range(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask, int64_t b, int64_t e) {
  const int64_t plane = g.D * g.H * g.W;
  int64_t dropped = 0;
  auto key_of = [&](int64_t n, int64_t c) { return g.couple ? n : n * g.C + c; };
  if (!g.channels_last) {
    // one task per (n, c) plane; its rows are mask rows [(n*C + c)*D*H, +D*H). Sparse planes
    // clear their blocks' bits straight in the mask rows; dense ones go through a byte plane.
    const int64_t rows = g.D * g.H, bytes = rows * g.nb;
    const uint8_t last = static_cast<uint8_t>(g.W % 8 == 0 ? 0xFF : (1u << (g.W % 8)) - 1);
    {
      PlaneWork w;
      const uint8_t* prev = nullptr;
      int64_t prev_key = -1, prev_n = 0, local = 0;
      for (int64_t p = b; p < e; ++p) {
        const int64_t key = key_of(p / g.C, p % g.C);
        uint8_t* out = mask + p * bytes;
        if (key == prev_key) {  // coupled channels: copy the plane just built
          std::memcpy(out, prev, bytes);
        } else {
          draw_plane(g, seed, key, gamma, w);
          for (int64_t r = 0; r < rows; ++r) {
            std::memset(out + r * g.nb, 0xFF, g.nb - 1);
            out[r * g.nb + g.nb - 1] = last;
          }
          const int64_t nseeds = static_cast<int64_t>(w.seeds.size() / 3);
          if (nseeds == 0) {
            prev_n = 0;
          } else if (sparse_plane(g, w)) {
            for (int64_t i = 0; i < nseeds; ++i) {
              const int64_t d = w.seeds[3 * i], h = w.seeds[3 * i + 1], x = w.seeds[3 * i + 2];
              const int64_t d0 = std::max<int64_t>(0, d - after(g.kd)), d1 = std::min<int64_t>(g.D - 1, d + before(g.kd));
              const int64_t h0 = std::max<int64_t>(0, h - after(g.kh)), h1 = std::min<int64_t>(g.H - 1, h + before(g.kh));
              const int64_t x0 = std::max<int64_t>(0, x - after(g.kw)), x1 = std::min<int64_t>(g.W - 1, x + before(g.kw));
              for (int64_t dd = d0; dd <= d1; ++dd)
                for (int64_t hh = h0; hh <= h1; ++hh) clear_bits(out + (dd * g.H + hh) * g.nb, x0, x1);
            }
            prev_n = plane - popcount_bytes(out, bytes);
          } else {
            w.drop.resize(plane + 8);
            uint8_t* drop = w.drop.data();
            prev_n = plane_mask(g, drop, w);
            std::memset(drop + plane, 0, 8);
            for (int64_t r = 0; r < rows; ++r) {
              const uint8_t* dr = drop + r * g.W;
              uint8_t* mr = out + r * g.nb;
              for (int64_t jb = 0; jb < g.nb; ++jb) mr[jb] = pack_keep8(dr + jb * 8);
              mr[g.nb - 1] &= last;  // bits past W (read from the next row) are padding
            }
          }
          prev = out;
          prev_key = key;
        }
        if (!g.couple || p % g.C == 0) local += prev_n;  // count each seed plane once
      }
      dropped += local;
    }
  } else {
    // one task per (n, group of 8 channels) = one byte column of the mask
    {
      PlaneWork w;
      std::vector<uint8_t> drop(8 * plane);
      int64_t local = 0, prev_key = -1, prev_cnt = 0;
      for (int64_t u = b; u < e; ++u) {
        const int64_t n = u / g.nb, cb = u % g.nb, c0 = cb * 8, nc = std::min<int64_t>(8, g.C - c0);
        uint8_t* out = mask + n * plane * g.nb + cb;
        if (g.couple) {
          if (n != prev_key) {
            draw_plane(g, seed, n, gamma, w);
            prev_cnt = plane_mask(g, drop.data(), w);
            prev_key = n;
          }
          if (cb == 0) local += prev_cnt;  // count each seed plane once
          const uint8_t all = static_cast<uint8_t>((1u << nc) - 1);
          for (int64_t s = 0; s < plane; ++s) out[s * g.nb] = drop[s] ? 0 : all;
        } else {
          for (int64_t k = 0; k < nc; ++k) {
            draw_plane(g, seed, n * g.C + c0 + k, gamma, w);
            local += plane_mask(g, drop.data() + k * plane, w);
          }
          for (int64_t s = 0; s < plane; ++s) {
            unsigned byte = 0;
            for (int64_t k = 0; k < nc; ++k) byte |= static_cast<unsigned>(drop[k * plane + s] == 0) << k;
            out[s * g.nb] = static_cast<uint8_t>(byte);
          }
        }
      }
      dropped += local;
    }
  }
  return dropped;
}

// Splits [0, n) evenly over the threads of a parallel region.
std::pair<int64_t, int64_t> share(int64_t n, int t, int nt) {
  const int64_t c = (n + nt - 1) / nt;
  return {std::min(n, t * c), std::min(n, (t + 1) * c)};
}

// Runs fa over [0, na), then (after all of it) fb over [0, nb), in ONE OpenMP region: the
// forward's mask build and apply share a region (a region costs a thread wake-up, which is
// slow when another process holds the core). Serial for small work or nested calls.
template <class FA, class FB>
void two_phase(int64_t na, int64_t nb, int64_t work, FA&& fa, FB&& fb) {
  const int nt = at::get_num_threads();
  if (nt <= 1 || work < 32768 || at::in_parallel_region()) {
    fa(0, na);
    fb(0, nb);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const auto a = share(na, t, T);
    if (a.first < a.second) fa(a.first, a.second);
#pragma omp barrier
    const auto b = share(nb, t, T);
    if (b.first < b.second) fb(b.first, b.second);
  }
#else
  fa(0, na);
  fb(0, nb);
#endif
}

}  // namespace

int64_t build_mask_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask) {
  const int64_t tasks = mask_tasks(g);
  std::atomic<int64_t> dropped{0};
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) { dropped += build_mask_range(g, seed, gamma, mask, b, e); });
  return dropped.load();
}

namespace {

// The noise of unit (o, j) is keyed by its index in the seed-plane grid (N, C or 1, D, H, W):
// the same for either layout, and shared by coupled channels (timm draws it with the mask's shape).
int64_t noise_index(const Geometry& g, int64_t o, int64_t j) {
  const int64_t sp = g.D * g.H * g.W;
  if (!g.channels_last) {
    if (!g.couple) return o * g.W + j;
    const int64_t n = o / (g.C * g.D * g.H), dh = o % (g.D * g.H);
    return (n * g.D * g.H + dh) * g.W + j;
  }
  if (g.couple) return o;
  const int64_t n = o / sp, s = o % sp;
  return (n * g.C + j) * sp + s;
}

template <typename opmath_t>
struct Lut {
  // lut[byte] = the 8 multipliers of a mask byte: the inner loop becomes a plain vector multiply
  alignas(64) opmath_t v[256][8];
  explicit Lut(float s) {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> k) & 1) ? static_cast<opmath_t>(s) : opmath_t(0);
  }
};

template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// dst rows [o0, o1) = src * keep * s (serial), or with noise in the dropped units.
template <typename scalar_t>
void apply_range(const Geometry& g, const scalar_t* src, scalar_t* dst, const uint8_t* mask,
                 const Lut<opmath_of<scalar_t>>& lut, bool noise, uint64_t noise_key, int64_t o0, int64_t o1) {
  using opmath_t = opmath_of<scalar_t>;
  const int64_t inner = g.inner, nb = g.nb;
  std::vector<opmath_t> row(nb * 8);
  opmath_t* mult = row.data();
  for (int64_t o = o0; o < o1; ++o) {
    const scalar_t* x = src + o * inner;
    scalar_t* y = dst + o * inner;
    const uint8_t* m = mask + o * nb;
    if (!noise) {
      // expand the row's multipliers, then one straight loop the compiler vectorizes
      // (x and y may alias, elementwise, which this loop allows)
      for (int64_t jb = 0; jb < nb; ++jb) std::memcpy(mult + jb * 8, lut.v[m[jb]], 8 * sizeof(opmath_t));
      for (int64_t j = 0; j < inner; ++j) y[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) * mult[j]);
    } else {
      // timm: x * keep + noise * (1 - keep), no rescaling
      for (int64_t j = 0; j < inner; ++j) {
        const bool keep = (m[j >> 3] >> (j & 7)) & 1u;
        const opmath_t xv = static_cast<opmath_t>(x[j]);
        if (keep) {
          y[j] = static_cast<scalar_t>(xv);
        } else {
          const uint64_t idx = static_cast<uint64_t>(noise_index(g, o, j));
          const opmath_t z = static_cast<opmath_t>(normal_from_bits(mix64(noise_key + (idx + 1) * kGolden)));
          y[j] = static_cast<scalar_t>(xv * opmath_t(0) + z);
        }
      }
    }
  }
}

}  // namespace

void apply_mask_cpu(const Geometry& g, const at::Tensor& src, const at::Tensor& dst, const uint8_t* mask,
                    int64_t units, int64_t dropped, bool scale, bool noise, uint64_t seed) {
  const float s = (scale && !noise) ? keep_scale(units, dropped) : 1.0f;
  const uint64_t noise_key = stream_key(seed, 0, kNoiseSalt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "drop_block_apply_cpu", [&] {
    const Lut<opmath_of<scalar_t>> lut(s);
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    scalar_t* y = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(g.inner, 1)), [&](int64_t b, int64_t e) {
      apply_range<scalar_t>(g, x, y, mask, lut, noise, noise_key, b, e);
    });
  });
}

int64_t forward_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask, const at::Tensor& src,
                    const at::Tensor& dst, bool scale, bool noise) {
  const int64_t units = g.N * (g.couple ? 1 : g.C) * g.D * g.H * g.W;
  const uint64_t noise_key = stream_key(seed, 0, kNoiseSalt);
  std::atomic<int64_t> dropped{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "drop_block_forward_cpu", [&] {
    using opmath_t = opmath_of<scalar_t>;
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    scalar_t* y = dst.mutable_data_ptr<scalar_t>();
    two_phase(
        mask_tasks(g), g.outer, src.numel(),
        [&](int64_t b, int64_t e) { dropped += build_mask_range(g, seed, gamma, mask, b, e); },
        [&](int64_t b, int64_t e) {
          // after the barrier: every thread derives the same scale from the total
          const float s = (scale && !noise) ? keep_scale(units, dropped.load()) : 1.0f;
          const Lut<opmath_t> local(s);
          apply_range<scalar_t>(g, x, y, mask, local, noise, noise_key, b, e);
        });
  });
  return dropped.load();
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
