#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace fastnn {
namespace drop_block {

// An (N, C, *spatial) input seen as (N, C, D, H, W): 1-D inputs have D = H = 1, 2-D have D = 1.
// The kernels walk memory as a dense (outer, inner) matrix:
//   NC*-contiguous ("rows"):       outer = N*C*D*H, inner = W
//   channels-last contiguous:      outer = N*D*H*W, inner = C
// The keep mask is bit-packed along `inner`: row `o` has nb = ceil(inner / 8) bytes, bit j of
// byte b is unit 8b + j (1 = kept). Padding bits are 0.
struct Geometry {
  int64_t N = 0, C = 0, D = 1, H = 1, W = 1;
  int kd = 1, kh = 1, kw = 1;
  bool couple = false, valid_only = false, channels_last = false;
  int64_t inner = 0, outer = 0, nb = 0;
};

Geometry make_geometry(const at::Tensor& x, c10::IntArrayRef block, bool couple_channels, bool valid_only,
                       bool channels_last);

// Draws the seeds from `seed`, dilates them into blocks, writes the bit-packed keep mask
// (uint8 [outer, nb]) and returns the number of dropped units of the seed-plane grid
// (N x (couple ? 1 : C) x D x H x W; what timm's scale counts).
int64_t build_mask_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask);

// dst = src * keep * s (s = keep_scale(units, dropped) if `scale`, else 1); with `noise`, dropped
// units get N(0, 1) instead. src and dst may alias. Both dense in the geometry's layout.
void apply_mask_cpu(const Geometry& g, const at::Tensor& src, const at::Tensor& dst, const uint8_t* mask,
                    int64_t units, int64_t dropped, bool scale, bool noise, uint64_t seed);

// The whole forward (build_mask_cpu, then apply_mask_cpu with the resulting count) in one
// OpenMP region. Returns the dropped count; dst may alias src.
int64_t forward_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* mask, const at::Tensor& src,
                    const at::Tensor& dst, bool scale, bool noise);

// The seeds the forward with the same `seed` draws: uint8 [N, couple ? 1 : C, D, H, W].
void seeds_cpu(const Geometry& g, uint64_t seed, double gamma, uint8_t* out);

}  // namespace drop_block
}  // namespace fastnn
