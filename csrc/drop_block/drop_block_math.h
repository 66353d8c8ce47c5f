#pragma once
// DropBlock per-element math: block geometry, the keep-scale, and the counter-based
// random numbers of the CPU kernels. The Triton kernels (triton_kernels/drop_block.py)
// implement the same geometry and scale; tests check both against fastnn/reference.py.
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastnn {
namespace drop_block {

// A block of size k around a seed at s covers [s - after(k), s + before(k)]: for odd k it is
// centred; for even k it reaches one further back than forward. This is timm's convention
// (max_pool2d with padding k // 2, then dropping the first row/column for even k).
// Equivalently, unit i is dropped when a seed lies in [i - before(k), i + after(k)].
FASTNN_HD int before(int k) { return (k - 1) / 2; }
FASTNN_HD int after(int k) { return k / 2; }

// The scale applied to kept units: numel / (kept + 1e-7) in float32, rounded as timm's
// `numel / tensor` is (torch evaluates int / tensor as tensor.reciprocal() * int).
// numel and dropped count the units of the mask timm builds: (N, 1, *spatial) when channels
// are coupled, (N, C, *spatial) otherwise.
FASTNN_HD float keep_scale(int64_t numel, int64_t dropped) {
  const float kept = static_cast<float>(numel - dropped);
  const float r = 1.0f / (kept + 1e-7f);
  return static_cast<float>(numel) * r;
}

// splitmix64: a 64-bit mixing function; as a counter-based generator (mix(key + i * golden))
// it passes BigCrush. The CPU kernels key one stream per seed plane, so results do not
// depend on the number of threads.
FASTNN_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

FASTNN_HD uint64_t stream_key(uint64_t seed, uint64_t stream, uint64_t salt) {
  return mix64(seed ^ mix64(stream * kGolden + salt));
}

// Uniform in (0, 1] from 53 random bits: never 0, so log() is finite.
FASTNN_HD double unit_open0(uint64_t bits) {
  return static_cast<double>((bits >> 11) + 1) * (1.0 / 9007199254740992.0);
}

// Standard normal from one 64-bit draw (Box-Muller on two 32-bit halves, cosine branch).
FASTNN_HD float normal_from_bits(uint64_t bits) {
  const double u1 = (static_cast<double>(bits >> 32) + 1.0) * (1.0 / 4294967296.0);  // (0, 1]
  const double u2 = static_cast<double>(bits & 0xFFFFFFFFULL) * (1.0 / 4294967296.0);  // [0, 1)
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

}  // namespace drop_block
}  // namespace fastnn
