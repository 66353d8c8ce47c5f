#pragma once
// Argument checks for the C++ boundary. The Python API validates first and gives
// friendlier messages; these guard callers of torch.ops.fastnn.* / C++ users.
#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

#define FASTNN_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace fastnn {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor, got ", t.dim(), "-D with shape ",
                    t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device(),
                    "; move them to the same device");
}

}  // namespace fastnn
