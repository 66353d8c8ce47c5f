// Fused Conv-BatchNorm-ReLU: the schemas of the BatchNorm(+ReLU) ops, their argument checks,
// and the CPU/CUDA registrations. The convolution itself is at::convolution (oneDNN/cuDNN),
// called from Python; these ops cover what follows it.
//
//   bn_relu_stats(x)                        -> (mean, var)       per-channel batch statistics
//   bn_relu_apply(x, mean, var, w, b, ..)   -> y                 normalize + affine + ReLU
//   bn_relu_train(x, w, b, ..)              -> (y, mean, var)    the two above in one call
//   bn_relu_backward(dy, x, mean, var, ..)  -> (dx, dw, db)      training backward, ReLU mask fused
//   bn_relu_backward_reduce / _elemt        the two halves of it (SyncBatchNorm all-reduces between)
//   bn_relu_update_running(rm, rv, nbt, ..)  -> ()               BatchNorm's running-statistics bookkeeping
//
// Statistics are float32 (float64 for float64 input) whatever the activation dtype; var is the
// biased batch variance. Activations may be contiguous (N, C, *) or 4-D channels_last: the
// kernels read both layouts directly; any other strides are copied to the suggested layout first.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common/checks.h"
#include "conv_bn_relu/conv_bn_relu_kernels.h"
#include "conv_bn_relu/cpu/conv_bn_relu_cpu.h"
#ifdef FASTNN_WITH_CUDA
#include "conv_bn_relu/cuda/conv_bn_relu_cuda.h"
#endif

namespace fastnn {
namespace cbr {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType stat_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_nhwc(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The activation dense in one of the two layouts the kernels read (a copy only for other strides).
Tensor dense(const Tensor& x) {
  if (x.is_contiguous()) return x;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  // Only 4-D channels_last is read as NHWC: a 5-D input's suggested ChannelsLast3d would pass
  // through unchanged and be read as NCDHW (wrong results), so it becomes contiguous.
  return x.contiguous(x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous);
}

// `t` (same shape as x) in x's layout.
Tensor like(const Tensor& x, const Tensor& t) {
  return is_nhwc(x) ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

Geometry geometry_of(const Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  g.nhwc = is_nhwc(x);
  return g;
}

void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.defined(), name, " must be a tensor");
  TORCH_CHECK_VALUE(x.dim() >= 2, name, " must have at least 2 dims (N, C, ...), got shape ", x.sizes());
  check_floating(x, name);
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), name, " must be on the CPU or a CUDA device, got ",
                    x.device());
}

void check_channel_vec(const Tensor& t, const Tensor& x, const char* name, bool stat) {
  check_same_device(t, name, x, "input");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), name, " must be 1-D with one value per channel (",
                    x.size(1), "), got shape ", t.sizes());
  if (stat) {
    TORCH_CHECK_TYPE(t.scalar_type() == stat_dtype(x), name, " must be ", stat_dtype(x), " for ", x.scalar_type(),
                     " input, got ", t.scalar_type());
  } else {
    check_floating(t, name);
  }
}

Tensor opt_param(const OptTensor& t, const Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_channel_vec(*t, x, name, false);
  return t->to(stat_dtype(x)).contiguous();
}

Params make_params(const Tensor& x, Tensor mean, Tensor var, const OptTensor& weight, const OptTensor& bias,
                   double eps, bool relu) {
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  Params p;
  p.mean = std::move(mean);
  p.var = std::move(var);
  p.weight = opt_param(weight, x, "weight");
  p.bias = opt_param(bias, x, "bias");
  p.eps = eps;
  p.relu = relu;
  return p;
}

Tensor new_stat(const Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(stat_dtype(x)).memory_format(at::MemoryFormat::Contiguous));
}

Tensor new_like(const Tensor& x) {
  return at::empty_like(x, at::MemoryFormat::Preserve);
}

Tensor to_dtype_of(const Tensor& g, const OptTensor& param) {
  if (param.has_value() && param->defined() && param->scalar_type() != g.scalar_type()) {
    return g.to(param->scalar_type());
  }
  return g;
}

void check_grad(const Tensor& grad_out, const Tensor& input) {
  TORCH_CHECK_VALUE(grad_out.defined(), "grad_out must be a tensor");
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), "grad_out must have the input's shape ", input.sizes(),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == input.scalar_type(), "grad_out must have the input's dtype ",
                   input.scalar_type(), ", got ", grad_out.scalar_type());
  check_same_device(grad_out, "grad_out", input, "input");
}

// ---------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> bn_relu_stats(const Tensor& input) {
  check_input(input, "input");
  const Tensor x = dense(input);
  const Geometry g = geometry_of(x);
  Tensor mean = new_stat(x), var = new_stat(x);
#ifdef FASTNN_WITH_CUDA
  if (x.is_cuda()) {
    stats_cuda(x, g, mean, var);
    return {mean, var};
  }
#endif
  stats_cpu(x, g, mean, var);
  return {mean, var};
}

Tensor bn_relu_apply(const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                     const OptTensor& bias, double eps, bool relu) {
  check_input(input, "input");
  check_channel_vec(mean, input, "mean", true);
  check_channel_vec(var, input, "var", true);
  const Tensor x = dense(input);
  const Geometry g = geometry_of(x);
  const Params p = make_params(x, mean.contiguous(), var.contiguous(), weight, bias, eps, relu);
  Tensor y = new_like(x);
  if (x.numel() == 0) return y;
#ifdef FASTNN_WITH_CUDA
  if (x.is_cuda()) {
    apply_cuda(x, g, p, y);
    return y;
  }
#endif
  apply_cpu(x, g, p, y);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 double eps, bool relu) {
  check_input(input, "input");
  const Tensor x = dense(input);
  const Geometry g = geometry_of(x);
  const Params p = make_params(x, new_stat(x), new_stat(x), weight, bias, eps, relu);
  Tensor y = new_like(x);
  if (x.numel() == 0) {
    p.mean.zero_();
    p.var.zero_();
    return {y, p.mean, p.var};
  }
#ifdef FASTNN_WITH_CUDA
  if (x.is_cuda()) {
    train_cuda(x, g, p, y);
    return {y, p.mean, p.var};
  }
#endif
  train_cpu(x, g, p, y);
  return {y, p.mean, p.var};
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                   const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                                                   double eps, bool relu) {
  check_input(input, "input");
  check_grad(grad_out, input);
  check_channel_vec(mean, input, "mean", true);
  check_channel_vec(var, input, "var", true);
  const Tensor x = dense(input);
  const Tensor dy = like(x, grad_out);
  const Geometry g = geometry_of(x);
  const Params p = make_params(x, mean.contiguous(), var.contiguous(), weight, bias, eps, relu);
  Tensor sum_dz = new_stat(x), sum_dz_xmu = new_stat(x);
  if (x.numel() == 0) {
    sum_dz.zero_();
    sum_dz_xmu.zero_();
    return {sum_dz, sum_dz_xmu};
  }
#ifdef FASTNN_WITH_CUDA
  if (x.is_cuda()) {
    backward_reduce_cuda(dy, x, g, p, sum_dz, sum_dz_xmu);
    return {sum_dz, sum_dz_xmu};
  }
#endif
  backward_reduce_cpu(dy, x, g, p, sum_dz, sum_dz_xmu);
  return {sum_dz, sum_dz_xmu};
}

Tensor bn_relu_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& var,
                              const OptTensor& weight, const OptTensor& bias, const Tensor& sum_dz,
                              const Tensor& sum_dz_xmu, double count, double eps, bool relu) {
  check_input(input, "input");
  check_grad(grad_out, input);
  check_channel_vec(mean, input, "mean", true);
  check_channel_vec(var, input, "var", true);
  check_channel_vec(sum_dz, input, "sum_dz", true);
  check_channel_vec(sum_dz_xmu, input, "sum_dz_xmu", true);
  TORCH_CHECK_VALUE(count >= 0, "count must be >= 0, got ", count);
  const Tensor x = dense(input);
  const Tensor dy = like(x, grad_out);
  const Geometry g = geometry_of(x);
  const Params p = make_params(x, mean.contiguous(), var.contiguous(), weight, bias, eps, relu);
  const double inv_count = count > 0 ? 1.0 / count : 0.0;
  Tensor dx = new_like(x);
  if (x.numel() == 0) return dx;
#ifdef FASTNN_WITH_CUDA
  if (x.is_cuda()) {
    backward_elemt_cuda(dy, x, g, p, sum_dz.contiguous(), sum_dz_xmu.contiguous(), inv_count, dx);
    return dx;
  }
#endif
  backward_elemt_cpu(dy, x, g, p, sum_dz.contiguous(), sum_dz_xmu.contiguous(), inv_count, dx);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                    const Tensor& var, const OptTensor& weight,
                                                    const OptTensor& bias, double eps, bool relu) {
  check_input(input, "input");
  check_grad(grad_out, input);
  check_channel_vec(mean, input, "mean", true);
  check_channel_vec(var, input, "var", true);
  const Tensor x = dense(input);
  const Tensor dy = like(x, grad_out);
  const Geometry g = geometry_of(x);
  const Params p = make_params(x, mean.contiguous(), var.contiguous(), weight, bias, eps, relu);
  Tensor dx = new_like(x);
  Tensor sum_dz = new_stat(x), sum_dz_xmu = new_stat(x), grad_weight = new_stat(x);
  if (x.numel() == 0) {
    sum_dz.zero_();
    grad_weight.zero_();
  } else {
#ifdef FASTNN_WITH_CUDA
    if (x.is_cuda()) {
      backward_cuda(dy, x, g, p, dx, sum_dz, sum_dz_xmu, grad_weight);
    } else
#endif
    {
      backward_cpu(dy, x, g, p, dx, sum_dz, sum_dz_xmu, grad_weight);
    }
  }
  // sum_dz is grad_bias: fresh tensors, returned as they are unless the parameters have another dtype
  return {dx, to_dtype_of(grad_weight, weight), to_dtype_of(sum_dz, bias)};
}

// BatchNorm's bookkeeping after a training batch, in place: running_mean and running_var move towards
// the batch statistics, r <- r + momentum * (batch - r) (= (1 - momentum) r + momentum batch), with the
// unbiased variance var * count / (count - 1) for running_var; num_batches_tracked, when given, += 1.
// It runs every training step: one call from Python here instead of several small Python-level ops
// saves host time, which is what bounds a training step on a fast GPU. ATen ops do the work (two or
// three tiny launches on CUDA; in-place ops, so the buffers' version counters move, which the modules'
// folded-weight cache relies on).
void bn_relu_update_running(const Tensor& running_mean, const Tensor& running_var,
                            const OptTensor& num_batches_tracked, const Tensor& mean, const Tensor& var,
                            double count, double momentum) {
  TORCH_CHECK_VALUE(mean.dim() == 1, "mean must be 1-D (one value per channel), got shape ", mean.sizes());
  check_floating(mean, "mean");
  TORCH_CHECK_VALUE(var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type(),
                    "var must match mean (shape ", mean.sizes(), ", ", mean.scalar_type(), "), got shape ",
                    var.sizes(), ", ", var.scalar_type());
  check_same_device(var, "var", mean, "mean");
  auto check_running = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
    TORCH_CHECK_VALUE(t.sizes() == mean.sizes(), name, " must have shape ", mean.sizes(),
                      " (one value per channel), got ", t.sizes());
    check_floating(t, name);
    check_same_device(t, name, mean, "mean");
  };
  check_running(running_mean, "running_mean");
  check_running(running_var, "running_var");
  TORCH_CHECK_VALUE(count > 1, "count (values per channel in the batch) must be > 1 for the unbiased variance, "
                    "got ", count);
  const bool nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (nbt) {
    check_same_device(*num_batches_tracked, "num_batches_tracked", mean, "mean");
    TORCH_CHECK_VALUE(num_batches_tracked->numel() == 1, "num_batches_tracked must have one element, got shape ",
                      num_batches_tracked->sizes());
  }
  const Tensor unbiased = var * (count / (count - 1));
  at::_foreach_lerp_({running_mean, running_var},
                     {mean.to(running_mean.scalar_type()), unbiased.to(running_var.scalar_type())}, momentum);
  if (nbt) num_batches_tracked->add_(1);
}

}  // namespace
}  // namespace cbr
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def("bn_relu_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("bn_relu_apply(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, bool relu)"
        " -> Tensor");
  m.def("bn_relu_train(Tensor input, Tensor? weight, Tensor? bias, float eps, bool relu)"
        " -> (Tensor out, Tensor mean, Tensor var)");
  m.def("bn_relu_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight,"
        " Tensor? bias, float eps, bool relu) -> (Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def("bn_relu_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight,"
        " Tensor? bias, Tensor sum_dz, Tensor sum_dz_xmu, float count, float eps, bool relu) -> Tensor");
  m.def("bn_relu_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias,"
        " float eps, bool relu) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def("bn_relu_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
        " Tensor mean, Tensor var, float count, float momentum) -> ()");
}

// The backward ops have no derivative of their own. Without an Autograd kernel, create_graph=True
// would treat their outputs as constants (silently wrong second derivatives); this fallback raises
// when something backpropagates through them, and costs nothing when no gradient is tracked (a
// Python torch.library.register_autograd would add ~5 us to every call, compiled backwards included).
// fastnn/ops/conv_bn_relu.py differentiates the backward through the reference instead.
TORCH_LIBRARY_IMPL(fastnn, Autograd, m) {
  for (const char* name : {"bn_relu_backward_reduce", "bn_relu_backward_elemt", "bn_relu_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  using namespace fastnn::cbr;
  m.impl("bn_relu_stats", &bn_relu_stats);
  m.impl("bn_relu_apply", &bn_relu_apply);
  m.impl("bn_relu_train", &bn_relu_train);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt);
  m.impl("bn_relu_backward", &bn_relu_backward);
  m.impl("bn_relu_update_running", &bn_relu_update_running);
}

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  using namespace fastnn::cbr;
  m.impl("bn_relu_stats", &bn_relu_stats);
  m.impl("bn_relu_apply", &bn_relu_apply);
  m.impl("bn_relu_train", &bn_relu_train);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce);
  m.impl("bn_relu_backward_elemt", &bn_relu_backward_elemt);
  m.impl("bn_relu_backward", &bn_relu_backward);
  m.impl("bn_relu_update_running", &bn_relu_update_running);
}
#endif
