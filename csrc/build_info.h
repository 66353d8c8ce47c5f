#pragma once
#include <string>
#include <vector>
#include <utility>

namespace fastnn {
// What this binary was built with: torch version, CUDA version, archs, compiler.
std::vector<std::pair<std::string, std::string>> build_info();
bool built_with_cuda();
}  // namespace fastnn
