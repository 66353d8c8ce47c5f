// Stochastic pooling (Zeiler & Fergus 2013): schemas, C++ argument checks, CPU/CUDA registration.
//
//   stochastic_pool2d(self, kernel_size, stride, padding, ceil_mode, mode, training, generator)
//       -> (out, offsets)
//   offsets: uint8, out's shape and layout, the sampled element's offset r*kw + c inside its
//   (unclipped) window, in training; an empty uint8 tensor in eval.
//   stochastic_pool2d_backward(grad_output, self, offsets, ...) -> grad_self
//   (training reads only offsets and self's shape/layout; eval re-reads self's windows).
//
// Layout: out, offsets and grad_self are channels_last when self.stride(1) < self.stride(3)
// (channels-last-like strides), else contiguous NCHW; self and grad_output may have any strides.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>

#include "common/checks.h"
#include "stochastic_pool/cpu/stochastic_pool_cpu.h"
#include "stochastic_pool/stochastic_pool_math.h"
#ifdef FASTNN_WITH_CUDA
#include "stochastic_pool/cuda/stochastic_pool_cuda.h"
#endif

namespace fastnn {
namespace stochastic_pool {
namespace {

constexpr const char* kNegativeMsg =
    "fastnn.stochastic_pool2d: mode='activation' samples with p_i = a_i / sum(a) and needs input >= 0, but "
    "the input has negative values; apply a ReLU first (e.g. F.relu(x)) or use mode='softmax'";

int parse_mode(c10::string_view mode) {
  if (mode == "activation") return kActivation;
  if (mode == "softmax") return kSoftmax;
  TORCH_CHECK_VALUE(false, "stochastic_pool2d: mode must be 'activation' or 'softmax', got '", std::string(mode),
                    "'");
  return -1;
}

bool channels_last_like(const at::Tensor& x) { return x.stride(1) < x.stride(3); }

void set_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

Geometry make_geometry(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, bool ceil_mode) {
  check_dim(x, 4, "stochastic_pool2d: input");
  check_floating(x, "stochastic_pool2d: input");
  TORCH_CHECK_VALUE(k.size() == 2 && s.size() == 2 && p.size() == 2,
                    "stochastic_pool2d: kernel_size, stride and padding must have 2 elements each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(k[i] > 0, "stochastic_pool2d: kernel_size must be positive, got ", k);
    TORCH_CHECK_VALUE(s[i] > 0, "stochastic_pool2d: stride must be positive, got ", s);
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= k[i] / 2, "stochastic_pool2d: padding must be in [0, kernel_size / 2], got ",
                      p, " for kernel_size ", k);
  }
  TORCH_CHECK_VALUE(k[0] * k[1] <= kMaxWindow, "stochastic_pool2d: kernel_size ", k, " has ", k[0] * k[1],
                    " elements; at most ", kMaxWindow, " are supported (the sampled offset is stored in one byte)");
  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.kh = static_cast<int>(k[0]);
  g.kw = static_cast<int>(k[1]);
  g.sh = static_cast<int>(s[0]);
  g.sw = static_cast<int>(s[1]);
  g.ph = static_cast<int>(p[0]);
  g.pw = static_cast<int>(p[1]);
  g.OH = pooled_size(g.H, g.kh, g.sh, g.ph, ceil_mode);
  g.OW = pooled_size(g.W, g.kw, g.sw, g.pw, ceil_mode);
  TORCH_CHECK_VALUE(g.OH >= 1 && g.OW >= 1, "stochastic_pool2d: kernel_size ", k, " is larger than the padded input (",
                    g.H, " + 2*", g.ph, ", ", g.W, " + 2*", g.pw, "); use a smaller kernel or more padding");
  g.channels_last = channels_last_like(x);
  set_strides(g.xs, x);
  return g;
}

at::MemoryFormat out_format(const Geometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, const Geometry& g,
                         bool training) {
  check_same_device(grad_out, "grad_output", x, "input");
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == g.N && grad_out.size(1) == g.C &&
                        grad_out.size(2) == g.OH && grad_out.size(3) == g.OW,
                    "stochastic_pool2d_backward: grad_output must have shape [", g.N, ", ", g.C, ", ", g.OH, ", ",
                    g.OW, "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "stochastic_pool2d_backward: grad_output dtype ",
                   grad_out.scalar_type(), " must match the input's ", x.scalar_type());
  if (training) {
    check_same_device(offsets, "offsets", x, "input");
    TORCH_CHECK_TYPE(offsets.scalar_type() == at::kByte, "stochastic_pool2d_backward: offsets must be uint8");
    TORCH_CHECK_VALUE(offsets.sizes() == grad_out.sizes(), "stochastic_pool2d_backward: offsets must have shape ",
                      grad_out.sizes(), ", got ", offsets.sizes(), " (pass the offsets the forward returned)");
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cpu_entry(const at::Tensor& self, at::IntArrayRef kernel_size,
                                                     at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                                     c10::string_view mode, bool training,
                                                     const std::optional<at::Generator>& generator) {
  Geometry g = make_geometry(self, kernel_size, stride, padding, ceil_mode);
  const int m = parse_mode(mode);
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, self.options(), out_format(g));
  at::Tensor offsets = training ? at::empty({g.N, g.C, g.OH, g.OW}, self.options().dtype(at::kByte), out_format(g))
                                : at::empty({0}, self.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, offsets};
  set_strides(g.ys, out);
  if (training) set_strides(g.os, offsets);
  uint64_t seed = 0;
  if (training) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  const bool neg = forward_cpu(self, out, offsets, g, m, training, seed);
  TORCH_CHECK_VALUE(!neg, kNegativeMsg);
  return {out, offsets};
}

at::Tensor backward_cpu_entry(const at::Tensor& grad_out, const at::Tensor& self, const at::Tensor& offsets,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              bool ceil_mode, c10::string_view mode, bool training) {
  Geometry g = make_geometry(self, kernel_size, stride, padding, ceil_mode);
  const int m = parse_mode(mode);
  check_backward_args(grad_out, self, offsets, g, training);
  at::Tensor grad_in = at::empty(self.sizes(), self.options(), out_format(g));
  if (grad_in.numel() == 0) return grad_in;
  set_strides(g.ys, grad_in);
  set_strides(g.gs, grad_out);
  if (training) set_strides(g.os, offsets);
  backward_cpu(grad_out, self, offsets, grad_in, g, m, training);
  return grad_in;
}

#ifdef FASTNN_WITH_CUDA
// FASTNN_STOCHASTIC_POOL_CHECK=nan skips the CUDA negative-input check's host sync (activation
// mode): no ValueError then, the windows with a negative value output NaN. Default: "sync".
bool cuda_sync_check() {
  const char* v = std::getenv("FASTNN_STOCHASTIC_POOL_CHECK");
  return v == nullptr || std::string(v) != "nan";
}

std::tuple<at::Tensor, at::Tensor> forward_cuda_entry(const at::Tensor& self, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                                      c10::string_view mode, bool training,
                                                      const std::optional<at::Generator>& generator) {
  Geometry g = make_geometry(self, kernel_size, stride, padding, ceil_mode);
  TORCH_CHECK_TYPE(self.scalar_type() != at::kDouble,
                   "stochastic_pool2d: the CUDA kernels take float32, float16 or bfloat16; got float64 (use the "
                   "CPU or the reference backend for float64)");
  const int m = parse_mode(mode);
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, self.options(), out_format(g));
  at::Tensor offsets = training ? at::empty({g.N, g.C, g.OH, g.OW}, self.options().dtype(at::kByte), out_format(g))
                                : at::empty({0}, self.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, offsets};
  set_strides(g.ys, out);
  if (training) set_strides(g.os, offsets);
  const bool neg = forward_cuda(self, out, offsets, g, m, training, generator, cuda_sync_check());
  TORCH_CHECK_VALUE(!neg, kNegativeMsg);
  return {out, offsets};
}

at::Tensor backward_cuda_entry(const at::Tensor& grad_out, const at::Tensor& self, const at::Tensor& offsets,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               bool ceil_mode, c10::string_view mode, bool training) {
  Geometry g = make_geometry(self, kernel_size, stride, padding, ceil_mode);
  TORCH_CHECK_TYPE(self.scalar_type() != at::kDouble,
                   "stochastic_pool2d_backward: the CUDA kernels take float32, float16 or bfloat16; got float64");
  const int m = parse_mode(mode);
  check_backward_args(grad_out, self, offsets, g, training);
  at::Tensor grad_in = at::empty(self.sizes(), self.options(), out_format(g));
  if (grad_in.numel() == 0) return grad_in;
  set_strides(g.ys, grad_in);
  set_strides(g.gs, grad_out);
  if (training) set_strides(g.os, offsets);
  backward_cuda(grad_out, self, offsets, grad_in, g, m, training);
  return grad_in;
}
#endif

}  // namespace
}  // namespace stochastic_pool
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  // nondeterministic_seeded: draws from the generator, so compilers never re-run it to rematerialise.
  m.def(
      "stochastic_pool2d(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "str mode, bool training, Generator? generator=None) -> (Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "stochastic_pool2d_backward(Tensor grad_output, Tensor self, Tensor offsets, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, str mode, bool training) -> Tensor");
}

// The backward op has no derivative of its own: raise if something backpropagates through it (see
// csrc/conv_bn_relu/conv_bn_relu.cpp); fastnn/ops/stochastic_pool.py handles create_graph=True.
TORCH_LIBRARY_IMPL(fastnn, Autograd, m) {
  m.impl("stochastic_pool2d_backward", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("stochastic_pool2d", &fastnn::stochastic_pool::forward_cpu_entry);
  m.impl("stochastic_pool2d_backward", &fastnn::stochastic_pool::backward_cpu_entry);
}

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("stochastic_pool2d", &fastnn::stochastic_pool::forward_cuda_entry);
  m.impl("stochastic_pool2d_backward", &fastnn::stochastic_pool::backward_cuda_entry);
}
#endif
