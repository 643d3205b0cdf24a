// The sharpness probe perturbation on CPU: y = (add_x ? x : 0) + s_r * gamma * nu, nu drawn by the
// counter-based generator of ofa_kernels/rng.py (the same bits as the CUDA and Triton kernels).
// OpenMP across rows; the values depend only on (keys, row, column), never on the thread count.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "../ofa_ext.h"

namespace ofa {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

inline uint32_t bits(uint32_t c, uint32_t k0, uint32_t k1) { return mix32(mix32(c ^ k0) + k1); }

inline float probe_value(uint32_t c, uint32_t k0, uint32_t k1, bool gaussian) {
  if (!gaussian) return 1.0f - 2.0f * static_cast<float>(bits(c, k0, k1) >> 31);
  const float u1 = static_cast<float>((bits(2u * c, k0, k1) >> 8) + 1u) * 5.9604644775390625e-08f;
  const float u2 = static_cast<float>(bits(2u * c + 1u, k0, k1) >> 8) * 5.9604644775390625e-08f;
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T>
void perturb(const T* x, int64_t xs, T* y, int64_t ys, const void* gamma_v, void* scale_v, const int64_t* keys,
             int64_t M, int64_t N, int64_t rows_per_probe, int64_t row_offset, double eps, bool scale_by_rms,
             bool add_x, bool gaussian) {
  using A = typename AccOf<T>::type;
  const A* gamma = static_cast<const A*>(gamma_v);
  A* scale_out = static_cast<A*>(scale_v);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < M; ++row) {
    const T* xr = x + row * xs;
    A scale = static_cast<A>(eps);
    if (scale_by_rms) {
      A sq = 0;
      for (int64_t c = 0; c < N; ++c) sq += static_cast<A>(xr[c]) * static_cast<A>(xr[c]);
      const A rms = std::sqrt(sq / static_cast<A>(N));
      scale = static_cast<A>(eps) * (rms > 0 ? rms : A(1));
    }
    const int64_t probe = row / rows_per_probe, local = row - probe * rows_per_probe + row_offset;
    const uint32_t k0 = static_cast<uint32_t>(keys[2 * probe]), k1 = static_cast<uint32_t>(keys[2 * probe + 1]);
    T* yr = y + row * ys;
    for (int64_t c = 0; c < N; ++c) {
      const A nu = static_cast<A>(probe_value(static_cast<uint32_t>(local * N + c), k0, k1, gaussian));
      A out = scale * gamma[c] * nu;
      if (add_x) out += static_cast<A>(xr[c]);
      yr[c] = static_cast<T>(out);
    }
    scale_out[row] = scale;
  }
}

}  // namespace

void cpu_probe_perturb(DType x_dt, const void* x, int64_t x_stride, void* y, int64_t y_stride, const void* gamma,
                       void* scale, const int64_t* keys, int64_t M, int64_t N, int64_t rows_per_probe,
                       int64_t row_offset, double eps, bool scale_by_rms, bool add_x, bool gaussian) {
  switch (x_dt) {
#define OFA_PERTURB(T)                                                                                            \
  return perturb<T>(static_cast<const T*>(x), x_stride, static_cast<T*>(y), y_stride, gamma, scale, keys, M, N, \
                    rows_per_probe, row_offset, eps, scale_by_rms, add_x, gaussian)
    case DType::f16: OFA_PERTURB(c10::Half);
    case DType::bf16: OFA_PERTURB(c10::BFloat16);
    case DType::f32: OFA_PERTURB(float);
    case DType::f64: OFA_PERTURB(double);
#undef OFA_PERTURB
  }
}

}  // namespace ofa
