// RMSNorm / LayerNorm forward, backward and double backward on CPU: OpenMP across rows, fp32
// accumulation (fp64 for fp64), row sums over 8 independent lanes (vectorizable, and closer to
// pairwise accuracy than one running sum). Weight-gradient partials are per fixed chunk of rows,
// so the result does not depend on the thread count. Maths: ofa_kernels/eager/norm.py.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <stdexcept>

#include "../ofa_ext.h"

namespace ofa {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename A, typename F>
inline A lanes_sum(int64_t N, F&& f) {
  A l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= N; c += 8)
    for (int i = 0; i < 8; ++i) l[i] += f(c + i);
  for (; c < N; ++c) l[0] += f(c);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename TX, typename TY>
void fwd(const NormShape& s, const NormPtrs& p, TY* y, int64_t ys, double eps_d, int cast_mode) {
  using A = typename AccOf<TX>::type;
  const TX* x = static_cast<const TX*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* b = static_cast<const A*>(p.b);
  const A eps = static_cast<A>(eps_d), offset = static_cast<A>(s.offset), n = static_cast<A>(s.N);
  const int64_t N = s.N;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.M; ++row) {
    const TX* xr = x + row * p.x_stride;
    const A mean = s.is_rms ? A(0) : lanes_sum<A>(N, [&](int64_t c) { return static_cast<A>(xr[c]); }) / n;
    const A var = lanes_sum<A>(N, [&](int64_t c) {
      const A d = static_cast<A>(xr[c]) - mean;
      return d * d;
    }) / n;
    const A rstd = A(1) / std::sqrt(var + eps);
    TY* yr = y + row * ys;
    for (int64_t c = 0; c < N; ++c) {
      const A xhat = (static_cast<A>(xr[c]) - mean) * rstd;
      A o = xhat;
      if (w) o = (cast_mode == kCastLlama ? static_cast<A>(static_cast<TX>(xhat)) : xhat) * (w[c] + offset);
      if (b) o += b[c];
      yr[c] = static_cast<TY>(o);
    }
    if (!s.is_rms) static_cast<A*>(p.mean)[row] = mean;
    static_cast<A*>(p.rstd)[row] = rstd;
  }
}

template <typename TX, typename TY>
void bwd(const NormShape& s, const NormPtrs& p, const TY* dy, int64_t dys, TX* dx, int64_t dxs, void* dw_v,
         void* db_v, int parts, int cast_mode) {
  using A = typename AccOf<TX>::type;
  const TX* x = static_cast<const TX*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A offset = static_cast<A>(s.offset), n = static_cast<A>(s.N);
  const int64_t N = s.N, M = s.M;
#pragma omp parallel for schedule(static)
  for (int part = 0; part < parts; ++part) {
    A* dw = dw_v ? static_cast<A*>(dw_v) + part * N : nullptr;
    A* db = db_v ? static_cast<A*>(db_v) + part * N : nullptr;
    for (int64_t c = 0; c < N; ++c) {
      if (dw) dw[c] = 0;
      if (db) db[c] = 0;
    }
    for (int64_t row = M * part / parts; row < M * (part + 1) / parts; ++row) {
      const TX* xr = x + row * p.x_stride;
      const TY* dyr = dy + row * dys;
      const A mu_x = s.is_rms ? A(0) : mean[row], r = rstd[row];
      auto xhat = [&](int64_t c) { return (static_cast<A>(xr[c]) - mu_x) * r; };
      auto u = [&](int64_t c) { return w ? static_cast<A>(dyr[c]) * (w[c] + offset) : static_cast<A>(dyr[c]); };
      if (dx) {
        const A m_u = s.is_rms ? A(0) : lanes_sum<A>(N, u) / n;
        const A m_ux = lanes_sum<A>(N, [&](int64_t c) { return u(c) * xhat(c); }) / n;
        TX* dxr = dx + row * dxs;
        for (int64_t c = 0; c < N; ++c) dxr[c] = static_cast<TX>((u(c) - m_ux * xhat(c) - m_u) * r);
      }
      if (dw)
        for (int64_t c = 0; c < N; ++c) {
          const A xh = xhat(c);
          dw[c] += static_cast<A>(dyr[c]) * (cast_mode == kCastLlama ? static_cast<A>(static_cast<TX>(xh)) : xh);
        }
      if (db)
        for (int64_t c = 0; c < N; ++c) db[c] += static_cast<A>(dyr[c]);
    }
  }
}

template <typename TX, typename TY>
void bwd_bwd(const NormShape& s, const NormPtrs& p, const TY* dy, int64_t dys, const TX* a, int64_t as,
             const void* bw_v, const void* e_v, TY* d_dy, int64_t d_dys, TX* d_x, int64_t d_xs, void* dw_v,
             int parts) {
  using A = typename AccOf<TX>::type;
  const TX* x = static_cast<const TX*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* bw = static_cast<const A*>(bw_v);
  const A* e = static_cast<const A*>(e_v);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A offset = static_cast<A>(s.offset), n = static_cast<A>(s.N);
  const int64_t N = s.N, M = s.M;
#pragma omp parallel for schedule(static)
  for (int part = 0; part < parts; ++part) {
    A* dw = dw_v ? static_cast<A*>(dw_v) + part * N : nullptr;
    if (dw)
      for (int64_t c = 0; c < N; ++c) dw[c] = 0;
    for (int64_t row = M * part / parts; row < M * (part + 1) / parts; ++row) {
      const TX* xr = x + row * p.x_stride;
      const TY* dyr = dy + row * dys;
      const TX* ar = a ? a + row * as : nullptr;
      const A mu_x = s.is_rms ? A(0) : mean[row], r = rstd[row];
      auto xhat = [&](int64_t c) { return (static_cast<A>(xr[c]) - mu_x) * r; };
      auto g = [&](int64_t c) { return w ? w[c] + offset : A(1); };
      auto u = [&](int64_t c) { return static_cast<A>(dyr[c]) * g(c); };
      auto av = [&](int64_t c) { return ar ? static_cast<A>(ar[c]) : A(0); };
      auto w2 = [&](int64_t c) { return bw ? bw[c] * static_cast<A>(dyr[c]) : A(0); };
      const A c2 = lanes_sum<A>(N, [&](int64_t c) { return u(c) * xhat(c); }) / n;
      const A mu = s.is_rms ? A(0) : lanes_sum<A>(N, u) / n;
      const A ma = s.is_rms || !ar ? A(0) : lanes_sum<A>(N, av) / n;
      const A ca = ar ? lanes_sum<A>(N, [&](int64_t c) { return av(c) * xhat(c); }) / n : A(0);
      const A mau = ar ? lanes_sum<A>(N, [&](int64_t c) { return av(c) * u(c); }) / n : A(0);
      const A mw2 = s.is_rms || !bw ? A(0) : lanes_sum<A>(N, w2) / n;
      const A cb = bw ? lanes_sum<A>(N, [&](int64_t c) { return w2(c) * xhat(c); }) / n : A(0);
      const A coef = 3 * ca * c2 - mau + ma * mu;
      for (int64_t c = 0; c < N; ++c) {
        const A xh = xhat(c), ja = r * (av(c) - ma - ca * xh);
        if (d_dy) d_dy[row * d_dys + c] = static_cast<TY>(g(c) * ja + (bw ? bw[c] * xh : A(0)) + (e ? e[c] : A(0)));
        if (d_x)
          d_x[row * d_xs + c] = static_cast<TX>(r * r * (coef * xh - c2 * (av(c) - ma) - ca * (u(c) - mu)) +
                                                r * (w2(c) - mw2 - cb * xh));
        if (dw) dw[c] += static_cast<A>(dyr[c]) * ja;
      }
    }
  }
}

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<TX>, Tag<TY>) for the (x, y) dtype pairs the bindings produce.
template <typename Fn>
void dispatch_types(DType x_dt, DType y_dt, Fn&& fn) {
  const bool same = x_dt == y_dt;
  switch (x_dt) {
    case DType::f16:
      if (same) return fn(Tag<c10::Half>{}, Tag<c10::Half>{});
      if (y_dt == DType::f32) return fn(Tag<c10::Half>{}, Tag<float>{});
      break;
    case DType::bf16:
      if (same) return fn(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
      if (y_dt == DType::f32) return fn(Tag<c10::BFloat16>{}, Tag<float>{});
      break;
    case DType::f32:
      if (same) return fn(Tag<float>{}, Tag<float>{});
      break;
    case DType::f64:
      if (same) return fn(Tag<double>{}, Tag<double>{});
      break;
  }
  throw std::invalid_argument("ofa CPU norms: unsupported dtype pair (x, y/dy); expected y in x's or fp32");
}

}  // namespace

void cpu_norm_fwd(const NormShape& s, const NormPtrs& p, void* y, int64_t y_stride, double eps, int cast_mode) {
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    fwd<TX, TY>(s, p, static_cast<TY*>(y), y_stride, eps, cast_mode);
  });
}

void cpu_norm_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, void* dx,
                  int64_t dx_stride, void* dw_part, void* db_part, int num_parts, int cast_mode) {
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    bwd<TX, TY>(s, p, static_cast<const TY*>(dy), dy_stride, static_cast<TX*>(dx), dx_stride, dw_part, db_part,
                num_parts, cast_mode);
  });
}

void cpu_norm_bwd_bwd(const NormShape& s, const NormPtrs& p, const void* dy, int64_t dy_stride, const void* a,
                      int64_t a_stride, const void* bw, const void* e, void* d_dy, int64_t d_dy_stride, void* d_x,
                      int64_t d_x_stride, void* dw_part, int num_parts) {
  dispatch_types(p.x_dt, p.y_dt, [&](auto tx, auto ty) {
    using TX = typename decltype(tx)::type;
    using TY = typename decltype(ty)::type;
    bwd_bwd<TX, TY>(s, p, static_cast<const TY*>(dy), dy_stride, static_cast<const TX*>(a), a_stride, bw, e,
                    static_cast<TY*>(d_dy), d_dy_stride, static_cast<TX*>(d_x), d_x_stride, dw_part, num_parts);
  });
}

}  // namespace ofa
