#pragma once
// What the op layer (conv_bn_relu.cpp) hands to the CPU and CUDA kernels.
// Only ATen core headers: this is included by the .cu files too.
#include <ATen/core/Tensor.h>

namespace fastnn {
namespace cbr {

// Memory layout of an activation the kernels read or write. The op layer makes sure the
// tensor is dense in one of these two layouts (copying other strides first):
//   nhwc == false: contiguous, memory [N][C][S]   (NCHW, or any (N, C, *) tensor)
//   nhwc == true : channels_last, memory [N*S][C] (4-D NHWC)
struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;  // product of the sizes after dim 1 (H*W)
  bool nhwc;
  int64_t count() const { return N * S; }  // values per channel
};

// Per-channel tensors, all contiguous 1-D of size C in the statistics dtype (float32, or
// float64 for float64 activations). weight/bias are undefined for affine=False.
struct Params {
  at::Tensor mean;
  at::Tensor var;  // biased batch variance
  at::Tensor weight;
  at::Tensor bias;
  double eps;
  bool relu;
};

}  // namespace cbr
}  // namespace fastnn
