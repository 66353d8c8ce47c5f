#pragma once
// What the CBAM forward keeps for the backward, packed into two flat buffers (one allocation each
// instead of one per small tensor: on the GPU the forward is bound by per-call host work at the
// ResNet shapes). Host-side only; shared by cbam.cpp, the CPU and the CUDA orchestration and
// mirrored by the fake kernels in fastnn/ops/cbam.py (_saved_sizes).
//
// saved (the accumulation type: float, or double for double x), element offsets:
//   g   [N, C]      channel gate
//   s   [N, P]      spatial gate
//   pc  [2, N, C]   channel pool: mean over H*W, then max
//   ps  [N, 2, P]   spatial pool of x*g: mean over C, then max
//   co  [N, P]      the spatial conv's output (before the BN)
//   h   [2N, Cr]    the MLP's hidden layer before the ReLU (rows: mean rows, then max rows)
//   bn  [2]         mean and biased variance the spatial BN normalized with (absent without BN)
// saved_idx (int32): selc [N, C], sels [N, P]: first max index, or tie count (split ties).
// The padding between regions is zero (the op's outputs are deterministic).
#include <cstdint>

namespace fastnn {
namespace cbam {

struct SavedLayout {
  int64_t g, s, pc, ps, co, h, bn, total;  // offsets into saved, and its size
  int64_t selc, sels, itotal;              // offsets into saved_idx, and its size

  // Every region starts at a multiple of 16 elements (64 bytes for float and int32), so the CUDA
  // kernels can read any of them in 16- or 32-byte vectors.
  static int64_t pad(int64_t n) { return (n + 15) / 16 * 16; }

  static SavedLayout make(int64_t N, int64_t C, int64_t P, int64_t Cr, bool spatial_bn) {
    SavedLayout L;
    L.g = 0;
    L.s = L.g + pad(N * C);
    L.pc = L.s + pad(N * P);
    L.ps = L.pc + pad(2 * N * C);
    L.co = L.ps + pad(2 * N * P);
    L.h = L.co + pad(N * P);
    L.bn = L.h + pad(2 * N * Cr);
    L.total = L.bn + (spatial_bn ? 2 : 0);
    L.selc = 0;
    L.sels = pad(N * C);
    L.itotal = L.sels + N * P;
    L.used[0] = L.g + N * C;  // where each region's data ends (the padding after it is zeroed)
    L.used[1] = L.s + N * P;
    L.used[2] = L.pc + 2 * N * C;
    L.used[3] = L.ps + 2 * N * P;
    L.used[4] = L.co + N * P;
    L.used[5] = L.h + 2 * N * Cr;
    L.iused = L.selc + N * C;
    return L;
  }

  // The padding between regions: saved [used[r], next(r)) for r < 6, saved_idx [iused, sels).
  int64_t used[6];
  int64_t iused;
  int64_t next(int r) const {
    const int64_t starts[6] = {s, pc, ps, co, h, bn};
    return starts[r];
  }
};

}  // namespace cbam
}  // namespace fastnn
