// CBAM: schemas, argument checks and the device-independent orchestration of the fused passes.
//
// Forward (x read 3 times, out written once):
//   1. channel_pool  : mean and max over H*W per (n, c)                 [x-sized pass]
//   2. channel gate g = sigmoid(MLP(mean) + MLP(max))                   [ATen ops on [2N, C]]
//   3. spatial_pool  : mean and max over C of x*g per (n, p)             [x-sized pass; x*g is not stored]
//   4. spatial gate s = sigmoid(BN(conv_kxk([mean, max])))               [ATen ops on [N, 2, H, W]]
//   5. apply_gates   : out = (x*g)*s                                     [x-sized pass]
// Backward (x read 3 times (2 with max_first_index), grad_out read twice, grad_x written once):
//   1. backward_reduce: ds = sum_c dout*x*g and dL/dg (direct part) = sum_p dout*x*s, one pass
//   2. ATen: ds -> sigmoid' -> BN backward -> conv backward -> d(mean_c), d(max_c), dW_conv, dBN
//   3. backward_gate  : dL/dg through the spatial pool = sum_p x*(dmean/C + [argmax] dmax)
//   4. ATen: dL/dg -> sigmoid' -> MLP backward -> d(mean_p), d(max_p), dW1, db1, dW2, db2
//   5. backward_input : grad_x from all paths in one elementwise pass
// Nothing of x's size is saved besides x itself: the op returns the small gates, pooled maps and
// max indices (or tie counts) for the backward. The small ATen parts run in the accumulation type
// (float, or double for double inputs) whatever the dtype of x and of the parameters.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/record_function.h>
#include <torch/library.h>

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

// The whole forward in one launch where it applies (cuda/cbam_cuda.h: fused_forward)
using FusedForwardFn = bool (*)(const Tensor&, bool, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, double, Tensor&, Tensor&, Tensor&, Tensor&, Tensor&, Tensor&, Tensor&,
                                Tensor&);

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
  FusedForwardFn fused_forward;  // null: always the multi-kernel forward
};

const Kernels kCpu{cpu::channel_pool,    cpu::spatial_pool,  cpu::apply_gates,  cpu::backward_reduce,
                   cpu::backward_gate,    cpu::backward_input, cpu::spatial_conv, cpu::spatial_conv_backward,
                   nullptr};
#ifdef FASTNN_WITH_CUDA
const Kernels kCuda{cuda::channel_pool,  cuda::spatial_pool,  cuda::apply_gates, cuda::backward_reduce,
                    cuda::backward_gate, cuda::backward_input, nullptr,           nullptr,
                    cuda::fused_forward};
#endif

// The layout the kernels run in: channels_last when x is channels_last (and not also NCHW
// contiguous, e.g. 1x1 maps), else NCHW. Other strides are copied to NCHW first.
bool use_channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Tensor in_layout(const Tensor& t, bool cl) {
  return t.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor acc(const OptTensor& t, at::ScalarType a) {
  return t.has_value() && t->defined() ? t->to(a) : Tensor();
}

// Stands for an absent gradient: one zero element (0-element tensors would all share a null data
// pointer and count as aliasing each other, which the fake kernels cannot mirror).
Tensor empty0(const Tensor& like) { return at::zeros({1}, like.options()); }

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

void check_params(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                  const Tensor& cw, const OptTensor& cb, bool spatial_bn, bool bn_training, const OptTensor& rm,
                  const OptTensor& rv) {
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
  if (spatial_bn && !bn_training)
    TORCH_CHECK_VALUE(rm.has_value() && rv.has_value() && rm->numel() == 1 && rv->numel() == 1,
                      "spatial BN in eval mode needs running_mean and running_var of one element each");
  if (spatial_bn && bn_training)
    TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 1,
                      "spatial BN in training mode needs more than 1 value (N*H*W > 1), got shape ", x.sizes());
  for (const Tensor* t : {&w1, &w2, &cw}) check_same_device(x, "x", *t, "a parameter");
}

// MLP of the channel gate on v = [mean; max] ([2N, C]): returns the pre-ReLU hidden [2N, Cr]
Tensor mlp_hidden(const Tensor& v, const Tensor& W1, const Tensor& B1) {
  return B1.defined() ? at::addmm(B1, v, W1.t()) : at::mm(v, W1.t());
}

Tensor channel_gate(const Tensor& pooled_c, const Tensor& W1, const Tensor& B1, const Tensor& W2,
                    const Tensor& B2) {
  const int64_t N = pooled_c.size(1), C = pooled_c.size(2);
  Tensor r = at::relu(mlp_hidden(pooled_c.view({2 * N, C}), W1, B1));
  Tensor z2 = B2.defined() ? at::addmm(B2, r, W2.t()) : at::mm(r, W2.t());
  return at::sigmoid(z2.narrow(0, 0, N) + z2.narrow(0, N, N));
}

// conv weight in [mean, max] input order (the kernels always produce mean first)
Tensor conv_weight_mean_first(const Tensor& cw, at::ScalarType a, bool mean_first) {
  Tensor w = cw.to(a);
  return (mean_first ? w : w.flip({1})).contiguous();
}

// y = conv2d(ps, w, b, padding k/2) on [N, 2, H, W] -> [N, 1, H, W]
Tensor spatial_conv(const Kernels& K, const Tensor& ps, const Tensor& w, const Tensor& b) {
  const int64_t k = w.size(2);
  if (!K.spatial_conv) return at::conv2d(ps, w, b, {1, 1}, {k / 2, k / 2});
  Tensor y = at::empty({ps.size(0), 1, ps.size(2), ps.size(3)}, ps.options());
  {
    RECORD_FUNCTION("cbam::spatial_conv", std::vector<c10::IValue>());
    K.spatial_conv(ps, w, y);
  }
  if (b.defined()) y.add_(b.reshape({}));
  return y;
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

using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdOut cbam_forward(const Kernels& K, const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                    const OptTensor& b2, const Tensor& conv_weight, const OptTensor& conv_bias,
                    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& bn_running_mean,
                    const OptTensor& bn_running_var, bool spatial_bn, bool bn_training, double bn_eps,
                    bool mean_first, bool max_first_index) {
  check_params(x, w1, b1, w2, b2, conv_weight, conv_bias, spatial_bn, bn_training, bn_running_mean, bn_running_var);
  // the small ATen parts run in the accumulation type, also under autocast
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool cl = use_channels_last(x);
  const bool first = max_first_index;
  Tensor xc = in_layout(x, cl);
  const auto a = acc_type(x);
  auto opts = x.options().dtype(a);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);

  Tensor pooled_c = at::empty({2, N, C}, opts), sel_c = at::empty({N, C}, opts.dtype(at::kInt));
  if (K.fused_forward && !(spatial_bn && bn_training)) {
    // small samples: everything in one launch (BN statistics from the running buffers only)
    Tensor g = at::empty({N, C}, opts), s = at::empty({N, 1, H, W}, opts);
    Tensor pooled_s = at::empty({N, 2, H, W}, opts), conv_out = at::empty({N, 1, H, W}, opts);
    Tensor sel_s = at::empty({N, H, W}, opts.dtype(at::kInt)), out = at::empty_like(xc);
    Tensor rm = spatial_bn ? acc(bn_running_mean, a) : Tensor(), rv = spatial_bn ? acc(bn_running_var, a) : Tensor();
    Tensor bw = spatial_bn ? acc(bn_weight, a) : Tensor(), bb = spatial_bn ? acc(bn_bias, a) : Tensor();
    bool done;
    {
      RECORD_FUNCTION("cbam::fused_forward", std::vector<c10::IValue>());
      done = K.fused_forward(xc, cl, first, mlp_weight(w1, a).contiguous(), acc(b1, a),
                             mlp_weight(w2, a).contiguous(), acc(b2, a),
                             conv_weight_mean_first(conv_weight, a, mean_first), acc(conv_bias, a), rm, rv, bw, bb,
                             bn_eps, out, g, s, pooled_c, pooled_s, conv_out, sel_c, sel_s);
    }
    if (done) {
      Tensor bn_stats = spatial_bn ? at::stack({rm.reshape({}), rv.reshape({})}) : at::empty({0}, opts);
      return {out, g, s, pooled_c, pooled_s, conv_out, sel_c, sel_s, bn_stats};
    }
  }
  {
    RECORD_FUNCTION("cbam::channel_pool", std::vector<c10::IValue>());
    K.channel_pool(xc, cl, first, pooled_c, sel_c);
  }
  Tensor g = channel_gate(pooled_c, mlp_weight(w1, a), acc(b1, a), mlp_weight(w2, a), acc(b2, a));

  Tensor pooled_s = at::empty({N, 2, H, W}, opts), sel_s = at::empty({N, H, W}, opts.dtype(at::kInt));
  {
    RECORD_FUNCTION("cbam::spatial_pool", std::vector<c10::IValue>());
    K.spatial_pool(xc, cl, g, first, pooled_s, sel_s);
  }
  Tensor y = spatial_conv(K, pooled_s, conv_weight_mean_first(conv_weight, a, mean_first), acc(conv_bias, a));
  Tensor conv_out = y;
  Tensor bn_stats = at::empty({0}, opts);
  if (spatial_bn) {
    Tensor mean, var;
    if (bn_training) {
      mean = y.mean();
      var = (y - mean).square().mean();  // biased, as BatchNorm normalizes with
    } else {
      mean = bn_running_mean->to(a).reshape({});
      var = bn_running_var->to(a).reshape({});
    }
    y = (y - mean) * at::rsqrt(var + bn_eps);
    Tensor bw = acc(bn_weight, a), bb = acc(bn_bias, a);
    if (bw.defined()) y = y * bw.reshape({});
    if (bb.defined()) y = y + bb.reshape({});
    bn_stats = at::stack({mean, var});
  }
  Tensor s = at::sigmoid(y).contiguous();  // [N, 1, H, W]
  Tensor out = at::empty_like(xc);
  {
    RECORD_FUNCTION("cbam::apply_gates", std::vector<c10::IValue>());
    K.apply_gates(xc, cl, g, s, out);
  }
  return {out, g, s, pooled_c, pooled_s, conv_out, sel_c, sel_s, bn_stats};
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut cbam_backward(const Kernels& K, const Tensor& grad_out, const Tensor& x, const Tensor& w1,
                     const OptTensor& b1, const Tensor& w2, const OptTensor& b2, const Tensor& conv_weight,
                     const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias, bool spatial_bn,
                     bool bn_training, double bn_eps, bool mean_first, bool max_first_index, const Tensor& gate_c,
                     const Tensor& gate_s, const Tensor& pooled_c, const Tensor& pooled_s, const Tensor& conv_out,
                     const Tensor& sel_c, const Tensor& sel_s, const Tensor& bn_stats, bool needs_input_grad) {
  check_x(x);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out must have x's dtype ", x.scalar_type(),
                   ", got ", grad_out.scalar_type());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool cl = use_channels_last(x);
  const bool first = max_first_index;
  Tensor xc = in_layout(x, cl), dout = in_layout(grad_out, cl);
  const auto a = acc_type(x);
  auto opts = x.options().dtype(a);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  Tensor g = gate_c.contiguous(), s = gate_s.contiguous();
  Tensor pc = pooled_c.contiguous(), ps = pooled_s.contiguous(), selc = sel_c.contiguous(),
         sels = sel_s.contiguous();

  // 1. the two reductions of dout*x
  Tensor ds = at::empty({N, 1, H, W}, opts), dg = at::empty({N, C}, opts);
  {
    RECORD_FUNCTION("cbam::backward_reduce", std::vector<c10::IValue>());
    K.backward_reduce(dout, xc, cl, g, s, ds, dg);
  }

  // 2. spatial gate backward: sigmoid, BN, conv
  Tensor dy = ds * s * (1 - s);
  Tensor wc = conv_weight_mean_first(conv_weight, a, mean_first);
  Tensor cb = acc(conv_bias, a);
  Tensor d_bn_w = empty0(pooled_s), d_bn_b = empty0(pooled_s);
  if (spatial_bn) {
    const Tensor& y = conv_out;
    Tensor mean = bn_stats[0], invstd = at::rsqrt(bn_stats[1] + bn_eps);
    Tensor xhat = (y - mean) * invstd;
    Tensor bw = acc(bn_weight, a);
    if (bw.defined()) d_bn_w = (dy * xhat).sum().reshape({1}).to(bn_weight->scalar_type());
    if (bn_bias.has_value()) d_bn_b = dy.sum().reshape({1}).to(bn_bias->scalar_type());
    Tensor scale = bw.defined() ? invstd * bw.reshape({}) : invstd;
    dy = bn_training ? scale * (dy - dy.mean() - xhat * (dy * xhat).mean()) : scale * dy;
  }
  auto conv_grads = spatial_conv_backward(K, dy, ps, wc, cb.defined());
  Tensor dps = std::get<0>(conv_grads);
  Tensor dwc = std::get<1>(conv_grads);
  if (!mean_first) dwc = dwc.flip({1});
  Tensor dcb = cb.defined() ? std::get<2>(conv_grads).reshape(conv_bias->sizes()).to(conv_bias->scalar_type())
                            : empty0(pooled_s);
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
  Tensor W1 = mlp_weight(w1, a), W2 = mlp_weight(w2, a), B1 = acc(b1, a);
  Tensor v = pc.view({2 * N, C});
  Tensor h = mlp_hidden(v, W1, B1);
  Tensor r = at::relu(h);
  Tensor dz = dg * g * (1 - g);                                        // [N, C]
  Tensor dW2 = at::mm(dz.t(), r.narrow(0, 0, N) + r.narrow(0, N, N));  // [C, Cr]
  Tensor dr = at::mm(dz, W2);                                          // [N, Cr], same for both rows
  Tensor dh = at::cat({dr, dr}, 0) * (h > 0);                          // [2N, Cr]
  Tensor dW1 = at::mm(dh.t(), v);                                      // [Cr, C]
  Tensor dv = at::mm(dh, W1);                                          // [2N, C]
  Tensor db1 = b1.has_value() ? dh.sum(0).to(b1->scalar_type()) : empty0(pooled_c);
  Tensor db2 = b2.has_value() ? (dz.sum(0) * 2).to(b2->scalar_type()) : empty0(pooled_c);

  // 5. grad_x in one pass
  Tensor dx = empty0(x);
  if (needs_input_grad) {
    Tensor a2 = (dv.narrow(0, 0, N) / static_cast<double>(P)).contiguous();
    Tensor dmx = dv.narrow(0, N, N);
    Tensor e2 = (first ? dmx : dmx / selc).contiguous();
    dx = at::empty_like(xc);
    {
      RECORD_FUNCTION("cbam::backward_input", std::vector<c10::IValue>());
      K.backward_input(dout, xc, cl, g, s, wa, em, ps, sels, a2, e2, pc, selc, first, dx);
    }
  }
  return {dx,
          dW1.to(w1.scalar_type()).view(w1.sizes()),
          db1,
          dW2.to(w2.scalar_type()).view(w2.sizes()),
          db2,
          dwc.to(conv_weight.scalar_type()),
          dcb,
          d_bn_w,
          d_bn_b};
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
  static BwdOut bwd(const Tensor& go, const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                    const OptTensor& b2, const Tensor& cw, const OptTensor& cb, const OptTensor& bnw,
                    const OptTensor& bnb, bool spatial_bn, bool bn_training, double eps, bool mean_first,
                    bool max_first_index, const Tensor& gc, const Tensor& gs, const Tensor& pc, const Tensor& ps,
                    const Tensor& co, const Tensor& selc, const Tensor& sels, const Tensor& stats,
                    bool needs_input_grad) {
    return cbam_backward(*K, go, x, w1, b1, w2, b2, cw, cb, bnw, bnb, spatial_bn, bn_training, eps, mean_first,
                         max_first_index, gc, gs, pc, ps, co, selc, sels, stats, needs_input_grad);
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
  // and what the backward needs: gate_c [N, C], gate_s [N, 1, H, W], pooled_c [2, N, C] (mean, max),
  // pooled_s [N, 2, H, W] (mean, max), conv_out [N, 1, H, W] (the spatial conv's output, before the
  // BN), sel_c [N, C] / sel_s [N, H, W] (first max index, or tie count when max_first_index is
  // false), bn_stats [2] (mean and biased variance the BN normalized with; [0] without BN).
  m.def(
      "cbam(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_running_mean, Tensor? bn_running_var, bool spatial_bn, "
      "bool bn_training, float bn_eps, bool mean_first, bool max_first_index) -> (Tensor out, Tensor gate_c, "
      "Tensor gate_s, Tensor pooled_c, Tensor pooled_s, Tensor conv_out, Tensor sel_c, Tensor sel_s, "
      "Tensor bn_stats)");
  // Gradients of x, w1, b1, w2, b2, conv_weight, conv_bias, bn_weight, bn_bias (a 1-element zero
  // tensor when the input is absent or, for x, when needs_input_grad is false).
  m.def(
      "cbam_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, bool spatial_bn, bool bn_training, float bn_eps, "
      "bool mean_first, bool max_first_index, Tensor gate_c, Tensor gate_s, Tensor pooled_c, Tensor pooled_s, "
      "Tensor conv_out, Tensor sel_c, Tensor sel_s, Tensor bn_stats, bool needs_input_grad) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
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
