#pragma once
// CUDA launchers of stochastic pooling (definitions in stochastic_pool_cuda.cu, compiled only
// with FASTNN_WITH_CUDA). Plain C++ header: included by stochastic_pool.cpp.
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "stochastic_pool/stochastic_pool_math.h"

namespace fastnn {
namespace stochastic_pool {

// Returns true if activation mode saw a negative input (those outputs are NaN). With sync_check
// the kernel's flag is read back once (one 4-byte copy and a stream sync); without it, or while a
// CUDA graph is being captured, there is no check and the NaN outputs are the signal.
bool forward_cuda(const at::Tensor& x, at::Tensor& out, at::Tensor& offsets, const Geometry& g, int mode,
                  bool training, const std::optional<at::Generator>& generator, bool sync_check);

void backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, at::Tensor& grad_in,
                   const Geometry& g, int mode, bool training);

}  // namespace stochastic_pool
}  // namespace fastnn
