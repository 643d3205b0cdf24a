// ofa_kernels native extension: the interface between the kernels and the torch bindings.
//
// Kernel files (csrc/cuda/*.cu, csrc/cpu/*.cpp) take raw pointers, sizes and (for CUDA) a stream,
// and include no torch headers, so `nvcc -c` compiles the CUDA ones without a CUDA build of torch.
// csrc/bindings.cpp converts tensors and checks arguments.
//
// Conventions (the same contract as ofa_kernels/eager/norm.py, which documents the maths):
//   x: [M, N] rows with stride x_stride (elements), last-dim stride 1. "Row tensors" y, dy, dx,
//   grad_dx, d_dy, d_x use the given row strides. Weights/bias arrive converted to the accumulation
//   type (float, or double for double inputs) and contiguous. mean/rstd: [M] accumulation type
//   (mean unused for RMSNorm). Partials: [num_parts, N] accumulation type, summed by the caller in
//   a fixed order (deterministic). `dt` pairs: x's type and the type of y / dy (either x's or the
//   accumulation type).
#pragma once
#include <cstdint>

struct CUstream_st;  // cudaStream_t's struct, declared here so no CUDA header is needed

namespace ofa {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// The output's cast rule, as ofa_kernels/precision.py numbers CAST_MODES (tests/test_precision.py holds
// the two together): llama rounds the normalised row to x's type before the gain; gemma and none do not.
enum CastMode : int { kCastLlama = 0, kCastGemma = 1, kCastNone = 2 };

struct NormShape {
  int64_t M, N;
  bool is_rms;
  double offset;  // gain = offset + w
};

struct NormPtrs {
  DType x_dt, y_dt;          // x (and dx, grad_dx, d_x); y (and dy, d_dy)
  const void* x; int64_t x_stride;
  const void* w;             // accumulation type, or nullptr
  const void* b;             // accumulation type, or nullptr
  void* mean; void* rstd;    // accumulation type
};

// ---------------------------------------------------------------- CPU (csrc/cpu/norm.cpp)
void cpu_norm_fwd(const NormShape& s, const NormPtrs& p, void* y, int64_t y_stride, double eps, int cast_mode);
void cpu_norm_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, void* dx,
                  int64_t dx_stride, void* dw_part, void* db_part, int num_parts, int cast_mode);
void cpu_norm_bwd_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, const void* a,
                      int64_t a_stride, const void* bw, const void* e, void* d_dy, int64_t d_dy_stride, void* d_x,
                      int64_t d_x_stride, void* dw_part, int num_parts);
// y = (add_x ? x : 0) + s_r * gamma * nu (counter-based probes, as ofa_kernels/rng.py); scale[r] = s_r.
// Row r is row (r mod rows_per_probe) + row_offset of probe r / rows_per_probe's slab (a shard of a batch).
void cpu_probe_perturb(DType x_dt, const void* x, int64_t x_stride, void* y, int64_t y_stride, const void* gamma,
                       void* scale, const int64_t* keys, int64_t M, int64_t N, int64_t rows_per_probe,
                       int64_t row_offset, double eps, bool scale_by_rms, bool add_x, bool gaussian);

// ------------------------------------------------------------- CUDA (csrc/cuda/*.cu)
#ifdef OFA_WITH_CUDA
typedef ::CUstream_st* Stream;
// CTAs (= weight-gradient partial rows) the backward (or double backward) kernel will launch.
int cuda_num_parts(int64_t M, int64_t N, DType x_dt, DType y_dt, bool double_backward);
void cuda_norm_fwd(const NormShape& s, const NormPtrs& p, void* y, int64_t y_stride, double eps, int cast_mode,
                   Stream stream);
void cuda_norm_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, void* dx,
                   int64_t dx_stride, void* dw_part, void* db_part, int num_parts, int cast_mode, Stream stream);
void cuda_norm_bwd_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, const void* a,
                       int64_t a_stride, const void* bw, const void* e, void* d_dy, int64_t d_dy_stride, void* d_x,
                       int64_t d_x_stride, void* dw_part, int num_parts, Stream stream);
// As cpu_probe_perturb.
void cuda_probe_perturb(DType x_dt, const void* x, int64_t x_stride, void* y, int64_t y_stride, const void* gamma,
                        void* scale, const int64_t* keys, int64_t M, int64_t N, int64_t rows_per_probe,
                        int64_t row_offset, double eps, bool scale_by_rms, bool add_x, bool gaussian, Stream stream);
#endif

}  // namespace ofa
