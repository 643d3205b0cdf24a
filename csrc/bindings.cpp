// Torch bindings of the native kernels: check tensors, pass raw pointers, pick CPU or CUDA.
//
// The Python wrappers (ofa_kernels/native/) allocate every output and call these functions, which
// fill them; the ops themselves (autograd, torch.compile, the backend argument) are the
// torch.library ops of ofa_kernels/ops, shared by every backend.
#include <torch/extension.h>

#include <optional>

#include "ofa_ext.h"

#ifdef OFA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

ofa::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return ofa::DType::f16;
    case at::kBFloat16: return ofa::DType::bf16;
    case at::kFloat: return ofa::DType::f32;
    case at::kDouble: return ofa::DType::f64;
    default: TORCH_CHECK(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

at::ScalarType acc_of(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), name, " must be [M, N] like x, got ",
              t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride in its last dim");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

const void* acc_vec(const OptT& t, const Tensor& x, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous(), name, " must be a contiguous [N] vector");
  TORCH_CHECK(t->scalar_type() == acc_of(x), name, " must be in the accumulation dtype ", acc_of(x));
  TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  return t->data_ptr();
}

void* rows_ptr(const OptT& t, const Tensor& x, const char* name) {
  if (!t.has_value()) return nullptr;
  check_rows(*t, x, name);
  return t->data_ptr();
}

int64_t stride0(const OptT& t) { return t.has_value() ? t->stride(0) : 0; }

void* part_ptr(const OptT& t, const Tensor& x, int64_t parts, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == parts && t->size(1) == x.size(1) && t->is_contiguous(), name,
              " must be a contiguous [num_parts, N] tensor");
  TORCH_CHECK(t->scalar_type() == acc_of(x), name, " must be in the accumulation dtype");
  return t->data_ptr();
}

ofa::NormShape shape_of(const Tensor& x, bool is_rms, double offset) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, N], got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have unit stride in its last dim");
  return {x.size(0), x.size(1), is_rms, offset};
}

ofa::NormPtrs ptrs_of(const Tensor& x, const Tensor& y_like, const OptT& w, const OptT& b, const Tensor& mean,
                      const Tensor& rstd) {
  return {dtype_of(x, "x"), dtype_of(y_like, "y/dy"), x.data_ptr(), x.stride(0), acc_vec(w, x, "weight"),
          acc_vec(b, x, "bias"), mean.data_ptr(), rstd.data_ptr()};
}

#ifdef OFA_WITH_CUDA
#define OFA_ON_DEVICE(x, cpu_call, cuda_call)                          \
  if ((x).is_cuda()) {                                                \
    c10::cuda::CUDAGuard guard((x).device());                          \
    auto stream = reinterpret_cast<ofa::Stream>(at::cuda::getCurrentCUDAStream().stream()); \
    cuda_call;                                                         \
  } else {                                                             \
    cpu_call;                                                          \
  }
#else
#define OFA_ON_DEVICE(x, cpu_call, cuda_call)                                        \
  TORCH_CHECK(!(x).is_cuda(), "ofa_kernels._C was built without CUDA");             \
  cpu_call;
#endif

// Weight-gradient partial rows the backward kernels write for x [M, N] and y/dy (CPU: fixed chunks).
int64_t num_parts(const Tensor& x, const Tensor& y_like, bool double_backward) {
  const int64_t M = x.size(0);
#ifdef OFA_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    return ofa::cuda_num_parts(M, x.size(1), dtype_of(x, "x"), dtype_of(y_like, "dy"), double_backward);
  }
#else
  TORCH_CHECK(!x.is_cuda(), "ofa_kernels._C was built without CUDA");
#endif
  (void)y_like;
  (void)double_backward;
  return std::max<int64_t>(1, std::min<int64_t>(M, 64));
}

void norm_fwd(const Tensor& x, const OptT& w, const OptT& b, const Tensor& y, const Tensor& mean, const Tensor& rstd,
              double eps, double offset, bool is_rms, int64_t cast_mode) {
  auto s = shape_of(x, is_rms, offset);
  check_rows(y, x, "y");
  auto p = ptrs_of(x, y, w, b, mean, rstd);
  OFA_ON_DEVICE(x, ofa::cpu_norm_fwd(s, p, y.data_ptr(), y.stride(0), eps, static_cast<int>(cast_mode)),
                ofa::cuda_norm_fwd(s, p, y.data_ptr(), y.stride(0), eps, static_cast<int>(cast_mode), stream));
}

void norm_bwd(const Tensor& dy, const Tensor& x, const OptT& w, const Tensor& mean, const Tensor& rstd,
              const OptT& dx, const OptT& dw_part, const OptT& db_part, int64_t parts, double offset, bool is_rms,
              int64_t cast_mode) {
  auto s = shape_of(x, is_rms, offset);
  check_rows(dy, x, "dy");
  auto p = ptrs_of(x, dy, w, std::nullopt, mean, rstd);
  void* dxp = rows_ptr(dx, x, "dx");
  void* dwp = part_ptr(dw_part, x, parts, "dw_part");
  void* dbp = part_ptr(db_part, x, parts, "db_part");
  OFA_ON_DEVICE(x,
                ofa::cpu_norm_bwd(s, p, dy.data_ptr(), dy.stride(0), dxp, stride0(dx), dwp, dbp,
                                  static_cast<int>(parts), static_cast<int>(cast_mode)),
                ofa::cuda_norm_bwd(s, p, dy.data_ptr(), dy.stride(0), dxp, stride0(dx), dwp, dbp,
                                   static_cast<int>(parts), static_cast<int>(cast_mode), stream));
}

void norm_bwd_bwd(const Tensor& dy, const Tensor& x, const OptT& w, const Tensor& mean, const Tensor& rstd,
                  const OptT& a, const OptT& bw, const OptT& e, const OptT& d_dy, const OptT& d_x,
                  const OptT& dw_part, int64_t parts, double offset, bool is_rms) {
  auto s = shape_of(x, is_rms, offset);
  check_rows(dy, x, "dy");
  auto p = ptrs_of(x, dy, w, std::nullopt, mean, rstd);
  const void* ap = rows_ptr(a, x, "grad_dx");
  const void* bwp = acc_vec(bw, x, "grad_dw");
  const void* ep = acc_vec(e, x, "grad_db");
  void* ddyp = rows_ptr(d_dy, x, "d_dy");
  void* dxp = rows_ptr(d_x, x, "d_x");
  void* dwp = part_ptr(dw_part, x, parts, "dw_part");
  OFA_ON_DEVICE(x,
                ofa::cpu_norm_bwd_bwd(s, p, dy.data_ptr(), dy.stride(0), ap, stride0(a), bwp, ep, ddyp,
                                      stride0(d_dy), dxp, stride0(d_x), dwp, static_cast<int>(parts)),
                ofa::cuda_norm_bwd_bwd(s, p, dy.data_ptr(), dy.stride(0), ap, stride0(a), bwp, ep, ddyp,
                                       stride0(d_dy), dxp, stride0(d_x), dwp, static_cast<int>(parts), stream));
}

// ----------------------------------------------------------- the entry points: outputs allocated here
// One call from Python per stage: allocations, dtype conversion of the weight vectors and the sum of the
// weight-gradient partials happen here (each costs about 1 us of host time as a Python call, as much
// as the whole CPU kernel at a decoding shape). Weights arrive in any float dtype.

at::TensorOptions acc_options(const Tensor& x) { return x.options().dtype(acc_of(x)); }

OptT as_acc_vec(const OptT& t, const Tensor& x) {
  if (!t.has_value()) return std::nullopt;
  return t->to(acc_of(x)).contiguous();
}

// The sum over the partial rows (one part is the result itself).
Tensor summed(const Tensor& part) { return part.size(0) == 1 ? part.select(0, 0) : part.sum(0); }

// (y, mean, rstd): y in y_dtype (x's or the accumulation dtype), mean empty for RMSNorm.
std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const OptT& w, const OptT& b, double eps, double offset,
                                           bool is_rms, int64_t cast_mode, at::ScalarType y_dtype) {
  shape_of(x, is_rms, offset);
  const int64_t M = x.size(0), N = x.size(1);
  Tensor y = at::empty({M, N}, x.options().dtype(y_dtype));
  Tensor rstd = at::empty({M}, acc_options(x));
  Tensor mean = at::empty({is_rms ? 0 : M}, acc_options(x));
  if (M) norm_fwd(x, as_acc_vec(w, x), as_acc_vec(b, x), y, is_rms ? rstd : mean, rstd, eps, offset, is_rms, cast_mode);
  return {y, mean, rstd};
}

// (dx, dw, db): dx in x's dtype, dw/db in the accumulation dtype; None where not asked.
std::tuple<OptT, OptT, OptT> backward(const Tensor& dy, const Tensor& x, const OptT& w, const Tensor& mean,
                                      const Tensor& rstd, double offset, bool is_rms, int64_t cast_mode, bool need_dx,
                                      bool need_dw, bool need_db) {
  shape_of(x, is_rms, offset);
  const int64_t M = x.size(0), N = x.size(1), parts = num_parts(x, dy, false);  // the CUDA grid too
  OptT dx, dw_part, db_part;
  if (need_dx) dx = at::empty({M, N}, x.options());
  if (need_dw) dw_part = at::empty({parts, N}, acc_options(x));
  if (need_db) db_part = at::empty({parts, N}, acc_options(x));
  if (M || need_dw || need_db)
    norm_bwd(dy, x, as_acc_vec(w, x), is_rms ? rstd : mean, rstd, dx, dw_part, db_part, parts, offset, is_rms,
             cast_mode);
  return {dx, dw_part ? OptT(summed(*dw_part)) : std::nullopt, db_part ? OptT(summed(*db_part)) : std::nullopt};
}

// (d_dy, d_x, d_w): d_dy in dy's dtype, d_x in x's, d_w in the accumulation dtype; None where not asked
// (d_w also when no grad_dx reached it).
std::tuple<OptT, OptT, OptT> double_backward(const Tensor& dy, const Tensor& x, const OptT& w, const Tensor& mean,
                                             const Tensor& rstd, const OptT& a, const OptT& bw, const OptT& e,
                                             double offset, bool is_rms, bool need_ddy, bool need_dx, bool need_dw) {
  shape_of(x, is_rms, offset);
  const int64_t M = x.size(0), N = x.size(1);
  need_dw = need_dw && a.has_value();
  const int64_t parts = num_parts(x, dy, true);  // the CUDA grid too
  OptT d_dy, d_x, dw_part;
  if (need_ddy) d_dy = at::empty({M, N}, dy.options());
  if (need_dx) d_x = at::empty({M, N}, x.options());
  if (need_dw) dw_part = at::empty({parts, N}, acc_options(x));
  if (need_ddy || need_dx || need_dw)
    norm_bwd_bwd(dy, x, as_acc_vec(w, x), is_rms ? rstd : mean, rstd, a, as_acc_vec(bw, x), as_acc_vec(e, x), d_dy,
                 d_x, dw_part, parts, offset, is_rms);
  return {d_dy, d_x, dw_part ? OptT(summed(*dw_part)) : std::nullopt};
}

void probe_perturb(const Tensor& x, const Tensor& y, const Tensor& gamma, const Tensor& scale, const Tensor& keys,
                   int64_t rows_per_probe, int64_t row_offset, double eps, bool scale_by_rms, bool add_x,
                   bool gaussian) {
  shape_of(x, true, 0.0);
  check_rows(y, x, "y");
  TORCH_CHECK(gamma.scalar_type() == acc_of(x) && gamma.is_contiguous() && gamma.numel() == x.size(1) &&
                  gamma.device() == x.device(),
              "gamma must be a contiguous [N] vector in the accumulation dtype, on x's device");
  TORCH_CHECK(scale.scalar_type() == acc_of(x) && scale.numel() == x.size(0) && scale.device() == x.device(),
              "scale must be [M], accumulation dtype, on x's device");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.dim() == 2 && keys.size(1) == 2 &&
                  keys.device() == x.device(),
              "keys must be a contiguous [K, 2] int64 tensor on x's device");
  TORCH_CHECK(rows_per_probe > 0 && keys.size(0) * rows_per_probe >= x.size(0),
              "keys must hold a pair for every probe (rows / rows_per_probe)");
  if (x.size(0) == 0) return;
  OFA_ON_DEVICE(x,
                ofa::cpu_probe_perturb(dtype_of(x, "x"), x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                       gamma.data_ptr(), scale.data_ptr(), keys.data_ptr<int64_t>(), x.size(0),
                                       x.size(1), rows_per_probe, row_offset, eps, scale_by_rms, add_x, gaussian),
                ofa::cuda_probe_perturb(dtype_of(x, "x"), x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                        gamma.data_ptr(), scale.data_ptr(), keys.data_ptr<int64_t>(), x.size(0),
                                        x.size(1), rows_per_probe, row_offset, eps, scale_by_rms, add_x, gaussian,
                                        stream));
}

bool with_cuda() {
#ifdef OFA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ofa_kernels native kernels (CPU; CUDA when built with it)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("forward", &forward, "norm forward: (y, mean, rstd)");
  m.def("backward", &backward, "norm backward: (dx, dw, db), None where not asked");
  m.def("double_backward", &double_backward, "norm double backward: (d_dy, d_x, d_w), None where not asked");
  m.def("probe_perturb", &probe_perturb);
}
