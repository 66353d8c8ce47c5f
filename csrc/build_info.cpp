#include "build_info.h"

#include <torch/library.h>

#ifndef FASTNN_TORCH_VERSION
#define FASTNN_TORCH_VERSION "unknown"
#endif
#ifndef FASTNN_CUDA_VERSION
#define FASTNN_CUDA_VERSION ""
#endif
#ifndef FASTNN_CUDA_ARCHS
#define FASTNN_CUDA_ARCHS ""
#endif

namespace fastnn {

bool built_with_cuda() {
#ifdef FASTNN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::pair<std::string, std::string>> build_info() {
  return {
      {"torch_version", FASTNN_TORCH_VERSION},
      {"cuda_version", FASTNN_CUDA_VERSION},
      {"cuda_archs", FASTNN_CUDA_ARCHS},
      {"with_cuda", built_with_cuda() ? "1" : "0"},
#if defined(__clang__)
      {"compiler", "clang " __clang_version__},
#elif defined(__GNUC__)
      {"compiler", "gcc " __VERSION__},
#else
      {"compiler", "unknown"},
#endif
#ifdef _OPENMP
      {"openmp", "1"},
#else
      {"openmp", "0"},
#endif
  };
}

}  // namespace fastnn

// The namespace is created here, once; each op adds its schemas with
// TORCH_LIBRARY_FRAGMENT(fastnn, m) in csrc/<op>/<op>.cpp.
TORCH_LIBRARY(fastnn, m) {
  // Reachable from C++ (no Python) too, e.g. by the ctest program.
  m.def("build_info() -> str[]", []() {
    std::vector<std::string> out;
    for (auto& kv : fastnn::build_info()) out.push_back(kv.first + "=" + kv.second);
    return out;
  });
}
