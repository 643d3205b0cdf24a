// The sharpness probe perturbation in CUDA: y = (add_x ? x : 0) + s_r * gamma * nu, with nu drawn by
// the counter-based generator of ofa_kernels/rng.py (same bits as the Triton kernel and the host).
#include "../ofa_ext.h"
#include "common.cuh"

namespace ofa {
namespace cuda {
namespace {

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t bits(uint32_t c, uint32_t k0, uint32_t k1) { return mix32(mix32(c ^ k0) + k1); }

__device__ __forceinline__ float probe_value(uint32_t c, uint32_t k0, uint32_t k1, bool gaussian) {
  if (!gaussian) return 1.0f - 2.0f * static_cast<float>(bits(c, k0, k1) >> 31);
  const float u1 = static_cast<float>((bits(2u * c, k0, k1) >> 8) + 1u) * 5.9604644775390625e-08f;
  const float u2 = static_cast<float>(bits(2u * c + 1u, k0, k1) >> 8) * 5.9604644775390625e-08f;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

template <typename T>
__global__ void perturb_kernel(const T* __restrict__ x, int64_t xs, T* __restrict__ y, int64_t ys,
                               const typename AccOf<T>::type* __restrict__ gamma, typename AccOf<T>::type* scale_out,
                               const int64_t* __restrict__ keys, int64_t M, int64_t N, int64_t rows_per_probe,
                               int64_t row_offset, double eps, bool scale_by_rms, bool add_x, bool gaussian) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * xs;
    A scale = static_cast<A>(eps);
    if (scale_by_rms) {
      A sq[1] = {0};
      for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
        const A v = to_acc<A>(xr[c]);
        sq[0] += v * v;
      }
      block_sum<A, 1>(sq, scratch);
      const A rms = sqrt(sq[0] / static_cast<A>(N));
      scale = static_cast<A>(eps) * (rms > 0 ? rms : A(1));
    }
    const int64_t probe = row / rows_per_probe, local = row - probe * rows_per_probe + row_offset;
    const uint32_t k0 = static_cast<uint32_t>(keys[2 * probe]), k1 = static_cast<uint32_t>(keys[2 * probe + 1]);
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const A nu = static_cast<A>(probe_value(static_cast<uint32_t>(local * N + c), k0, k1, gaussian));
      A out = scale * gamma[c] * nu;
      if (add_x) out += to_acc<A>(xr[c]);
      y[row * ys + c] = Cast<T>::to(out);
    }
    if (threadIdx.x == 0) scale_out[row] = scale;
  }
}

template <typename T>
void launch(const void* x, int64_t xs, void* y, int64_t ys, const void* gamma, void* scale, const int64_t* keys,
            int64_t M, int64_t N, int64_t rpp, int64_t off, double eps, bool by_rms, bool add_x, bool gaussian,
            Stream stream) {
  using A = typename AccOf<T>::type;
  const int threads = threads_for(N, 1) > 256 ? 256 : threads_for(N, 1);
  const int64_t cap = int64_t(sm_count()) * 8, grid = M < cap ? M : cap;
  launch_kernel(perturb_kernel<T>, grid, threads, 0, stream, static_cast<const T*>(x), xs, static_cast<T*>(y), ys,
                static_cast<const A*>(gamma), static_cast<A*>(scale), keys, M, N, rpp, off, eps, by_rms, add_x,
                gaussian);
  check(cudaGetLastError(), "probe_perturb launch");
}

}  // namespace
}  // namespace cuda

void cuda_probe_perturb(DType x_dt, const void* x, int64_t x_stride, void* y, int64_t y_stride, const void* gamma,
                        void* scale, const int64_t* keys, int64_t M, int64_t N, int64_t rows_per_probe,
                        int64_t row_offset, double eps, bool scale_by_rms, bool add_x, bool gaussian, Stream stream) {
  if (M == 0) return;
  switch (x_dt) {
    case DType::f16: return cuda::launch<__half>(x, x_stride, y, y_stride, gamma, scale, keys, M, N, rows_per_probe,
                                                 row_offset, eps, scale_by_rms, add_x, gaussian, stream);
    case DType::bf16: return cuda::launch<__nv_bfloat16>(x, x_stride, y, y_stride, gamma, scale, keys, M, N,
                                                         rows_per_probe, row_offset, eps, scale_by_rms, add_x,
                                                         gaussian, stream);
    case DType::f32: return cuda::launch<float>(x, x_stride, y, y_stride, gamma, scale, keys, M, N, rows_per_probe,
                                                row_offset, eps, scale_by_rms, add_x, gaussian, stream);
    case DType::f64: return cuda::launch<double>(x, x_stride, y, y_stride, gamma, scale, keys, M, N, rows_per_probe,
                                                 row_offset, eps, scale_by_rms, add_x, gaussian, stream);
  }
}

}  // namespace ofa
