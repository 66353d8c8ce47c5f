// The CPU kernels compiled for AVX2 + FMA (x86-64 only). The package is built for baseline
// x86-64; cbam_cpu.cpp calls these when the CPU has AVX2 and FMA.
#include "cbam/cpu/cbam_cpu_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTNN_CBAM_HAVE_AVX2_TU 1
// Everything below (the kernels, their lambdas) is compiled for AVX2; the headers above are not.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTNN_CBAM_ISA avx2
#include "cbam/cpu/cbam_cpu_kernels.h"

namespace fastnn {
namespace cbam {
namespace cpu {
namespace avx2 {
FASTNN_CBAM_DEFINE_ENTRIES()
}  // namespace avx2
}  // namespace cpu
}  // namespace cbam
}  // namespace fastnn
#pragma GCC pop_options
#endif
