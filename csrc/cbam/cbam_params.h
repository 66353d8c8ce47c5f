#pragma once
// The parameters and flags of one CBAM call, as cbam.cpp hands them to a device's whole-op
// implementation (cuda/cbam_cuda.h: forward / backward). Absent optional tensors are undefined.
#include <ATen/core/Tensor.h>

namespace fastnn {
namespace cbam {

struct OpParams {
  at::Tensor w1;  // [Cr, C] or [Cr, C, 1, 1], any floating dtype (as the module holds it)
  at::Tensor b1;  // [Cr] or undefined
  at::Tensor w2;  // [C, Cr] or [C, Cr, 1, 1]
  at::Tensor b2;  // [C] or undefined
  at::Tensor cw;  // [1, 2, k, k] in the module's input order (mean_first: [mean, max])
  at::Tensor cb;  // [1] or undefined
  at::Tensor bnw, bnb, rm, rv;  // spatial BN (1 element each) or undefined
  double eps = 1e-5;
  bool spatial_bn = false, bn_training = false, mean_first = true, first = true;
};

}  // namespace cbam
}  // namespace fastnn
