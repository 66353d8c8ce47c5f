#pragma once
// Per-element math shared by the CPU and CUDA kernels is written once as
// FASTNN_HD functions, so the CPU tests also cover what the GPU computes.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#else
#define FASTNN_HD inline
#endif
