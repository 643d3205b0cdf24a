// C entry points to the CUDA kernels compiled against the CPU emulation (csrc/emu/cuda_emu.h), for
// ctypes (tests/cuda_emu.py). Pointers are host memory; each call returns 0, or 1 with the error text
// in emu_error().
#include <exception>
#include <string>

#include "../ofa_ext.h"
#include "cuda_emu.h"

namespace {
std::string error_text;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    error_text = e.what();
    return 1;
  }
}

ofa::NormPtrs ptrs(int x_dt, int y_dt, const void* x, int64_t xs, const void* w, const void* b, void* mean,
                   void* rstd) {
  return {static_cast<ofa::DType>(x_dt), static_cast<ofa::DType>(y_dt), x, xs, w, b, mean, rstd};
}
}  // namespace

extern "C" {

const char* emu_error() { return error_text.c_str(); }

void emu_configure(int sm_count, int blocks_per_sm, int max_threads_per_block, int threads_per_sm) {
  ofa_emu::sm_count = sm_count;
  ofa_emu::blocks_per_sm = blocks_per_sm;
  ofa_emu::threads_per_sm = threads_per_sm;
  ofa_emu::max_threads_per_block = max_threads_per_block;
}

int emu_num_parts(int64_t M, int64_t N, int x_dt, int y_dt, int double_backward) {
  int parts = -1;
  if (guarded([&] {
        parts = ofa::cuda_num_parts(M, N, static_cast<ofa::DType>(x_dt), static_cast<ofa::DType>(y_dt),
                                    double_backward != 0);
      }))
    return -1;
  return parts;
}

int emu_norm_fwd(int64_t M, int64_t N, int is_rms, double offset, int x_dt, int y_dt, const void* x, int64_t xs,
                 const void* w, const void* b, void* mean, void* rstd, void* y, int64_t ys, double eps,
                 int cast_mode) {
  return guarded([&] {
    ofa::cuda_norm_fwd({M, N, is_rms != 0, offset}, ptrs(x_dt, y_dt, x, xs, w, b, mean, rstd), y, ys, eps, cast_mode,
                       nullptr);
  });
}

int emu_norm_bwd(int64_t M, int64_t N, int is_rms, double offset, int x_dt, int y_dt, const void* x, int64_t xs,
                 const void* w, void* mean, void* rstd, const void* dy, int64_t dys, void* dx, int64_t dxs,
                 void* dw_part, void* db_part, int parts, int cast_mode) {
  return guarded([&] {
    ofa::cuda_norm_bwd({M, N, is_rms != 0, offset}, ptrs(x_dt, y_dt, x, xs, w, nullptr, mean, rstd), dy, dys, dx,
                       dxs, dw_part, db_part, parts, cast_mode, nullptr);
  });
}

int emu_norm_bwd_bwd(int64_t M, int64_t N, int is_rms, double offset, int x_dt, int y_dt, const void* x,
                     int64_t xs, const void* w, void* mean, void* rstd, const void* dy, int64_t dys, const void* a,
                     int64_t as, const void* bw, const void* e, void* d_dy, int64_t d_dys, void* d_x, int64_t d_xs,
                     void* dw_part, int parts) {
  return guarded([&] {
    ofa::cuda_norm_bwd_bwd({M, N, is_rms != 0, offset}, ptrs(x_dt, y_dt, x, xs, w, nullptr, mean, rstd), dy, dys, a,
                           as, bw, e, d_dy, d_dys, d_x, d_xs, dw_part, parts, nullptr);
  });
}

int emu_probe_perturb(int x_dt, const void* x, int64_t xs, void* y, int64_t ys, const void* gamma, void* scale,
                      const int64_t* keys, int64_t M, int64_t N, int64_t rows_per_probe, int64_t row_offset,
                      double eps, int scale_by_rms, int add_x, int gaussian) {
  return guarded([&] {
    ofa::cuda_probe_perturb(static_cast<ofa::DType>(x_dt), x, xs, y, ys, gamma, scale, keys, M, N, rows_per_probe,
                            row_offset, eps, scale_by_rms != 0, add_x != 0, gaussian != 0, nullptr);
  });
}
}
