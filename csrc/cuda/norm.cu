// RMSNorm / LayerNorm forward, backward and double backward in CUDA (no torch headers).
//
// One CTA works on one row at a time over a persistent grid (grid-stride over rows). Each thread
// owns the same columns of every row (16-byte vectors of the input type), so the weight-gradient
// partial of a CTA accumulates in shared memory (or, for very wide rows, in the CTA's own partial
// row in global memory) without atomics, and is written once as that CTA's fp32 partial row; the
// caller sums the partials in a fixed order. Row statistics are fp32 (fp64 for fp64) with block
// reductions in a fixed order. The maths and notation: ofa_kernels/eager/norm.py.
#include <initializer_list>
#include <utility>

#include "../ofa_ext.h"
#include "common.cuh"

namespace ofa {
namespace cuda {
namespace {

constexpr int kSmemBudget = 48 * 1024;  // dynamic shared memory without opting in

template <typename TX, typename TY, int V>
__global__ void norm_fwd_kernel(const TX* __restrict__ x, int64_t xs, TY* __restrict__ y, int64_t ys,
                                const typename AccOf<TX>::type* __restrict__ w,
                                const typename AccOf<TX>::type* __restrict__ b, typename AccOf<TX>::type* mean_out,
                                typename AccOf<TX>::type* rstd_out, int64_t M, int64_t N,
                                typename AccOf<TX>::type eps, typename AccOf<TX>::type offset, bool is_rms,
                                int cast_mode) {
  using A = typename AccOf<TX>::type;
  __shared__ A scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const TX* xr = x + row * xs;
    A mean = 0;
    if (!is_rms) {
      A s[1] = {0};
      for (int64_t c = threadIdx.x * V; c < N; c += step) {
        A v[V];
        load<A>(xr + c, v);
#pragma unroll
        for (int i = 0; i < V; ++i) s[0] += v[i];
      }
      block_sum<A, 1>(s, scratch);
      mean = s[0] / static_cast<A>(N);
    }
    A sq[1] = {0};
    for (int64_t c = threadIdx.x * V; c < N; c += step) {
      A v[V];
      load<A>(xr + c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) sq[0] += (v[i] - mean) * (v[i] - mean);
    }
    block_sum<A, 1>(sq, scratch);
    const A rstd = rsqrt(sq[0] / static_cast<A>(N) + eps);
    for (int64_t c = threadIdx.x * V; c < N; c += step) {
      A v[V], out[V];
      load<A>(xr + c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        A xhat = (v[i] - mean) * rstd;
        A o = xhat;
        if (w != nullptr) {
          const A g = w[c + i] + offset;
          o = (cast_mode == 0 ? to_acc<A>(Cast<TX>::to(xhat)) : xhat) * g;
        }
        if (b != nullptr) o += b[c + i];
        out[i] = o;
      }
      store<TY>(y + row * ys + c, out);
    }
    if (threadIdx.x == 0) {
      if (!is_rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// The CTA's weight-gradient accumulators: shared memory when they fit, else its own partial rows.
template <typename A>
__device__ __forceinline__ A* accumulator(A* smem, A* part, int which, int64_t N, bool in_smem) {
  return in_smem ? smem + which * N : part + blockIdx.x * N;
}

template <typename A, int V>
__device__ __forceinline__ void zero_own(A* acc, int64_t N) {
  for (int64_t c = threadIdx.x * V; c < N; c += static_cast<int64_t>(blockDim.x) * V)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[c + i] = 0;
}

template <typename A, int V>
__device__ __forceinline__ void flush_own(const A* acc, A* part, int64_t N) {
  for (int64_t c = threadIdx.x * V; c < N; c += static_cast<int64_t>(blockDim.x) * V)
#pragma unroll
    for (int i = 0; i < V; ++i) part[blockIdx.x * N + c + i] = acc[c + i];
}

template <typename TX, typename TY, int V>
__global__ void norm_bwd_kernel(const TY* __restrict__ dy, int64_t dys, const TX* __restrict__ x, int64_t xs,
                                const typename AccOf<TX>::type* __restrict__ w,
                                const typename AccOf<TX>::type* __restrict__ mean,
                                const typename AccOf<TX>::type* __restrict__ rstd, TX* __restrict__ dx, int64_t dxs,
                                typename AccOf<TX>::type* dw_part, typename AccOf<TX>::type* db_part, int64_t M,
                                int64_t N, typename AccOf<TX>::type offset, bool is_rms, bool need_dw, bool need_db,
                                int cast_mode, bool in_smem) {
  using A = typename AccOf<TX>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ A scratch[64];
  A* smem = reinterpret_cast<A*>(smem_raw);
  A* dw_acc = accumulator(smem, dw_part, 0, N, in_smem && need_dw);
  A* db_acc = accumulator(smem, db_part, need_dw ? 1 : 0, N, in_smem && need_db);
  if (need_dw) zero_own<A, V>(dw_acc, N);
  if (need_db) zero_own<A, V>(db_acc, N);
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const A mu_x = is_rms ? A(0) : mean[row], r = rstd[row];
    const TX* xr = x + row * xs;
    const TY* dyr = dy + row * dys;
    A s[2] = {0, 0};
    if (dx != nullptr) {
      for (int64_t c = threadIdx.x * V; c < N; c += step) {
        A xv[V], dv[V];
        load<A>(xr + c, xv);
        load<A>(dyr + c, dv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
          s[0] += u;
          s[1] += u * ((xv[i] - mu_x) * r);
        }
      }
      block_sum<A, 2>(s, scratch);
    }
    const A m_u = is_rms ? A(0) : s[0] / static_cast<A>(N), m_ux = s[1] / static_cast<A>(N);
    for (int64_t c = threadIdx.x * V; c < N; c += step) {
      A xv[V], dv[V], out[V];
      load<A>(xr + c, xv);
      load<A>(dyr + c, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
        out[i] = (u - m_ux * xhat - m_u) * r;
        if (need_dw) dw_acc[c + i] += dv[i] * (cast_mode == 0 ? to_acc<A>(Cast<TX>::to(xhat)) : xhat);
        if (need_db) db_acc[c + i] += dv[i];
      }
      if (dx != nullptr) store<TX>(dx + row * dxs + c, out);
    }
  }
  if (in_smem && need_dw) flush_own<A, V>(dw_acc, dw_part, N);
  if (in_smem && need_db) flush_own<A, V>(db_acc, db_part, N);
}

template <typename TX, typename TY, int V>
__global__ void norm_bwd_bwd_kernel(const TY* __restrict__ dy, int64_t dys, const TX* __restrict__ x, int64_t xs,
                                    const typename AccOf<TX>::type* __restrict__ w,
                                    const typename AccOf<TX>::type* __restrict__ mean,
                                    const typename AccOf<TX>::type* __restrict__ rstd, const TX* __restrict__ a,
                                    int64_t as, const typename AccOf<TX>::type* __restrict__ bw,
                                    const typename AccOf<TX>::type* __restrict__ e, TY* __restrict__ d_dy,
                                    int64_t d_dys, TX* __restrict__ d_x, int64_t d_xs,
                                    typename AccOf<TX>::type* dw_part, int64_t M, int64_t N,
                                    typename AccOf<TX>::type offset, bool is_rms, bool in_smem) {
  using A = typename AccOf<TX>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ A scratch[32 * 7];
  const bool need_dw = dw_part != nullptr;
  A* dw_acc = accumulator(reinterpret_cast<A*>(smem_raw), dw_part, 0, N, in_smem && need_dw);
  if (need_dw) zero_own<A, V>(dw_acc, N);
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const A mu_x = is_rms ? A(0) : mean[row], r = rstd[row];
    const TX* xr = x + row * xs;
    const TY* dyr = dy + row * dys;
    const TX* ar = a != nullptr ? a + row * as : nullptr;
    // s: u, u*xhat, a, a*xhat, a*u, w2, w2*xhat  (w2 = bw * dy)
    A s[7] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = threadIdx.x * V; c < N; c += step) {
      A xv[V], dv[V], av[V] = {};
      load<A>(xr + c, xv);
      load<A>(dyr + c, dv);
      if (ar != nullptr) load<A>(ar + c, av);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
        const A w2 = bw != nullptr ? bw[c + i] * dv[i] : A(0);
        s[0] += u; s[1] += u * xhat; s[2] += av[i]; s[3] += av[i] * xhat; s[4] += av[i] * u;
        s[5] += w2; s[6] += w2 * xhat;
      }
    }
    block_sum<A, 7>(s, scratch);
    const A n = static_cast<A>(N);
    const A c2 = s[1] / n, mu = is_rms ? A(0) : s[0] / n, ma = is_rms ? A(0) : s[2] / n, ca = s[3] / n;
    const A mau = s[4] / n, mw2 = is_rms ? A(0) : s[5] / n, cb = s[6] / n;
    const A coef = 3 * ca * c2 - mau + ma * mu;
    for (int64_t c = threadIdx.x * V; c < N; c += step) {
      A xv[V], dv[V], av[V] = {}, o_dy[V], o_x[V];
      load<A>(xr + c, xv);
      load<A>(dyr + c, dv);
      if (ar != nullptr) load<A>(ar + c, av);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A g = w != nullptr ? w[c + i] + offset : A(1);
        const A u = dv[i] * g;
        const A bwi = bw != nullptr ? bw[c + i] : A(0);
        const A w2 = bwi * dv[i];
        const A ja = r * (av[i] - ma - ca * xhat);
        o_dy[i] = g * ja + bwi * xhat + (e != nullptr ? e[c + i] : A(0));
        o_x[i] = r * r * (coef * xhat - c2 * (av[i] - ma) - ca * (u - mu)) + r * (w2 - mw2 - cb * xhat);
        if (need_dw) dw_acc[c + i] += dv[i] * ja;
      }
      if (d_dy != nullptr) store<TY>(d_dy + row * d_dys + c, o_dy);
      if (d_x != nullptr) store<TX>(d_x + row * d_xs + c, o_x);
    }
  }
  if (in_smem && need_dw) flush_own<A, V>(dw_acc, dw_part, N);
}

// ------------------------------------------------------------------------------ host dispatch

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<TX>, Tag<TY>) for the (x, y) dtype pairs the bindings produce.
template <typename Fn>
void dispatch_types(DType x_dt, DType y_dt, Fn&& fn) {
  const bool same = x_dt == y_dt;
  switch (x_dt) {
    case DType::f16:
      if (same) return fn(Tag<__half>{}, Tag<__half>{});
      if (y_dt == DType::f32) return fn(Tag<__half>{}, Tag<float>{});
      break;
    case DType::bf16:
      if (same) return fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      if (y_dt == DType::f32) return fn(Tag<__nv_bfloat16>{}, Tag<float>{});
      break;
    case DType::f32:
      if (same) return fn(Tag<float>{}, Tag<float>{});
      break;
    case DType::f64:
      if (same) return fn(Tag<double>{}, Tag<double>{});
      break;
  }
  throw std::invalid_argument("ofa CUDA norms: unsupported dtype pair (x, y/dy); expected y in x's or fp32");
}

template <typename TX, typename TY>
bool vectorizable(int64_t N, std::initializer_list<std::pair<const void*, int64_t>> xs,
                  std::initializer_list<std::pair<const void*, int64_t>> ys) {
  constexpr int V = 16 / sizeof(TX);
  if (N % V != 0) return false;
  for (auto& p : xs)
    if (!aligned(p.first, p.second, sizeof(TX), V)) return false;
  for (auto& p : ys)
    if (!aligned(p.first, p.second, sizeof(TY), V)) return false;
  return true;
}

int parts_for(int64_t M) {
  const int64_t parts = static_cast<int64_t>(sm_count()) * 4;
  return static_cast<int>(M < parts ? (M > 0 ? M : 1) : parts);
}

}  // namespace
}  // namespace cuda

int cuda_num_parts(int64_t M) { return cuda::parts_for(M); }

void cuda_norm_fwd(const NormShape& s, const NormPtrs& p, void* y, int64_t y_stride, double eps, int cast_mode,
                   Stream stream) {
  using namespace cuda;
  if (s.M == 0) return;
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    using A = typename AccOf<TX>::type;
    constexpr int VV = 16 / sizeof(TX);
    const bool vec = vectorizable<TX, TY>(s.N, {{p.x, p.x_stride}}, {{y, y_stride}});
    const int threads = threads_for(s.N, vec ? VV : 1);
    const int64_t grid = s.M < int64_t(sm_count()) * (2048 / threads) ? s.M : int64_t(sm_count()) * (2048 / threads);
    auto args = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(grid), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          static_cast<const TX*>(p.x), p.x_stride, static_cast<TY*>(y), y_stride, static_cast<const A*>(p.w),
          static_cast<const A*>(p.b), static_cast<A*>(p.mean), static_cast<A*>(p.rstd), s.M, s.N, A(eps),
          A(s.offset), s.is_rms, cast_mode);
    };
    if (vec) args(norm_fwd_kernel<TX, TY, VV>); else args(norm_fwd_kernel<TX, TY, 1>);
    check(cudaGetLastError(), "norm_fwd launch");
  });
}

void cuda_norm_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, void* dx,
                   int64_t dx_stride, void* dw_part, void* db_part, int num_parts, int cast_mode, Stream stream) {
  using namespace cuda;
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    using A = typename AccOf<TX>::type;
    constexpr int VV = 16 / sizeof(TX);
    const bool vec = vectorizable<TX, TY>(s.N, {{p.x, p.x_stride}, {dx, dx_stride}}, {{dy, dy_stride}});
    const int threads = threads_for(s.N, vec ? VV : 1) > 256 ? 256 : threads_for(s.N, vec ? VV : 1);
    const int n_acc = (dw_part != nullptr) + (db_part != nullptr);
    const size_t smem = sizeof(A) * static_cast<size_t>(s.N) * n_acc;
    const bool in_smem = smem <= static_cast<size_t>(kSmemBudget);
    auto args = [&](auto kernel) {
      kernel<<<num_parts, threads, in_smem ? smem : 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          static_cast<const TY*>(dy), dy_stride, static_cast<const TX*>(p.x), p.x_stride, static_cast<const A*>(p.w),
          static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), static_cast<TX*>(dx), dx_stride,
          static_cast<A*>(dw_part), static_cast<A*>(db_part), s.M, s.N, A(s.offset), s.is_rms, dw_part != nullptr,
          db_part != nullptr, cast_mode, in_smem);
    };
    if (vec) args(norm_bwd_kernel<TX, TY, VV>); else args(norm_bwd_kernel<TX, TY, 1>);
    check(cudaGetLastError(), "norm_bwd launch");
  });
}

void cuda_norm_bwd_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, const void* a,
                       int64_t a_stride, const void* bw, const void* e, void* d_dy, int64_t d_dy_stride, void* d_x,
                       int64_t d_x_stride, void* dw_part, int num_parts, Stream stream) {
  using namespace cuda;
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    using A = typename AccOf<TX>::type;
    constexpr int VV = 16 / sizeof(TX);
    const bool vec = vectorizable<TX, TY>(s.N, {{p.x, p.x_stride}, {a, a_stride}, {d_x, d_x_stride}},
                                          {{dy, dy_stride}, {d_dy, d_dy_stride}});
    const int threads = threads_for(s.N, vec ? VV : 1) > 256 ? 256 : threads_for(s.N, vec ? VV : 1);
    const size_t smem = dw_part != nullptr ? sizeof(A) * static_cast<size_t>(s.N) : 0;
    const bool in_smem = smem <= static_cast<size_t>(kSmemBudget);
    auto args = [&](auto kernel) {
      kernel<<<num_parts, threads, in_smem ? smem : 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          static_cast<const TY*>(dy), dy_stride, static_cast<const TX*>(p.x), p.x_stride, static_cast<const A*>(p.w),
          static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), static_cast<const TX*>(a), a_stride,
          static_cast<const A*>(bw), static_cast<const A*>(e), static_cast<TY*>(d_dy), d_dy_stride,
          static_cast<TX*>(d_x), d_x_stride, static_cast<A*>(dw_part), s.M, s.N, A(s.offset), s.is_rms, in_smem);
    };
    if (vec) args(norm_bwd_bwd_kernel<TX, TY, VV>); else args(norm_bwd_bwd_kernel<TX, TY, 1>);
    check(cudaGetLastError(), "norm_bwd_bwd launch");
  });
}

}  // namespace ofa
