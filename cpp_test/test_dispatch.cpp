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

static bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

// Fused BN+ReLU training forward against the same formula written with ATen ops.
static void test_bn_relu_train() {
  auto x = at::randn({5, 7, 9, 11});
  auto w = at::rand({7}) + 0.5, b = at::randn({7});
  auto res = op("fastnn::bn_relu_train")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                       const std::optional<at::Tensor>&, double, bool)>()
                 .call(x, w, b, 1e-5, true);
  auto mean = x.mean({0, 2, 3});
  auto var = x.var({0, 2, 3}, /*unbiased=*/false);
  auto shape = std::vector<int64_t>{1, 7, 1, 1};
  auto ref = at::relu((x - mean.view(shape)) / at::sqrt(var.view(shape) + 1e-5) * w.view(shape) + b.view(shape));
  EXPECT(close(std::get<1>(res), mean, 1e-5), "bn_relu_train: mean differs");
  EXPECT(close(std::get<0>(res), ref, 1e-4), "bn_relu_train: output differs from ATen's batch norm + relu");
}

// Stochastic pooling in eval ('activation' mode) is sum(a^2)/sum(a) per window.
static void test_stochastic_pool_eval() {
  auto a = at::rand({3, 4, 10, 14}) + 0.01;
  auto res = op("fastnn::stochastic_pool2d")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                                           c10::IntArrayRef, bool, c10::string_view, bool,
                                                           const std::optional<at::Generator>&)>()
                 .call(a, {2, 2}, {2, 2}, {0, 0}, false, "activation", false, std::nullopt);
  auto ref = at::avg_pool2d(a * a, {2, 2}) / at::avg_pool2d(a, {2, 2});
  EXPECT(close(std::get<0>(res), ref, 1e-5), "stochastic_pool2d eval differs from sum(a^2)/sum(a)");
}

int main() {
  std::printf("fastnn dispatcher test\n");
  at::manual_seed(0);
  test_build_info();
  test_bn_relu_train();
  test_stochastic_pool_eval();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all dispatcher checks passed\n");
  return 0;
}
