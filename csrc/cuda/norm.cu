// RMSNorm / LayerNorm forward, backward and double backward in CUDA (no torch headers).
//
// A CTA works on R rows at a time over a persistent grid (grid-stride over groups of R rows): its
// threads form R equal groups of G = blockDim / R threads (whole warps), one row per group, so short
// rows still fill a CTA and several rows are in flight per CTA (R = 1 for the looped path). Each thread
// owns the same columns of every row (16-byte vectors of the input type), read once into registers in
// the input type for rows up to 8 vectors per thread (any width otherwise, re-read from cache), so the
// weight-gradient partial of a CTA accumulates in registers (or shared memory, or for very wide rows
// the CTA's own partial row) without atomics; its R groups add theirs into the CTA's fp32 partial row
// in group order; the caller sums the partials in a fixed order. Row statistics are fp32 (fp64 for
// fp64) with group reductions in a fixed order. The maths and notation: ofa_kernels/eager/norm.py.
#include <cstdlib>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../ofa_ext.h"
#include "common.cuh"

namespace ofa {
namespace cuda {
namespace {

constexpr int kSmemBudget = 48 * 1024;  // dynamic shared memory without opting in
constexpr int kMaxItems = 8;             // vectors per thread kept in registers
constexpr int kMaxRows = 8;              // rows per CTA by the occupancy rule (the override may ask more)

// This thread's place in its CTA: `rows` groups of `size` threads (a multiple of 32), one row per group.
struct Group {
  int rows, size, index, lane;
  __device__ __forceinline__ explicit Group(int rows_per_cta)
      : rows(rows_per_cta), size(static_cast<int>(blockDim.x) / rows_per_cta),
        index(static_cast<int>(threadIdx.x) / size), lane(static_cast<int>(threadIdx.x) - index * size) {}
};

// Visits this thread's columns of a row: c = (lane + j * group size) * V. ITEMS > 0: exactly ITEMS
// (unrolled; the row is cached in registers); ITEMS == 0: a loop over any width.
template <int ITEMS, int V, typename F>
__device__ __forceinline__ void for_cols(const Group& g, int64_t N, F&& f) {
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t c = (static_cast<int64_t>(g.lane) + static_cast<int64_t>(j) * g.size) * V;
      if (c < N) f(j, c);
    }
  } else {
    for (int64_t c = static_cast<int64_t>(g.lane) * V; c < N; c += static_cast<int64_t>(g.size) * V) f(0, c);
  }
}

// Sums K values over the thread's group in a fixed order; every thread of the group gets the sums.
// Called by every thread of the CTA alike (it may hold __syncthreads). scratch: 32 * K accumulators.
template <typename A, int K>
__device__ __forceinline__ void group_sum(const Group& g, A (&v)[K], A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  if (g.size == 32) return;  // the warp is the group (the same for every group of the CTA)
  const int warps = g.size >> 5, first = g.index * warps;
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  __syncthreads();
  if (warp == first) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A s = lane < warps ? scratch[(first + lane) * K + k] : A(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) scratch[first * K + k] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch[first * K + k];
  __syncthreads();
}

// This thread's part of one row: read once into registers in the input type (ITEMS > 0: half the
// registers of fp32 for 16-bit inputs) or re-read from memory; zeros for a group with no row.
template <typename A, typename T, int V, int ITEMS>
struct Cached {
  Pack<T, V> v[ITEMS > 0 ? ITEMS : 1];
  const T* row;
  __device__ __forceinline__ void fill(const Group& g, const T* r, int64_t N, bool live) {
    row = r;
    if constexpr (ITEMS > 0) {
      for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
        if (live) {
          v[j] = *reinterpret_cast<const Pack<T, V>*>(r + c);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) v[j].v[i] = Cast<T>::to(A(0));
        }
      });
    }
  }
  __device__ __forceinline__ void get(int j, int64_t c, A (&out)[V]) const {
    if constexpr (ITEMS > 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = to_acc<A>(v[j].v[i]);
    } else {
      load<A>(row + c, out);
    }
  }
};

// A group's weight-gradient accumulator over its rows: registers (ITEMS > 0), else shared memory or,
// for rows too wide for it, the CTA's own partial row (one row per CTA there). Only the owning thread
// touches a column until flush, which adds the groups' registers into the CTA's partial row in group order.
template <typename A, int V, int ITEMS>
struct Accum {
  A r[ITEMS > 0 ? ITEMS : 1][V];
  A* mem;
  bool in_part;
  __device__ __forceinline__ void init(const Group& g, A* smem, A* part, int64_t N) {
    in_part = smem == nullptr;
    mem = in_part ? part + blockIdx.x * N : smem;
    if constexpr (ITEMS > 0) {
#pragma unroll
      for (int j = 0; j < ITEMS; ++j)
#pragma unroll
        for (int i = 0; i < V; ++i) r[j][i] = 0;
    } else {
      for_cols<0, V>(g, N, [&](int, int64_t c) {
#pragma unroll
        for (int i = 0; i < V; ++i) mem[c + i] = 0;
      });
    }
  }
  __device__ __forceinline__ void add(int j, int64_t c, int i, A val) {
    if constexpr (ITEMS > 0) r[j][i] += val; else mem[c + i] += val;
  }
  __device__ __forceinline__ void flush(const Group& g, A* part, int64_t N) {
    A* dst = part + blockIdx.x * N;
    if constexpr (ITEMS > 0) {
#pragma unroll 1
      for (int k = 0; k < g.rows; ++k) {
        if (g.index == k) {
          for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
            if (k > 0) {
              A prev[V];
              load<A>(dst + c, prev);
#pragma unroll
              for (int i = 0; i < V; ++i) r[j][i] = prev[i] + r[j][i];
            }
            store<A>(dst + c, r[j]);
          });
        }
        if (g.rows > 1) __syncthreads();  // the next group reads what this one wrote
      }
    } else if (!in_part) {
      for_cols<0, V>(g, N, [&](int, int64_t c) {
#pragma unroll
        for (int i = 0; i < V; ++i) dst[c + i] = mem[c + i];
      });
    }
  }
};

// The row groups of a persistent grid (rows per CTA: 1 on the looped path, set by the host): every
// thread runs the same iterations (group_sum's barriers); `row` is its group's row and `live` whether
// it exists.
#define OFA_FOR_ROW_GROUPS(g, M)                                                                       \
  for (int64_t base_ = static_cast<int64_t>(blockIdx.x) * (g).rows; base_ < (M);                      \
       base_ += static_cast<int64_t>(gridDim.x) * (g).rows)

template <typename TX, typename TY, int V, int ITEMS>
__global__ void norm_fwd_kernel(const TX* __restrict__ x, int64_t xs, TY* __restrict__ y, int64_t ys,
                                const typename AccOf<TX>::type* __restrict__ w,
                                const typename AccOf<TX>::type* __restrict__ b, typename AccOf<TX>::type* mean_out,
                                typename AccOf<TX>::type* rstd_out, int64_t M, int64_t N,
                                typename AccOf<TX>::type eps, typename AccOf<TX>::type offset, bool is_rms,
                                int cast_mode, int rows) {
  using A = typename AccOf<TX>::type;
  __shared__ A scratch[32];
  const Group g(rows);
  Cached<A, TX, V, ITEMS> xc;
  OFA_FOR_ROW_GROUPS(g, M) {
    const int64_t row = base_ + g.index;
    const bool live = row < M;
    xc.fill(g, x + (live ? row : 0) * xs, N, live);
    A mean = 0;
    if (!is_rms) {
      A s[1] = {0};
      for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
        A v[V];
        xc.get(j, c, v);
#pragma unroll
        for (int i = 0; i < V; ++i) s[0] += v[i];
      });
      group_sum<A, 1>(g, s, scratch);
      mean = s[0] / static_cast<A>(N);
    }
    A sq[1] = {0};
    for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
      A v[V];
      xc.get(j, c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) sq[0] += (v[i] - mean) * (v[i] - mean);
    });
    group_sum<A, 1>(g, sq, scratch);
    if (!live) continue;  // no barrier below
    const A rstd = rsqrt(sq[0] / static_cast<A>(N) + eps);
    for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
      A v[V], out[V];
      xc.get(j, c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (v[i] - mean) * rstd;
        A o = xhat;
        if (w != nullptr) o = (cast_mode == kCastLlama ? to_acc<A>(Cast<TX>::to(xhat)) : xhat) * (w[c + i] + offset);
        if (b != nullptr) o += b[c + i];
        out[i] = o;
      }
      store<TY>(y + row * ys + c, out);
    });
    if (g.lane == 0) {
      if (!is_rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

template <typename TX, typename TY, int V, int ITEMS>
__global__ void norm_bwd_kernel(const TY* __restrict__ dy, int64_t dys, const TX* __restrict__ x, int64_t xs,
                                const typename AccOf<TX>::type* __restrict__ w,
                                const typename AccOf<TX>::type* __restrict__ mean,
                                const typename AccOf<TX>::type* __restrict__ rstd, TX* __restrict__ dx, int64_t dxs,
                                typename AccOf<TX>::type* dw_part, typename AccOf<TX>::type* db_part, int64_t M,
                                int64_t N, typename AccOf<TX>::type offset, bool is_rms, int cast_mode, bool in_smem,
                                int rows) {
  using A = typename AccOf<TX>::type;
  unsigned char* smem_raw = dynamic_smem();
  __shared__ A scratch[64];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const Group g(rows);
  const bool need_dw = dw_part != nullptr, need_db = db_part != nullptr;
  Accum<A, V, ITEMS> dw_acc, db_acc;
  if (need_dw) dw_acc.init(g, in_smem ? smem : nullptr, dw_part, N);
  if (need_db) db_acc.init(g, in_smem ? smem + (need_dw ? N : 0) : nullptr, db_part, N);
  Cached<A, TX, V, ITEMS> xc;
  Cached<A, TY, V, ITEMS> dyc;
  OFA_FOR_ROW_GROUPS(g, M) {
    const int64_t row = base_ + g.index;
    const bool live = row < M;
    const A mu_x = is_rms || !live ? A(0) : mean[row], r = live ? rstd[row] : A(0);
    xc.fill(g, x + (live ? row : 0) * xs, N, live);
    dyc.fill(g, dy + (live ? row : 0) * dys, N, live);
    A s[2] = {0, 0};
    if (dx != nullptr) {
      for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
        A xv[V], dv[V];
        xc.get(j, c, xv);
        dyc.get(j, c, dv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
          s[0] += u;
          s[1] += u * ((xv[i] - mu_x) * r);
        }
      });
      group_sum<A, 2>(g, s, scratch);
    }
    if (!live) continue;  // no barrier below
    const A m_u = is_rms ? A(0) : s[0] / static_cast<A>(N), m_ux = s[1] / static_cast<A>(N);
    for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
      A xv[V], dv[V], out[V];
      xc.get(j, c, xv);
      dyc.get(j, c, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
        out[i] = (u - m_ux * xhat - m_u) * r;
        if (need_dw) dw_acc.add(j, c, i, dv[i] * (cast_mode == kCastLlama ? to_acc<A>(Cast<TX>::to(xhat)) : xhat));
        if (need_db) db_acc.add(j, c, i, dv[i]);
      }
      if (dx != nullptr) store<TX>(dx + row * dxs + c, out);
    });
  }
  if (need_dw) dw_acc.flush(g, dw_part, N);
  if (need_db) db_acc.flush(g, db_part, N);
}

template <typename TX, typename TY, int V, int ITEMS>
__global__ void norm_bwd_bwd_kernel(const TY* __restrict__ dy, int64_t dys, const TX* __restrict__ x, int64_t xs,
                                    const typename AccOf<TX>::type* __restrict__ w,
                                    const typename AccOf<TX>::type* __restrict__ mean,
                                    const typename AccOf<TX>::type* __restrict__ rstd, const TX* __restrict__ a,
                                    int64_t as, const typename AccOf<TX>::type* __restrict__ bw,
                                    const typename AccOf<TX>::type* __restrict__ e, TY* __restrict__ d_dy,
                                    int64_t d_dys, TX* __restrict__ d_x, int64_t d_xs,
                                    typename AccOf<TX>::type* dw_part, int64_t M, int64_t N,
                                    typename AccOf<TX>::type offset, bool is_rms, bool in_smem, int rows) {
  using A = typename AccOf<TX>::type;
  unsigned char* smem_raw = dynamic_smem();
  __shared__ A scratch[32 * 7];
  const Group g(rows);
  const bool need_dw = dw_part != nullptr;
  Accum<A, V, ITEMS> dw_acc;
  if (need_dw) dw_acc.init(g, in_smem ? reinterpret_cast<A*>(smem_raw) : nullptr, dw_part, N);
  Cached<A, TX, V, ITEMS> xc, ac;
  Cached<A, TY, V, ITEMS> dyc;
  OFA_FOR_ROW_GROUPS(g, M) {
    const int64_t row = base_ + g.index;
    const bool live = row < M;
    const int64_t at = live ? row : 0;
    const A mu_x = is_rms || !live ? A(0) : mean[row], r = live ? rstd[row] : A(0);
    xc.fill(g, x + at * xs, N, live);
    dyc.fill(g, dy + at * dys, N, live);
    if (a != nullptr) ac.fill(g, a + at * as, N, live);
    auto a_of = [&](int j, int64_t c, A (&out)[V]) {
      if (a != nullptr) {
        ac.get(j, c, out);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = 0;
      }
    };
    // s: u, u*xhat, a, a*xhat, a*u, w2, w2*xhat  (w2 = bw * dy)
    A s[7] = {0, 0, 0, 0, 0, 0, 0};
    for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
      A xv[V], dv[V], av[V];
      xc.get(j, c, xv);
      dyc.get(j, c, dv);
      a_of(j, c, av);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A u = w != nullptr ? dv[i] * (w[c + i] + offset) : dv[i];
        const A w2 = bw != nullptr ? bw[c + i] * dv[i] : A(0);
        s[0] += u; s[1] += u * xhat; s[2] += av[i]; s[3] += av[i] * xhat; s[4] += av[i] * u;
        s[5] += w2; s[6] += w2 * xhat;
      }
    });
    group_sum<A, 7>(g, s, scratch);
    if (!live) continue;  // no barrier below
    const A n = static_cast<A>(N);
    const A c2 = s[1] / n, mu = is_rms ? A(0) : s[0] / n, ma = is_rms ? A(0) : s[2] / n, ca = s[3] / n;
    const A mau = s[4] / n, mw2 = is_rms ? A(0) : s[5] / n, cb = s[6] / n;
    const A coef = 3 * ca * c2 - mau + ma * mu;
    for_cols<ITEMS, V>(g, N, [&](int j, int64_t c) {
      A xv[V], dv[V], av[V], o_dy[V], o_x[V];
      xc.get(j, c, xv);
      dyc.get(j, c, dv);
      a_of(j, c, av);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = (xv[i] - mu_x) * r;
        const A gn = w != nullptr ? w[c + i] + offset : A(1);
        const A u = dv[i] * gn;
        const A bwi = bw != nullptr ? bw[c + i] : A(0);
        const A w2 = bwi * dv[i];
        const A ja = r * (av[i] - ma - ca * xhat);
        o_dy[i] = gn * ja + bwi * xhat + (e != nullptr ? e[c + i] : A(0));
        o_x[i] = r * r * (coef * xhat - c2 * (av[i] - ma) - ca * (u - mu)) + r * (w2 - mw2 - cb * xhat);
        if (need_dw) dw_acc.add(j, c, i, dv[i] * ja);
      }
      if (d_dy != nullptr) store<TY>(d_dy + row * d_dys + c, o_dy);
      if (d_x != nullptr) store<TX>(d_x + row * d_xs + c, o_x);
    });
  }
  if (need_dw) dw_acc.flush(g, dw_part, N);
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

template <typename F>
void with_items(int items, F&& f) {
  switch (items) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Resident CTAs of `kernel` on the whole GPU: the persistent grids never exceed it, so every CTA
// starts at once (a CTA waiting for a slot would run its whole strided share of rows at the end).
// Asked of the driver once per (kernel, block size, shared memory, device): an occupancy query per
// launch cost host time on every call.
template <typename K>
int64_t resident(K kernel, int threads, size_t smem) {
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem, current_device());
  return once<int64_t>(key, [&] {
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), "occupancy");
    return static_cast<int64_t>(sm_count()) * (per_sm > 0 ? per_sm : 1);
  });
}

// CTAs for M rows at `rows` per CTA, at most `grid` (at least 1).
int64_t clamp_rows(int64_t M, int rows, int64_t grid) {
  const int64_t needed = (M + rows - 1) / rows;
  return needed < grid ? (needed > 0 ? needed : 1) : grid;
}

// The most threads per CTA `kernel` can launch with its registers (cudaFuncGetAttributes), cached.
// A 1024-thread CTA of a kernel using over 64 registers per thread does not launch.
template <typename K>
int max_threads(K kernel) {
  return once<int>(std::make_pair(reinterpret_cast<const void*>(kernel), current_device()), [&] {
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
    return attr.maxThreadsPerBlock;
  });
}

// The kernel's thread limit and the rows per CTA (up to kMaxRows, `t` threads each) that keep the most
// threads resident per SM (the fewest rows on a tie); worked out once per (kernel, t, device).
struct RowsFit {
  int max_threads, rows;
};

template <typename K>
RowsFit rows_fit(K kernel, int t) {
  return once<RowsFit>(std::make_tuple(reinterpret_cast<const void*>(kernel), t, current_device()), [&] {
    RowsFit fit{max_threads(kernel), 1};
    int64_t best = -1;
    for (int r = 1; r <= kMaxRows && r * t <= fit.max_threads; r <<= 1) {
      const int64_t in_flight = resident(kernel, r * t, 0) * r;
      if (in_flight > best) best = in_flight, fit.rows = r;
    }
    return fit;
  });
}

// How a kernel family runs M rows of `vecs` vectors (16-byte or scalar):
// - threads per row: enough for about `target` vectors per thread (32..1024), the row cached in
//   registers at a power of two up to kMaxItems vectors per thread; wider rows take the looped path
//   (items 0, up to 512 threads), and so does a row whose threads the kernel's registers cannot launch;
// - rows per CTA (register path): the count up to kMaxRows that keeps the most threads resident per
//   SM (the occupancy calculator: registers, the CTA limit; the fewest rows on a tie), halved while
//   that leaves SMs without a CTA; OFA_CUDA_ROWS_PER_CTA sets it instead (tuning sweeps).
// kernel_for(std::integral_constant<int, ITEMS>{}) returns the family's kernel for that many items.
struct Plan {
  int threads, items, rows;
  int block() const { return threads * rows; }
};

template <typename KernelFor>
Plan plan(int64_t M, int64_t vecs, int target, KernelFor&& kernel_for) {
  int64_t t = 32;
  while (t * target < vecs && t < 1024) t <<= 1;
  const int64_t need = (vecs + t - 1) / t;
  const auto looped = [&] {
    const int limit = max_threads(kernel_for(std::integral_constant<int, 0>{}));
    return Plan{limit >= 512 ? 512 : (limit / 32) * 32, 0, 1};
  };
  if (need > kMaxItems) return looped();
  int items = 1;
  while (items < need) items <<= 1;
  RowsFit fit{0, 1};
  with_items(items, [&](auto it) { fit = rows_fit(kernel_for(it), static_cast<int>(t)); });
  const int limit = fit.max_threads;
  int rows = fit.rows;
  if (t > limit) return looped();
  if (const char* env = std::getenv("OFA_CUDA_ROWS_PER_CTA")) {
    char* end = nullptr;
    const long asked = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || asked < 1 || asked > 1024)
      throw std::invalid_argument(
          std::string("OFA_CUDA_ROWS_PER_CTA must be a whole number of rows from 1 to 1024, got '") + env + "'");
    rows = static_cast<int>(asked);
  } else {
    const int64_t sms = sm_count();
    while (rows > 1 && (M + rows - 1) / rows < sms) rows >>= 1;  // keep every SM busy first
  }
  if (rows * t > limit) rows = static_cast<int>(limit / t);
  return {static_cast<int>(t), items, rows};
}

}  // namespace
}  // namespace cuda

int cuda_num_parts(int64_t M, int64_t N, DType x_dt, DType y_dt, bool double_backward) {
  using namespace cuda;
  int64_t grid = 1;
  dispatch_types(x_dt, y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    using A = typename AccOf<TX>::type;
    constexpr int VV = 16 / sizeof(TX);
    const bool vec = N % VV == 0;  // the launch also checks alignment; this only sizes the grid
    const int V = vec ? VV : 1;
    auto grid_of = [&](auto&& kernel_for) {
      const Plan pl = plan(M, (N + V - 1) / V, 2, kernel_for);
      const size_t smem = pl.items == 0 ? sizeof(A) * static_cast<size_t>(N) * 2 : 0;
      const size_t use = smem <= static_cast<size_t>(kSmemBudget) ? smem : 0;
      with_items(pl.items, [&](auto it) { grid = clamp_rows(M, pl.rows, resident(kernel_for(it), pl.block(), use)); });
    };
    if (double_backward)
      grid_of([&](auto it) {
        constexpr int IT = decltype(it)::value;
        return vec ? &norm_bwd_bwd_kernel<TX, TY, VV, IT> : &norm_bwd_bwd_kernel<TX, TY, 1, IT>;
      });
    else
      grid_of([&](auto it) {
        constexpr int IT = decltype(it)::value;
        return vec ? &norm_bwd_kernel<TX, TY, VV, IT> : &norm_bwd_kernel<TX, TY, 1, IT>;
      });
  });
  return static_cast<int>(grid);
}

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
    const int V = vec ? VV : 1;
    auto kernel_for = [&](auto it) {
      constexpr int IT = decltype(it)::value;
      return vec ? &norm_fwd_kernel<TX, TY, VV, IT> : &norm_fwd_kernel<TX, TY, 1, IT>;
    };
    const Plan pl = plan(s.M, (s.N + V - 1) / V, 4, kernel_for);
    with_items(pl.items, [&](auto it) {
      const auto kernel = kernel_for(it);
      const int64_t grid = clamp_rows(s.M, pl.rows, resident(kernel, pl.block(), 0));
      launch_kernel(kernel, grid, pl.block(), 0, stream, static_cast<const TX*>(p.x), p.x_stride,
                    static_cast<TY*>(y), y_stride, static_cast<const A*>(p.w), static_cast<const A*>(p.b),
                    static_cast<A*>(p.mean), static_cast<A*>(p.rstd), s.M, s.N, A(eps), A(s.offset), s.is_rms,
                    cast_mode, pl.rows);
    });
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
    const int V = vec ? VV : 1;
    auto kernel_for = [&](auto it) {
      constexpr int IT = decltype(it)::value;
      return vec ? &norm_bwd_kernel<TX, TY, VV, IT> : &norm_bwd_kernel<TX, TY, 1, IT>;
    };
    const Plan pl = plan(s.M, (s.N + V - 1) / V, 2, kernel_for);
    const int n_acc = (dw_part != nullptr) + (db_part != nullptr);
    const size_t smem = sizeof(A) * static_cast<size_t>(s.N) * n_acc;
    const bool in_smem = pl.items == 0 && smem <= static_cast<size_t>(kSmemBudget);
    with_items(pl.items, [&](auto it) {
      launch_kernel(kernel_for(it), num_parts, pl.block(), in_smem ? smem : 0, stream, static_cast<const TY*>(dy),
                    dy_stride, static_cast<const TX*>(p.x), p.x_stride, static_cast<const A*>(p.w),
                    static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), static_cast<TX*>(dx), dx_stride,
                    static_cast<A*>(dw_part), static_cast<A*>(db_part), s.M, s.N, A(s.offset), s.is_rms, cast_mode,
                    in_smem, pl.rows);
    });
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
    const int V = vec ? VV : 1;
    auto kernel_for = [&](auto it) {
      constexpr int IT = decltype(it)::value;
      return vec ? &norm_bwd_bwd_kernel<TX, TY, VV, IT> : &norm_bwd_bwd_kernel<TX, TY, 1, IT>;
    };
    const Plan pl = plan(s.M, (s.N + V - 1) / V, 2, kernel_for);
    const size_t smem = dw_part != nullptr ? sizeof(A) * static_cast<size_t>(s.N) : 0;
    const bool in_smem = pl.items == 0 && smem <= static_cast<size_t>(kSmemBudget);
    with_items(pl.items, [&](auto it) {
      launch_kernel(kernel_for(it), num_parts, pl.block(), in_smem ? smem : 0, stream, static_cast<const TY*>(dy),
                    dy_stride, static_cast<const TX*>(p.x), p.x_stride, static_cast<const A*>(p.w),
                    static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), static_cast<const TX*>(a), a_stride,
                    static_cast<const A*>(bw), static_cast<const A*>(e), static_cast<TY*>(d_dy), d_dy_stride,
                    static_cast<TX*>(d_x), d_x_stride, static_cast<A*>(dw_part), s.M, s.N, A(s.offset), s.is_rms,
                    in_smem, pl.rows);
    });
    check(cudaGetLastError(), "norm_bwd_bwd launch");
  });
}

}  // namespace ofa
