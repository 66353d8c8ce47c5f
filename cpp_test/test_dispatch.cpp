// Calls fastnn ops through the PyTorch dispatcher from C++, with no Python:
// what a libtorch user linking libfastnn does. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

static int failures = 0;
#define EXPECT(cond, ...)                         \
  do {                                            \
    if (!(cond)) {                                \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);          \
      std::fprintf(stderr, "\n");                 \
      ++failures;                                 \
    }                                             \
  } while (0)

static c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

static void test_build_info() {
  auto info = op("fastnn::build_info").typed<std::vector<std::string>()>().call();
  bool has_torch = false;
  for (auto& kv : info) {
    std::printf("  %s\n", kv.c_str());
    if (kv.rfind("torch_version=", 0) == 0) has_torch = kv.size() > 14;
  }
  EXPECT(has_torch, "build_info lacks torch_version");
}

int main() {
  std::printf("fastnn dispatcher test\n");
  test_build_info();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all dispatcher checks passed\n");
  return 0;
}
