// Shared device helpers: type conversion, 16-byte vector access, block reductions, launch sizing.
// With OFA_CUDA_EMU the same code compiles as C++ against a CPU emulation (csrc/emu/cuda_emu.h).
#pragma once
#ifdef OFA_CUDA_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace ofa {
namespace cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

template <typename T> struct Cast;
template <> struct Cast<float> { template <typename A> __device__ static float to(A v) { return static_cast<float>(v); } };
template <> struct Cast<double> { template <typename A> __device__ static double to(A v) { return static_cast<double>(v); } };
template <> struct Cast<__half> {
  template <typename A> __device__ static __half to(A v) { return __float2half_rn(static_cast<float>(v)); }
};
template <> struct Cast<__nv_bfloat16> {
  template <typename A> __device__ static __nv_bfloat16 to(A v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

// V consecutive elements moved as one aligned access (16 bytes for the input type).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename A, typename T, int V>
__device__ __forceinline__ void load(const T* p, A (&out)[V]) {
  Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_acc<A>(pk.v[i]);
}

template <typename T, typename A, int V>
__device__ __forceinline__ void store(T* p, const A (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = Cast<T>::to(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Sums K values over the block in a fixed order (deterministic). scratch: 32 * K accumulators.
template <typename A, int K>
__device__ __forceinline__ void block_sum(A (&v)[K], A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A s = lane < warps ? scratch[lane * K + k] : A(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) scratch[k] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch[k];
  __syncthreads();
}

// The block's dynamic shared memory (sized by the launch).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef OFA_CUDA_EMU
  return ofa_emu_dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
#endif
}

// Launches kernel<<<grid, threads, smem, stream>>>(args...) (run on the CPU emulation with OFA_CUDA_EMU).
template <typename... P, typename... Args>
void launch_kernel(void (*kernel)(P...), int64_t grid, int threads, size_t smem, CUstream_st* stream,
                   Args&&... args) {
#ifdef OFA_CUDA_EMU
  (void)stream;
  ofa_emu::run(static_cast<unsigned>(grid), static_cast<unsigned>(threads), smem,
               [&] { kernel(static_cast<P>(args)...); });
#else
  kernel<<<static_cast<unsigned>(grid), threads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<P>(args)...);
#endif
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline int current_device() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

// compute() for `key`, worked out once per process: driver queries cost host time on every launch.
// Each call site (its lambda's type) has its own table.
template <typename Value, typename Key, typename Compute>
Value once(const Key& key, Compute&& compute) {
  static std::mutex mu;
  static std::map<Key, Value> known;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  const Value value = compute();
  std::lock_guard<std::mutex> lock(mu);
  known.emplace(key, value);
  return value;
}

// SMs of the current device (a driver query the first time only).
inline int sm_count() {
  const int dev = current_device();
  return once<int>(dev, [dev] {
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    return sms;
  });
}

// Threads per row: enough vectors of V for one sweep of the row, 32..512.
inline int threads_for(int64_t N, int V) {
  int64_t vecs = (N + V - 1) / V, t = 32;
  while (t < vecs && t < 512) t <<= 1;
  return static_cast<int>(t);
}

inline bool aligned(const void* p, int64_t stride_elems, int elem_size, int V) {
  const int64_t bytes = static_cast<int64_t>(elem_size) * V;
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride_elems * elem_size) % bytes == 0);
}

}  // namespace cuda
}  // namespace ofa
