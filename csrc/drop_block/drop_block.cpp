// DropBlock (Ghiasi et al. 2018) ops: schemas and the CPU implementation.
// The GPU implementation is Triton (fastnn.triton_kernels.drop_block, ops fastnn::*_triton),
// with the same arguments and the same mask format.
//
//   drop_block_fwd(x, seed, block, gamma, ...) -> (out, mask, stats)
//     x: (N, C, L) / (N, C, H, W) / (N, C, D, H, W), dense in the layout named by channels_last
//     seed: int64 tensor of one element (drawn from torch's generator by the Python API)
//     block: per spatial axis, already clipped to the map (1 <= k <= size)
//     mask: uint8 [outer, ceil(inner / 8)] keep bits (see cpu/drop_block_cpu.h)
//     stats: int64 [2] = (dropped units, units) of the seed-plane grid N x (1 or C) x spatial;
//            the scale is units / (units - dropped + 1e-7), as timm counts it
//   drop_block_fwd_: the same, writing into x; returns (mask, stats)
//   drop_block_bwd(grad, mask, stats, scale, channels_last) -> grad * keep * scale
//   drop_block_seeds(x, seed, ...) -> uint8 [N, C or 1, *spatial]: the seeds the forward draws
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "drop_block/cpu/drop_block_cpu.h"

namespace fastnn {
namespace drop_block {
namespace {

bool dense_in_layout(const at::Tensor& x, bool channels_last) {
  if (!channels_last) return x.is_contiguous();
  std::vector<int64_t> perm{0};
  for (int64_t i = 2; i < x.dim(); ++i) perm.push_back(i);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

void check_input(const at::Tensor& x, const char* name, bool channels_last) {
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5, "drop_block: ", name,
                    " must be (N, C, L), (N, C, H, W) or (N, C, D, H, W), got shape ", x.sizes());
  check_floating(x, name);
  TORCH_CHECK_VALUE(dense_in_layout(x, channels_last), "drop_block: ", name, " must be dense in the ",
                    channels_last ? "channels-last" : "contiguous", " layout (call .contiguous() first)");
}

Geometry checked_geometry(const at::Tensor& x, const at::Tensor& seed, c10::IntArrayRef block, double gamma,
                          bool couple, bool valid_only, bool channels_last) {
  check_input(x, "input", channels_last);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "drop_block: seed must be an int64 tensor "
                    "with one element, got ", seed.scalar_type(), " with ", seed.numel(), " elements");
  TORCH_CHECK_VALUE(seed.device().is_cpu(), "drop_block: the CPU kernel needs seed on the CPU, got ", seed.device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(block.size()) == x.dim() - 2, "drop_block: block must have one size per "
                    "spatial axis (", x.dim() - 2, "), got ", block);
  for (int64_t i = 0; i < x.dim() - 2; ++i)
    TORCH_CHECK_VALUE(block[i] >= 1 && block[i] <= std::max<int64_t>(1, x.size(i + 2)), "drop_block: block[", i,
                      "] = ", block[i], " must be in [1, ", x.size(i + 2), "] (clip it to the feature map)");
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0, "drop_block: gamma must be finite and >= 0, got ", gamma);
  return make_geometry(x, block, couple, valid_only, channels_last);
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }
int64_t stats_dropped(const at::Tensor& stats) { return stats.data_ptr<int64_t>()[0]; }
int64_t stats_units(const at::Tensor& stats) { return stats.data_ptr<int64_t>()[1]; }

// The forward into `dst` (x itself for the in-place op): (mask, stats).
std::tuple<at::Tensor, at::Tensor> forward_into(const Geometry& g, const at::Tensor& x, const at::Tensor& dst,
                                                const at::Tensor& seed, double gamma, bool with_noise,
                                                bool scale_by_keep) {
  auto mask = at::empty({g.outer, g.nb}, x.options().dtype(at::kByte));
  auto stats = at::empty({2}, x.options().dtype(at::kLong));
  int64_t n = 0;
  if (x.numel() > 0)
    n = forward_cpu(g, seed_value(seed), gamma, mask.data_ptr<uint8_t>(), x, dst, scale_by_keep, with_noise);
  stats.data_ptr<int64_t>()[0] = n;
  stats.data_ptr<int64_t>()[1] = g.N * (g.couple ? 1 : g.C) * g.D * g.H * g.W;
  return {mask, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& seed,
                                                       c10::IntArrayRef block, double gamma, bool couple,
                                                       bool valid_only, bool with_noise, bool scale_by_keep,
                                                       bool channels_last) {
  const Geometry g = checked_geometry(x, seed, block, gamma, couple, valid_only, channels_last);
  auto out = at::empty_like(x);  // keeps x's (dense) strides
  auto [mask, stats] = forward_into(g, x, out, seed, gamma, with_noise, scale_by_keep);
  return {out, mask, stats};
}

std::tuple<at::Tensor, at::Tensor> fwd_inplace_cpu(at::Tensor& x, const at::Tensor& seed, c10::IntArrayRef block,
                                                   double gamma, bool couple, bool valid_only, bool with_noise,
                                                   bool scale_by_keep, bool channels_last) {
  const Geometry g = checked_geometry(x, seed, block, gamma, couple, valid_only, channels_last);
  return forward_into(g, x, x, seed, gamma, with_noise, scale_by_keep);
}

at::Tensor bwd_cpu(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& stats, bool scale,
                   bool channels_last) {
  check_input(grad, "grad", channels_last);
  const int64_t nd = grad.dim() - 2;
  std::vector<int64_t> ones(nd, 1);
  const Geometry g = make_geometry(grad, ones, false, false, channels_last);
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == g.outer &&
                        mask.size(1) == g.nb && mask.is_contiguous(),
                    "drop_block_bwd: mask must be a contiguous uint8 [", g.outer, ", ", g.nb,
                    "] tensor from drop_block_fwd with the same shape and layout, got ", mask.scalar_type(), " ",
                    mask.sizes());
  TORCH_CHECK_VALUE(stats.numel() == 2 && stats.scalar_type() == at::kLong && stats.is_contiguous(),
                    "drop_block_bwd: stats must be the int64 [2] tensor from drop_block_fwd");
  TORCH_CHECK_VALUE(mask.device().is_cpu() && stats.device().is_cpu(), "drop_block_bwd: mask and stats must be "
                    "on the CPU with grad");
  auto out = at::empty_like(grad);
  if (grad.numel() > 0)
    apply_mask_cpu(g, grad, out, mask.data_ptr<uint8_t>(), stats_units(stats), stats_dropped(stats), scale, false,
                   0);
  return out;
}

at::Tensor seeds_op_cpu(const at::Tensor& x, const at::Tensor& seed, c10::IntArrayRef block, double gamma,
                        bool couple, bool valid_only, bool channels_last) {
  const Geometry g = checked_geometry(x, seed, block, gamma, couple, valid_only, channels_last);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = couple ? 1 : x.size(1);
  auto out = at::empty(shape, x.options().dtype(at::kByte));
  if (out.numel() > 0) seeds_cpu(g, seed_value(seed), gamma, out.data_ptr<uint8_t>());
  return out;
}

}  // namespace
}  // namespace drop_block
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def(
      "drop_block_fwd(Tensor x, Tensor seed, int[] block, float gamma, bool couple_channels, bool valid_only, "
      "bool with_noise, bool scale_by_keep, bool channels_last) -> (Tensor, Tensor, Tensor)");
  m.def(
      "drop_block_fwd_(Tensor(a!) x, Tensor seed, int[] block, float gamma, bool couple_channels, bool valid_only, "
      "bool with_noise, bool scale_by_keep, bool channels_last) -> (Tensor, Tensor)");
  m.def("drop_block_bwd(Tensor grad, Tensor mask, Tensor stats, bool scale, bool channels_last) -> Tensor");
  m.def(
      "drop_block_seeds(Tensor x, Tensor seed, int[] block, float gamma, bool couple_channels, bool valid_only, "
      "bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("drop_block_fwd", &fastnn::drop_block::fwd_cpu);
  m.impl("drop_block_fwd_", &fastnn::drop_block::fwd_inplace_cpu);
  m.impl("drop_block_bwd", &fastnn::drop_block::bwd_cpu);
  m.impl("drop_block_seeds", &fastnn::drop_block::seeds_op_cpu);
}
