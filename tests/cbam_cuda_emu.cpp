// CPU emulation of CBAM's whole-op CUDA path (csrc/cbam/cuda/cbam_cuda_fast.cu), for
// tests/test_cbam.py::test_cuda_kernels_emulated_on_cpu: the .cu file is compiled as C++ with the
// CUDA names below, and every launch runs its blocks one after another with one std::thread per
// CUDA thread; __syncthreads is a block barrier, warp shuffles exchange through a per-warp buffer
// between two warp barriers (threads that return leave both barriers, as exited GPU threads do).
// So the indexing, the shared-memory and shuffle reductions, the partial sums and the host-side
// launch logic of the GPU code run on CPU tensors and are compared with the CPU op. Not emulated:
// the GPU's fast-math exp/division (results differ in the last bits) and warp scheduling (a race
// that needs a particular interleaving would go unseen; the barriers order what CUDA orders).
// Built by the test with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <array>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define FASTNN_CBAM_EMULATE 1

// ---------------------------------------------------------------- the CUDA names the kernels use
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: a function-local static is the block's

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using std::max;
using std::min;

namespace emu {

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<std::array<uint64_t, 32>> slot;
  explicit Block(int n) : bar(n), slot(n / 32) {
    for (int w = 0; w < n / 32; ++w) warp_bar.emplace_back(new std::barrier<>(32));
  }
};

inline thread_local Idx tid, bid;
inline thread_local dim3 bdim, gdim;
inline thread_local Block* block = nullptr;
inline std::vector<unsigned char> dyn_smem;

inline int sms() {
  const char* e = std::getenv("FASTNN_CBAM_EMU_SMS");
  return e ? std::atoi(e) : 4;
}

template <class F>
struct Runner {
  dim3 g, b;
  size_t smem;
  F f;
  template <class... A>
  void operator()(A... a) {
    const int nt = static_cast<int>(b.x * b.y * b.z);
    TORCH_CHECK(nt % 32 == 0 && b.y == 1 && b.z == 1, "emulator: 1-D blocks of whole warps only");
    dyn_smem.assign(std::max<size_t>(smem, 1), 0);
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) {
          Block blk(nt);
          std::vector<std::thread> th;
          th.reserve(nt);
          for (int t = 0; t < nt; ++t)
            th.emplace_back([&, t] {
              tid = Idx{static_cast<unsigned>(t), 0, 0};
              bid = Idx{x, y, z};
              bdim = b;
              gdim = g;
              block = &blk;
              f(a...);
              blk.warp_bar[t / 32]->arrive_and_drop();
              blk.bar.arrive_and_drop();
            });
          for (auto& t : th) t.join();
        }
  }
};

template <class F>
Runner<F> make_runner(dim3 g, dim3 b, size_t smem, F f) {
  return Runner<F>{g, b, smem, f};
}

}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  emu::block->slot[w][lane] = raw;
  emu::block->warp_bar[w]->arrive_and_wait();
  const uint64_t o = emu::block->slot[w][lane ^ m];
  emu::block->warp_bar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &o, sizeof(T));
  return r;
}

#define CBAM_LAUNCH(grid, block_, smem, stream, ...) \
  emu::make_runner(dim3(grid), dim3(block_), size_t(smem), [&](auto... a_) { __VA_ARGS__(a_...); })
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
struct EmuProps {
  int multiProcessorCount;
};
inline const EmuProps* getCurrentDeviceProperties() {
  static thread_local EmuProps p;
  p.multiProcessorCount = emu::sms();
  return &p;
}
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace at

#define CBAM_DYNAMIC_SMEM(name) unsigned char* name = emu::dyn_smem.data()

#include "../csrc/cbam/cuda/cbam_cuda_fast.cu"

// ---------------------------------------------------------------- bindings (mirroring cbam.cpp)
namespace {

using at::Tensor;
using fastnn::cbam::OpParams;
using fastnn::cbam::SavedLayout;

OpParams params(const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2, const std::optional<Tensor>& b2,
                const Tensor& cw, const std::optional<Tensor>& cb, const std::optional<Tensor>& bnw,
                const std::optional<Tensor>& bnb, const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
                bool spatial_bn, bool bn_training, double eps, bool mean_first, bool first) {
  auto o = [](const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); };
  OpParams p;
  p.w1 = w1;
  p.b1 = o(b1);
  p.w2 = w2;
  p.b2 = o(b2);
  p.cw = cw;
  p.cb = o(cb);
  if (spatial_bn) {
    p.bnw = o(bnw);
    p.bnb = o(bnb);
    p.rm = o(rm);
    p.rv = o(rv);
  }
  p.eps = eps;
  p.spatial_bn = spatial_bn;
  p.bn_training = bn_training;
  p.mean_first = mean_first;
  p.first = first;
  return p;
}

bool channels_last(const Tensor& x) { return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast); }

std::vector<Tensor> emu_forward(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                                const std::optional<Tensor>& b2, const Tensor& cw, const std::optional<Tensor>& cb,
                                const std::optional<Tensor>& bnw, const std::optional<Tensor>& bnb,
                                const std::optional<Tensor>& rm, const std::optional<Tensor>& rv, bool spatial_bn,
                                bool bn_training, double eps, bool mean_first, bool first) {
  const bool cl = channels_last(x);
  Tensor xc = x.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const OpParams p = params(w1, b1, w2, b2, cw, cb, bnw, bnb, rm, rv, spatial_bn, bn_training, eps, mean_first, first);
  const SavedLayout L = SavedLayout::make(x.size(0), x.size(1), x.size(2) * x.size(3), w1.size(0), spatial_bn);
  Tensor out = at::empty_like(xc);
  Tensor saved = at::empty({L.total}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  Tensor saved_idx = at::empty({L.itotal}, x.options().dtype(at::kInt));
  saved.fill_(std::nan(""));  // regions a kernel fails to write show up
  saved_idx.fill_(-7);
  TORCH_CHECK(fastnn::cbam::cuda::forward(xc, cl, p, out, saved, saved_idx), "emulator: forward declined");
  return {out, saved, saved_idx};
}

std::vector<Tensor> emu_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w1,
                                 const std::optional<Tensor>& b1, const Tensor& w2, const std::optional<Tensor>& b2,
                                 const Tensor& cw, const std::optional<Tensor>& cb, const std::optional<Tensor>& bnw,
                                 const std::optional<Tensor>& bnb, bool spatial_bn, bool bn_training, double eps,
                                 bool mean_first, bool first, const Tensor& saved, const Tensor& saved_idx,
                                 bool needs_input_grad) {
  const bool cl = channels_last(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor xc = x.contiguous(fmt), dout = grad_out.contiguous(fmt);
  const OpParams p = params(w1, b1, w2, b2, cw, cb, bnw, bnb, std::nullopt, std::nullopt, spatial_bn, bn_training,
                            eps, mean_first, first);
  std::vector<Tensor> grads;
  TORCH_CHECK(fastnn::cbam::cuda::backward(dout, xc, cl, p, saved, saved_idx, needs_input_grad, grads),
              "emulator: backward declined");
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emu_forward);
  m.def("backward", &emu_backward);
}
