// A CPU emulation of the small part of CUDA the kernels in csrc/cuda use, so tests can run them here.
//
// Compiled instead of the CUDA headers when OFA_CUDA_EMU is defined (g++ -x c++ on the .cu files; see
// tests/cuda_emu.py). A launch runs its blocks one after another; each block's threads are OS threads,
// so __syncthreads and warp shuffles are real barriers: a missing barrier, a wrong index, a reduction
// over the wrong threads or a row counted twice show up as wrong numbers. What it cannot show: timing,
// register spills, alignment faults, memory-model subtleties beyond barriers. Dynamic shared memory is
// filled with NaN bytes at every block start so reads of unwritten shared memory poison the result.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace ofa_emu {

struct Warp {
  explicit Warp(std::ptrdiff_t n) : bar(n) {}
  std::barrier<> bar;
  alignas(8) unsigned char slot[32][8];
};

struct Block {
  Block(unsigned threads, std::size_t smem_bytes) : bar(threads), smem((smem_bytes + 15) / 16 + 1) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>(32));
    std::memset(smem.data(), 0xFF, smem.size() * sizeof(smem[0]));  // NaN in every float type
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  struct alignas(16) Chunk { unsigned char b[16]; };
  std::vector<Chunk> smem;
};

inline thread_local dim3 thread_idx;
inline thread_local Warp* warp = nullptr;
inline dim3 block_idx, block_dim, grid_dim;
inline Block* block = nullptr;
inline int sm_count = 3;        // a small "GPU", so persistent grids stride over rows in the tests
inline int blocks_per_sm = 2;            // what the occupancy query reports, unless threads_per_sm is set:
inline int threads_per_sm = 0;           // then min(32, threads_per_sm / block threads), as a real SM's limits
inline int max_threads_per_block = 1024;  // what cudaFuncGetAttributes reports (registers allowing)
inline int last_error = 0;
inline std::string last_error_text;

// Runs body() as a grid of `grid` blocks of `threads` threads, block after block.
template <typename F>
void run(unsigned grid, unsigned threads, std::size_t smem_bytes, F&& body) {
  if (grid == 0 || threads == 0 || threads > static_cast<unsigned>(max_threads_per_block) || threads % 32 != 0 ||
      smem_bytes > 48 * 1024) {
    last_error = 1;
    last_error_text = "invalid launch: grid " + std::to_string(grid) + ", threads " + std::to_string(threads) +
                      ", shared bytes " + std::to_string(smem_bytes);
    return;
  }
  grid_dim = {grid};
  block_dim = {threads};
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = {b};
    Block blk(threads, smem_bytes);
    block = &blk;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&blk, &body, t] {
        thread_idx = {t};
        warp = blk.warps[t / 32].get();
        body();
        warp->bar.arrive_and_drop();  // an exited thread no longer holds back the others' barriers
        blk.bar.arrive_and_drop();
      });
    for (auto& th : pool) th.join();
    block = nullptr;
  }
}

}  // namespace ofa_emu

#define threadIdx (::ofa_emu::thread_idx)
#define blockIdx (::ofa_emu::block_idx)
#define blockDim (::ofa_emu::block_dim)
#define gridDim (::ofa_emu::grid_dim)

inline void __syncthreads() { ofa_emu::block->bar.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  ofa_emu::Warp* w = ofa_emu::warp;
  const int lane = static_cast<int>(threadIdx.x & 31);
  std::memcpy(w->slot[lane], &v, sizeof(T));
  w->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, w->slot[(lane ^ lane_mask) & 31], sizeof(T));
  w->bar.arrive_and_wait();
  return out;
}

inline unsigned char* ofa_emu_dynamic_smem() { return ofa_emu::block->smem.data()->b; }

inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

// 16-bit float types with the CUDA conversion functions the kernels use (round to nearest even).
struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<std::uint16_t>(0x7FC0)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>(u >> 16)};
}

// The runtime calls the host code makes.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
typedef struct CUstream_st* cudaStream_t;
inline const char* cudaGetErrorString(cudaError_t) { return ofa_emu::last_error_text.c_str(); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = ofa_emu::sm_count;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, std::size_t) {
  *n = ofa_emu::threads_per_sm > 0 ? std::min(32, ofa_emu::threads_per_sm / threads) : ofa_emu::blocks_per_sm;
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K) {
  attr->maxThreadsPerBlock = ofa_emu::max_threads_per_block;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const int e = ofa_emu::last_error;
  ofa_emu::last_error = 0;
  return e ? cudaErrorInvalidConfiguration : cudaSuccess;
}
