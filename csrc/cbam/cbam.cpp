// CBAM: schemas, argument checks and the device-independent orchestration of the fused passes.
//
// Forward (x read 3 times, out written once):
//   1. channel_pool  : mean and max over H*W per (n, c)                 [x-sized pass]
//   2. channel gate g = sigmoid(MLP(mean) + MLP(max))                   [small: [2N, C]]
//   3. spatial_pool  : mean and max over C of x*g per (n, p)             [x-sized pass; x*g is not stored]
//   4. spatial gate s = sigmoid(BN(conv_kxk([mean, max])))               [small: [N, 2, H, W]]
//   5. apply_gates   : out = (x*g)*s                                     [x-sized pass]
// Backward (x read 3 times (2 with max_first_index), grad_out read twice, grad_x written once):
//   1. backward_reduce: ds = sum_c dout*x*g and dL/dg (direct part) = sum_p dout*x*s, one pass
//   2. small: ds -> sigmoid' -> BN backward -> conv backward -> d(mean_c), d(max_c), dW_conv, dBN
//   3. backward_gate  : dL/dg through the spatial pool = sum_p x*(dmean/C + [argmax] dmax)
//   4. small: dL/dg -> sigmoid' -> MLP backward -> d(mean_p), d(max_p), dW1, db1, dW2, db2
//   5. backward_input : grad_x from all paths in one elementwise pass
// Nothing of x's size is saved besides x itself: the op returns the small gates, pooled maps, the
// MLP's hidden layer and the max indices (or tie counts), packed in two flat buffers (cbam_saved.h).
// The small parts run in the accumulation type (float, or double for double inputs) whatever the
// dtype of x and of the parameters.
//
// Two orchestrations:
//   - generic (below): the device's x-sized passes (Kernels) and ATen ops for the small parts. The
//     CPU runs it; CUDA runs it with FASTNN_CBAM_CUDA_LEGACY=1 (the first GPU-validated path, kept
//     for A/B comparisons and as a fallback).
//   - CUDA whole-op (cuda/cbam_cuda_fast.cu): every step, the MLP and the conv included, in custom
//     kernels (about 7 launches each way and no ATen ops): at the ResNet shapes the ATen version was
//     bound by per-op host work, not by the GPU.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cbam/cbam_params.h"
#include "cbam/cbam_saved.h"
#include "cbam/cpu/cbam_cpu.h"
#include "common/checks.h"
#ifdef FASTNN_WITH_CUDA
#include "cbam/cuda/cbam_cuda.h"
#endif

namespace fastnn {
namespace cbam {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// the whole op in a device's own kernels (cuda/cbam_cuda.h); false: not handled, run the generic path
using WholeForwardFn = bool (*)(const Tensor&, bool, const OpParams&, Tensor&, Tensor&, Tensor&);
using WholeBackwardFn = bool (*)(const Tensor&, const Tensor&, bool, const OpParams&, const Tensor&, const Tensor&,
                                 bool, std::vector<Tensor>&);

// The x-sized passes of one device (signatures as in cpu/cbam_cpu.h).
struct Kernels {
  decltype(&cpu::channel_pool) channel_pool;
  decltype(&cpu::spatial_pool) spatial_pool;
  decltype(&cpu::apply_gates) apply_gates;
  decltype(&cpu::backward_reduce) backward_reduce;
  decltype(&cpu::backward_gate) backward_gate;
  decltype(&cpu::backward_input) backward_input;
  // the spatial gate's small conv; null: use ATen's convolution (cuDNN on the GPU)
  decltype(&cpu::spatial_conv) spatial_conv;
  decltype(&cpu::spatial_conv_backward) spatial_conv_backward;
  // the whole op in the device's own kernels; null: always the generic orchestration
  WholeForwardFn whole_forward;
  WholeBackwardFn whole_backward;
};

const Kernels kCpu{cpu::channel_pool,    cpu::spatial_pool,  cpu::apply_gates,  cpu::backward_reduce,
                   cpu::backward_gate,    cpu::backward_input, cpu::spatial_conv, cpu::spatial_conv_backward,
                   nullptr,               nullptr};
#ifdef FASTNN_WITH_CUDA
const Kernels kCuda{cuda::channel_pool,  cuda::spatial_pool,  cuda::apply_gates, cuda::backward_reduce,
                    cuda::backward_gate, cuda::backward_input, nullptr,           nullptr,
                    cuda::forward,       cuda::backward};
#endif

// FASTNN_CBAM_CUDA_LEGACY=1: CUDA runs the generic orchestration (read per call: tests flip it)
bool legacy_requested() {
  const char* env = std::getenv("FASTNN_CBAM_CUDA_LEGACY");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// The layout the kernels run in: channels_last when x is channels_last (and not also NCHW
// contiguous, e.g. 1x1 maps), else NCHW. Other strides are copied to NCHW first.
bool use_channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Tensor in_layout(const Tensor& t, bool cl) {
  return t.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

void check_x(const Tensor& x, const char* name = "x") {
  check_dim(x, 4, name);
  check_floating(x, name);
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) * x.size(2) * x.size(3) < (int64_t(1) << 31), name,
                    ": C*H*W must be below 2^31 per sample, got shape ", x.sizes());
}

// an MLP weight as a Linear ([out, in]) or a 1x1 Conv2d ([out, in, 1, 1]) has it
bool is_mlp_weight(const Tensor& w) {
  return w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1);
}

// the MLP weight as [out, in] in the accumulation type
Tensor mlp_weight(const Tensor& w, at::ScalarType a) { return w.to(a).reshape({w.size(0), w.size(1)}); }

void check_param(const Tensor& x, const Tensor& t, const char* name) {
  check_floating(t, name);
  check_same_device(x, "x", t, name);
}

void check_params(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                  const Tensor& cw, const OptTensor& cb, const OptTensor& bnw, const OptTensor& bnb,
                  bool spatial_bn, bool bn_training, const OptTensor& rm, const OptTensor& rv, bool forward) {
  check_x(x);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(is_mlp_weight(w1) && w1.size(1) == C && w1.size(0) >= 1, "w1 must be [hidden, C] = [*, ", C,
                    "] (or [hidden, C, 1, 1]), got ", w1.sizes());
  const int64_t Cr = w1.size(0);
  TORCH_CHECK_VALUE(is_mlp_weight(w2) && w2.size(0) == C && w2.size(1) == Cr, "w2 must be [C, hidden] = [", C, ", ",
                    Cr, "] (or [C, hidden, 1, 1]), got ", w2.sizes());
  if (b1.has_value()) TORCH_CHECK_VALUE(b1->numel() == Cr, "b1 must have ", Cr, " elements, got ", b1->sizes());
  if (b2.has_value()) TORCH_CHECK_VALUE(b2->numel() == C, "b2 must have ", C, " elements, got ", b2->sizes());
  TORCH_CHECK_VALUE(cw.dim() == 4 && cw.size(0) == 1 && cw.size(1) == 2 && cw.size(2) == cw.size(3) &&
                        cw.size(2) % 2 == 1,
                    "conv_weight must be [1, 2, k, k] with odd k, got ", cw.sizes());
  if (cb.has_value()) TORCH_CHECK_VALUE(cb->numel() == 1, "conv_bias must have 1 element, got ", cb->sizes());
  if (forward && spatial_bn && !bn_training)
    TORCH_CHECK_VALUE(rm.has_value() && rv.has_value(),
                      "spatial BN in eval mode needs running_mean and running_var");
  if (forward && spatial_bn && bn_training)
    TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 1,
                      "spatial BN in training mode needs more than 1 value per channel (N*H*W > 1), got x of shape ",
                      x.sizes(), "; use eval mode or a bigger batch");
  check_param(x, w1, "w1");
  check_param(x, w2, "w2");
  check_param(x, cw, "conv_weight");
  const std::pair<const OptTensor*, const char*> optional[] = {{&b1, "b1"},        {&b2, "b2"},
                                                               {&cb, "conv_bias"}, {&bnw, "bn_weight"},
                                                               {&bnb, "bn_bias"},  {&rm, "bn_running_mean"},
                                                               {&rv, "bn_running_var"}};
  for (const auto& [t, name] : optional) {
    if (!t->has_value()) continue;
    check_param(x, **t, name);
    if (std::strncmp(name, "bn_", 3) == 0)
      TORCH_CHECK_VALUE((*t)->numel() == 1, name, " must have 1 element, got ", (*t)->sizes());
  }
}

OpParams make_params(const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2, const Tensor& cw,
                     const OptTensor& cb, const OptTensor& bnw, const OptTensor& bnb, const OptTensor& rm,
                     const OptTensor& rv, bool spatial_bn, bool bn_training, double eps, bool mean_first,
                     bool first) {
  OpParams p;
  p.w1 = w1;
  p.b1 = opt(b1);
  p.w2 = w2;
  p.b2 = opt(b2);
  p.cw = cw;
  p.cb = opt(cb);
  if (spatial_bn) {  // the BN's tensors only count with the BN
    p.bnw = opt(bnw);
    p.bnb = opt(bnb);
    p.rm = opt(rm);
    p.rv = opt(rv);
  }
  p.eps = eps;
  p.spatial_bn = spatial_bn;
  p.bn_training = bn_training;
  p.mean_first = mean_first;
  p.first = first;
  return p;
}

// The saved buffers as tensors of their own shapes (views; see cbam_saved.h)
struct Views {
  Tensor g, s, pc, ps, co, h, bn, selc, sels;
};

Views views_of(const Tensor& saved, const Tensor& saved_idx, const SavedLayout& L, int64_t N, int64_t C, int64_t H,
               int64_t W, int64_t Cr) {
  const int64_t P = H * W;
  auto part = [&](const Tensor& buf, int64_t off, at::IntArrayRef shape, int64_t n) {
    return buf.narrow(0, off, n).view(shape);
  };
  Views v;
  v.g = part(saved, L.g, {N, C}, N * C);
  v.s = part(saved, L.s, {N, 1, H, W}, N * P);
  v.pc = part(saved, L.pc, {2, N, C}, 2 * N * C);
  v.ps = part(saved, L.ps, {N, 2, H, W}, 2 * N * P);
  v.co = part(saved, L.co, {N, 1, H, W}, N * P);
  v.h = part(saved, L.h, {2 * N, Cr}, 2 * N * Cr);
  v.bn = saved.narrow(0, L.bn, L.total - L.bn);
  v.selc = part(saved_idx, L.selc, {N, C}, N * C);
  v.sels = part(saved_idx, L.sels, {N, H, W}, N * P);
  return v;
}

// conv weight in [mean, max] input order (the kernels always produce mean first)
Tensor conv_weight_mean_first(const Tensor& cw, at::ScalarType a, bool mean_first) {
  Tensor w = cw.to(a);
  return (mean_first ? w : w.flip({1})).contiguous();
}

// y = conv2d(ps, w, b, padding k/2) on [N, 2, H, W] -> y [N, 1, H, W] (written in place)
void spatial_conv(const Kernels& K, const Tensor& ps, const Tensor& w, const Tensor& b, Tensor& y) {
  const int64_t k = w.size(2);
  if (!K.spatial_conv) {
    y.copy_(at::conv2d(ps, w, b, {1, 1}, {k / 2, k / 2}));
    return;
  }
  {
    RECORD_FUNCTION("cbam::spatial_conv", std::vector<c10::IValue>());
    K.spatial_conv(ps, w, y);
  }
  if (b.defined()) y.add_(b.reshape({}));
}

// (d ps, d w, d b) of spatial_conv; d b is undefined without a bias
std::tuple<Tensor, Tensor, Tensor> spatial_conv_backward(const Kernels& K, const Tensor& dy, const Tensor& ps,
                                                         const Tensor& w, bool has_bias) {
  const int64_t k = w.size(2);
  if (!K.spatial_conv_backward) {
    auto r = at::convolution_backward(
        dy, ps, w, has_bias ? at::OptionalIntArrayRef(at::IntArrayRef{1}) : at::OptionalIntArrayRef(), {1, 1},
        {k / 2, k / 2}, {1, 1}, false, {0, 0}, 1, {true, true, has_bias});
    return {std::get<0>(r), std::get<1>(r), has_bias ? std::get<2>(r) : Tensor()};
  }
  Tensor dyc = dy.contiguous();
  Tensor dps = at::empty_like(ps), dw = at::empty_like(w);
  {
    RECORD_FUNCTION("cbam::spatial_conv_backward", std::vector<c10::IValue>());
    K.spatial_conv_backward(dyc, ps, w, dps, dw);
  }
  return {dps, dw, has_bias ? dyc.sum().reshape({1}) : Tensor()};
}

using FwdOut = std::tuple<Tensor, Tensor, Tensor>;

// the generic forward: fills out, saved and saved_idx (allocated by the caller)
void generic_forward(const Kernels& K, const Tensor& xc, bool cl, const OpParams& p, Tensor& out, Tensor& saved,
                     Tensor& saved_idx) {
  const auto a = acc_type(xc);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), Cr = p.w1.size(0);
  const SavedLayout L = SavedLayout::make(N, C, H * W, Cr, p.spatial_bn);
  saved.zero_();  // the padding between the regions (cbam_saved.h)
  saved_idx.zero_();
  Views v = views_of(saved, saved_idx, L, N, C, H, W, Cr);
  {
    RECORD_FUNCTION("cbam::channel_pool", std::vector<c10::IValue>());
    K.channel_pool(xc, cl, p.first, v.pc, v.selc);
  }
  // g = sigmoid(MLP(mean) + MLP(max)); the hidden layer (before the ReLU) is kept for the backward
  Tensor W1 = mlp_weight(p.w1, a), W2 = mlp_weight(p.w2, a);
  Tensor B1 = p.b1.defined() ? p.b1.to(a) : Tensor(), B2 = p.b2.defined() ? p.b2.to(a) : Tensor();
  Tensor pcv = v.pc.view({2 * N, C});
  if (B1.defined())
    at::addmm_out(v.h, B1, pcv, W1.t());
  else
    at::mm_out(v.h, pcv, W1.t());
  Tensor r = at::relu(v.h);
  Tensor z2 = B2.defined() ? at::addmm(B2, r, W2.t()) : at::mm(r, W2.t());
  at::sigmoid_out(v.g, z2.narrow(0, 0, N) + z2.narrow(0, N, N));
  {
    RECORD_FUNCTION("cbam::spatial_pool", std::vector<c10::IValue>());
    K.spatial_pool(xc, cl, v.g, p.first, v.ps, v.sels);
  }
  Tensor cb = p.cb.defined() ? p.cb.to(a) : Tensor();
  spatial_conv(K, v.ps, conv_weight_mean_first(p.cw, a, p.mean_first), cb, v.co);
  Tensor y = v.co;
  if (p.spatial_bn) {
    Tensor mean, var;
    if (p.bn_training) {
      mean = y.mean();
      var = (y - mean).square().mean();  // biased, as BatchNorm normalizes with
    } else {
      mean = p.rm.to(a).reshape({});
      var = p.rv.to(a).reshape({});
    }
    y = (y - mean) * at::rsqrt(var + p.eps);
    if (p.bnw.defined()) y = y * p.bnw.to(a).reshape({});
    if (p.bnb.defined()) y = y + p.bnb.to(a).reshape({});
    v.bn.copy_(at::stack({mean, var}));
  }
  at::sigmoid_out(v.s, y);
  {
    RECORD_FUNCTION("cbam::apply_gates", std::vector<c10::IValue>());
    K.apply_gates(xc, cl, v.g, v.s, out);
  }
}

FwdOut cbam_forward(const Kernels& K, const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                    const OptTensor& b2, const Tensor& conv_weight, const OptTensor& conv_bias,
                    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& bn_running_mean,
                    const OptTensor& bn_running_var, bool spatial_bn, bool bn_training, double bn_eps,
                    bool mean_first, bool max_first_index) {
  check_params(x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, spatial_bn, bn_training,
               bn_running_mean, bn_running_var, /*forward=*/true);
  // the small parts run in the accumulation type, also under autocast
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), Cr = w1.size(0);
  const SavedLayout L = SavedLayout::make(N, C, P, Cr, spatial_bn);
  Tensor out = at::empty_like(xc);
  Tensor saved = at::empty({L.total}, x.options().dtype(acc_type(x)));
  Tensor saved_idx = at::empty({L.itotal}, x.options().dtype(at::kInt));
  const OpParams p = make_params(w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                                 bn_running_var, spatial_bn, bn_training, bn_eps, mean_first, max_first_index);
  if (!(K.whole_forward && !legacy_requested() && K.whole_forward(xc, cl, p, out, saved, saved_idx)))
    generic_forward(K, xc, cl, p, out, saved, saved_idx);
  return {out, saved, saved_idx};
}

// the generic backward; returns the gradients in cbam_backward's order (see the schema)
std::vector<Tensor> generic_backward(const Kernels& K, const Tensor& dout, const Tensor& xc, bool cl,
                                     const OpParams& p, const Tensor& saved, const Tensor& saved_idx,
                                     bool needs_input_grad) {
  const auto a = acc_type(xc);
  auto opts = xc.options().dtype(a);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), P = H * W, Cr = p.w1.size(0);
  const SavedLayout L = SavedLayout::make(N, C, P, Cr, p.spatial_bn);
  const Views v = views_of(saved, saved_idx, L, N, C, H, W, Cr);
  const bool first = p.first;
  const Tensor &g = v.g, &s = v.s, &pc = v.pc, &ps = v.ps, &selc = v.selc, &sels = v.sels;

  // 1. the two reductions of dout*x
  Tensor ds = at::empty({N, 1, H, W}, opts), dg = at::empty({N, C}, opts);
  {
    RECORD_FUNCTION("cbam::backward_reduce", std::vector<c10::IValue>());
    K.backward_reduce(dout, xc, cl, g, s, ds, dg);
  }

  // 2. spatial gate backward: sigmoid, BN, conv
  Tensor dy = ds * s * (1 - s);
  Tensor wc = conv_weight_mean_first(p.cw, a, p.mean_first);
  const bool has_cb = p.cb.defined();
  Tensor d_bn_w, d_bn_b;
  if (p.spatial_bn) {
    const Tensor& y = v.co;
    Tensor mean = v.bn[0], invstd = at::rsqrt(v.bn[1] + p.eps);
    Tensor xhat = (y - mean) * invstd;
    Tensor bw = p.bnw.defined() ? p.bnw.to(a) : Tensor();
    if (bw.defined()) d_bn_w = (dy * xhat).sum().reshape(p.bnw.sizes()).to(p.bnw.scalar_type());
    if (p.bnb.defined()) d_bn_b = dy.sum().reshape(p.bnb.sizes()).to(p.bnb.scalar_type());
    Tensor scale = bw.defined() ? invstd * bw.reshape({}) : invstd;
    dy = p.bn_training ? scale * (dy - dy.mean() - xhat * (dy * xhat).mean()) : scale * dy;
  }
  auto conv_grads = spatial_conv_backward(K, dy, ps, wc, has_cb);
  Tensor dps = std::get<0>(conv_grads);
  Tensor dwc = std::get<1>(conv_grads);
  if (!p.mean_first) dwc = dwc.flip({1});
  Tensor dcb = has_cb ? std::get<2>(conv_grads).reshape(p.cb.sizes()).to(p.cb.scalar_type()) : Tensor();
  Tensor wa = (dps.select(1, 0) / static_cast<double>(C)).contiguous();  // d(mean_c)/C
  Tensor dm = dps.select(1, 1);
  Tensor em = (first ? dm : dm / sels).contiguous();  // share of d(max_c) per receiving element

  // 3. dL/dg through the spatial pool, added to the direct part
  Tensor dg2 = at::empty({N, C}, opts);
  {
    RECORD_FUNCTION("cbam::backward_gate", std::vector<c10::IValue>());
    K.backward_gate(xc, cl, g, wa, em, ps, sels, first, dg2);
  }
  dg.add_(dg2);

  // 4. channel gate backward: sigmoid, MLP (shared by the mean and the max rows)
  Tensor W1 = mlp_weight(p.w1, a), W2 = mlp_weight(p.w2, a);
  Tensor pcv = pc.view({2 * N, C});
  const Tensor& h = v.h;
  Tensor r = at::relu(h);
  Tensor dz = dg * g * (1 - g);                                        // [N, C]
  Tensor dW2 = at::mm(dz.t(), r.narrow(0, 0, N) + r.narrow(0, N, N));  // [C, Cr]
  Tensor dr = at::mm(dz, W2);                                          // [N, Cr], same for both rows
  Tensor dh = at::cat({dr, dr}, 0) * (h > 0);                          // [2N, Cr]
  Tensor dW1 = at::mm(dh.t(), pcv);                                    // [Cr, C]
  Tensor dv = at::mm(dh, W1);                                          // [2N, C]

  std::vector<Tensor> grads;
  // 5. grad_x in one pass
  if (needs_input_grad) {
    Tensor a2 = (dv.narrow(0, 0, N) / static_cast<double>(P)).contiguous();
    Tensor dmx = dv.narrow(0, N, N);
    Tensor e2 = (first ? dmx : dmx / selc).contiguous();
    Tensor dx = at::empty_like(xc);
    {
      RECORD_FUNCTION("cbam::backward_input", std::vector<c10::IValue>());
      K.backward_input(dout, xc, cl, g, s, wa, em, ps, sels, a2, e2, pc, selc, first, dx);
    }
    grads.push_back(dx);
  }
  grads.push_back(dW1.to(p.w1.scalar_type()).view(p.w1.sizes()));
  grads.push_back(dW2.to(p.w2.scalar_type()).view(p.w2.sizes()));
  grads.push_back(dwc.to(p.cw.scalar_type()));
  if (p.b1.defined()) grads.push_back(dh.sum(0).reshape(p.b1.sizes()).to(p.b1.scalar_type()));
  if (p.b2.defined()) grads.push_back((dz.sum(0) * 2).reshape(p.b2.sizes()).to(p.b2.scalar_type()));
  if (has_cb) grads.push_back(dcb);
  if (d_bn_w.defined()) grads.push_back(d_bn_w);
  if (d_bn_b.defined()) grads.push_back(d_bn_b);
  return grads;
}

std::vector<Tensor> cbam_backward(const Kernels& K, const Tensor& grad_out, const Tensor& x, const Tensor& w1,
                                  const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                                  const Tensor& conv_weight, const OptTensor& conv_bias, const OptTensor& bn_weight,
                                  const OptTensor& bn_bias, bool spatial_bn, bool bn_training, double bn_eps,
                                  bool mean_first, bool max_first_index, const Tensor& saved,
                                  const Tensor& saved_idx, bool needs_input_grad) {
  check_params(x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, spatial_bn, bn_training,
               std::nullopt, std::nullopt, /*forward=*/false);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out must have x's dtype ", x.scalar_type(),
                   ", got ", grad_out.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), Cr = w1.size(0);
  const SavedLayout L = SavedLayout::make(N, C, P, Cr, spatial_bn);
  TORCH_CHECK_VALUE(saved.dim() == 1 && saved.numel() == L.total && saved.scalar_type() == acc_type(x) &&
                        saved.is_contiguous() && saved.device() == x.device(),
                    "saved must be the forward's saved buffer: 1-D, contiguous, ", L.total, " elements of ",
                    acc_type(x), " on x's device; got shape ", saved.sizes(), " of ", saved.scalar_type());
  TORCH_CHECK_VALUE(saved_idx.dim() == 1 && saved_idx.numel() == L.itotal && saved_idx.scalar_type() == at::kInt &&
                        saved_idx.is_contiguous() && saved_idx.device() == x.device(),
                    "saved_idx must be the forward's saved_idx buffer: 1-D, contiguous, ", L.itotal,
                    " int32 elements on x's device; got shape ", saved_idx.sizes(), " of ",
                    saved_idx.scalar_type());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl), dout = in_layout(grad_out, cl);
  const OpParams p = make_params(w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias, std::nullopt,
                                 std::nullopt, spatial_bn, bn_training, bn_eps, mean_first, max_first_index);
  std::vector<Tensor> grads;
  if (K.whole_backward && !legacy_requested() &&
      K.whole_backward(dout, xc, cl, p, saved, saved_idx, needs_input_grad, grads))
    return grads;
  return generic_backward(K, dout, xc, cl, p, saved, saved_idx, needs_input_grad);
}

// ---------------------------------------------------------------- the pools on their own
// (fastnn.nn.ChannelAttention / SpatialAttention; their MLP and conv stay in autograd)

std::tuple<Tensor, Tensor> channel_pool(const Kernels& K, const Tensor& x, bool max_first_index) {
  check_x(x);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl);
  auto opts = x.options().dtype(acc_type(x));
  Tensor pooled = at::empty({2, x.size(0), x.size(1)}, opts);
  Tensor sel = at::empty({x.size(0), x.size(1)}, opts.dtype(at::kInt));
  {
    RECORD_FUNCTION("cbam::channel_pool", std::vector<c10::IValue>());
    K.channel_pool(xc, cl, max_first_index, pooled, sel);
  }
  return {pooled, sel};
}

Tensor channel_pool_backward(const Kernels& K, const Tensor& grad_pooled, const Tensor& x, const Tensor& pooled,
                             const Tensor& sel, bool max_first_index) {
  check_x(x);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl);
  const int64_t P = x.size(2) * x.size(3);
  Tensor gp = grad_pooled.to(acc_type(x));
  Tensor a2 = (gp[0] / static_cast<double>(P)).contiguous();
  Tensor e2 = (max_first_index ? gp[1] : gp[1] / sel).contiguous();
  Tensor dx = at::empty_like(xc);
  {
    RECORD_FUNCTION("cbam::backward_input", std::vector<c10::IValue>());
    K.backward_input(Tensor(), xc, cl, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), a2, e2,
                   pooled.contiguous(), sel.contiguous(), max_first_index, dx);
  }
  return dx;
}

std::tuple<Tensor, Tensor> spatial_pool(const Kernels& K, const Tensor& x, bool max_first_index) {
  check_x(x);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl);
  auto opts = x.options().dtype(acc_type(x));
  Tensor pooled = at::empty({x.size(0), 2, x.size(2), x.size(3)}, opts);
  Tensor sel = at::empty({x.size(0), x.size(2), x.size(3)}, opts.dtype(at::kInt));
  {
    RECORD_FUNCTION("cbam::spatial_pool", std::vector<c10::IValue>());
    K.spatial_pool(xc, cl, Tensor(), max_first_index, pooled, sel);
  }
  return {pooled, sel};
}

Tensor spatial_pool_backward(const Kernels& K, const Tensor& grad_pooled, const Tensor& x, const Tensor& pooled,
                             const Tensor& sel, bool max_first_index) {
  check_x(x);
  const bool cl = use_channels_last(x);
  Tensor xc = in_layout(x, cl);
  Tensor gp = grad_pooled.to(acc_type(x));
  Tensor wa = (gp.select(1, 0) / static_cast<double>(x.size(1))).contiguous();
  Tensor em = (max_first_index ? gp.select(1, 1) : gp.select(1, 1) / sel).contiguous();
  Tensor dx = at::empty_like(xc);
  {
    RECORD_FUNCTION("cbam::backward_input", std::vector<c10::IValue>());
    K.backward_input(Tensor(), xc, cl, Tensor(), Tensor(), wa, em, pooled.contiguous(), sel.contiguous(), Tensor(),
                   Tensor(), Tensor(), Tensor(), max_first_index, dx);
  }
  return dx;
}

template <const Kernels* K>
struct Impl {
  static FwdOut fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                    const Tensor& cw, const OptTensor& cb, const OptTensor& bnw, const OptTensor& bnb,
                    const OptTensor& rm, const OptTensor& rv, bool spatial_bn, bool bn_training, double eps,
                    bool mean_first, bool max_first_index) {
    return cbam_forward(*K, x, w1, b1, w2, b2, cw, cb, bnw, bnb, rm, rv, spatial_bn, bn_training, eps, mean_first,
                        max_first_index);
  }
  static std::vector<Tensor> bwd(const Tensor& go, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                 const Tensor& w2, const OptTensor& b2, const Tensor& cw, const OptTensor& cb,
                                 const OptTensor& bnw, const OptTensor& bnb, bool spatial_bn, bool bn_training,
                                 double eps, bool mean_first, bool max_first_index, const Tensor& saved,
                                 const Tensor& saved_idx, bool needs_input_grad) {
    return cbam_backward(*K, go, x, w1, b1, w2, b2, cw, cb, bnw, bnb, spatial_bn, bn_training, eps, mean_first,
                         max_first_index, saved, saved_idx, needs_input_grad);
  }
  static std::tuple<Tensor, Tensor> cpool(const Tensor& x, bool f) { return channel_pool(*K, x, f); }
  static Tensor cpool_bwd(const Tensor& g, const Tensor& x, const Tensor& p, const Tensor& s, bool f) {
    return channel_pool_backward(*K, g, x, p, s, f);
  }
  static std::tuple<Tensor, Tensor> spool(const Tensor& x, bool f) { return spatial_pool(*K, x, f); }
  static Tensor spool_bwd(const Tensor& g, const Tensor& x, const Tensor& p, const Tensor& s, bool f) {
    return spatial_pool_backward(*K, g, x, p, s, f);
  }
};

template <const Kernels* K>
void register_impls(torch::Library& m) {
  m.impl("cbam", &Impl<K>::fwd);
  m.impl("cbam_backward", &Impl<K>::bwd);
  m.impl("cbam_channel_pool", &Impl<K>::cpool);
  m.impl("cbam_channel_pool_backward", &Impl<K>::cpool_bwd);
  m.impl("cbam_spatial_pool", &Impl<K>::spool);
  m.impl("cbam_spatial_pool_backward", &Impl<K>::spool_bwd);
}

}  // namespace
}  // namespace cbam
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  // x: [N, C, H, W]; w1: [hidden, C]; w2: [C, hidden] (each may carry 1x1 conv dims); conv_weight:
  // [1, 2, k, k] in the module's input order (mean_first: [mean, max], else [max, mean]). Returns out
  // (in x's memory format: channels_last for a channels_last x, else NCHW) and what the backward
  // needs, packed: saved (the accumulation dtype) and saved_idx (int32), laid out as in
  // csrc/cbam/cbam_saved.h. With spatial_bn and bn_training, the last two elements of saved are the
  // batch mean and biased variance the BN normalized with (the caller updates the running stats).
  m.def(
      "cbam(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_running_mean, Tensor? bn_running_var, bool spatial_bn, "
      "bool bn_training, float bn_eps, bool mean_first, bool max_first_index) -> (Tensor out, Tensor saved, "
      "Tensor saved_idx)");
  // The gradients that exist, in this order: x (when needs_input_grad), w1, w2, conv_weight, then
  // b1, b2, conv_bias, bn_weight, bn_bias for those given (the BN's only with spatial_bn). Each has
  // its input's shape and dtype.
  m.def(
      "cbam_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, bool spatial_bn, bool bn_training, float bn_eps, "
      "bool mean_first, bool max_first_index, Tensor saved, Tensor saved_idx, bool needs_input_grad) -> Tensor[]");
  // pooled [2, N, C] (mean, max over H*W), sel [N, C]
  m.def("cbam_channel_pool(Tensor x, bool max_first_index) -> (Tensor pooled, Tensor sel)");
  m.def(
      "cbam_channel_pool_backward(Tensor grad_pooled, Tensor x, Tensor pooled, Tensor sel, bool max_first_index) "
      "-> Tensor");
  // pooled [N, 2, H, W] (mean, max over C), sel [N, H, W]
  m.def("cbam_spatial_pool(Tensor x, bool max_first_index) -> (Tensor pooled, Tensor sel)");
  m.def(
      "cbam_spatial_pool_backward(Tensor grad_pooled, Tensor x, Tensor pooled, Tensor sel, bool max_first_index) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) { fastnn::cbam::register_impls<&fastnn::cbam::kCpu>(m); }

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) { fastnn::cbam::register_impls<&fastnn::cbam::kCuda>(m); }
#endif
