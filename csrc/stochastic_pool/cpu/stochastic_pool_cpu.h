#pragma once
#include <ATen/core/Tensor.h>

#include "stochastic_pool/stochastic_pool_math.h"

namespace fastnn {
namespace stochastic_pool {

// Forward: fills out (and offsets in training). Returns true if activation mode saw a negative
// input (those outputs are NaN). x, out, offsets are read/written through g's strides.
bool forward_cpu(const at::Tensor& x, at::Tensor& out, at::Tensor& offsets, const Geometry& g, int mode,
                 bool training, uint64_t seed);

// Backward: writes every element of grad_input (laid out as g.ys).
void backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, at::Tensor& grad_in,
                  const Geometry& g, int mode, bool training);

}  // namespace stochastic_pool
}  // namespace fastnn
