// packed.py's two products as operators registered in C++ (torch's stable ABI), so that inductor's
// C++ wrapper calls them through the dispatcher without entering Python: ~2 µs a call instead of
// the ~20-30 µs of a Python custom op. Built by gemv.py (native_load) into one library with gemv.c.
//
//   nanoseek_native::gemm_packed(x [M, K], pack, bias?, N) -> [M, N]     (nanoseek_gemm_packed)
//   nanoseek_native::moe_packed(x [N, H], idx [N, top] int64, w [N, top], gate_up pack, down pack,
//                               E, I) -> [N, H]                            (nanoseek_moe_packed)
//
// They check shapes, dtypes and strides, and never whether a pack is stale: packed.refresh() does
// that in Python before a compiled step (see packed.py).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>

extern "C" {
void nanoseek_gemm_packed(const float *x, int64_t ldx, const float *p, const float *b, float *y, int64_t ldy,
                          int64_t M, int64_t N, int64_t K, int threads);
int nanoseek_moe_packed(const float *x, int64_t N, int64_t H, const int64_t *idx, const float *wts, int64_t top,
                        const float *gate_up, const float *down, int64_t E, int64_t I, float *y, int threads);
}

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

constexpr int64_t PANEL = 16;

void check_f32(const Tensor &t, const char *what) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, "nanoseek_native: ", what, " must be float32");
  STD_TORCH_CHECK(t.is_cpu(), "nanoseek_native: ", what, " must be on the CPU");
}

Tensor gemm_packed(Tensor x, Tensor pack, std::optional<Tensor> bias, int64_t n) {
  check_f32(x, "x");
  check_f32(pack, "pack");
  STD_TORCH_CHECK(x.dim() == 2, "nanoseek_native.gemm_packed: x must be 2-d");
  const int64_t M = x.size(0), K = x.size(1);
  // a single row's row stride is meaningless (inductor hands in views with any): only rows' layout counts
  const int64_t ldx = M == 1 ? K : x.stride(0);
  STD_TORCH_CHECK((K == 1 || x.stride(1) == 1) && ldx >= K,
                  "nanoseek_native.gemm_packed: x must have unit stride along K and rows that do not overlap");
  STD_TORCH_CHECK(n > 0 && pack.is_contiguous() && pack.numel() == (n + PANEL - 1) / PANEL * PANEL * K,
                  "nanoseek_native.gemm_packed: the pack does not hold an [", n, ", ", K, "] weight");
  const float *b = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && (n == 1 || bias->stride(0) == 1),
                    "nanoseek_native.gemm_packed: bias must be [", n, "] and contiguous");
    b = static_cast<const float *>(bias->data_ptr());
  }
  Tensor y = torch::stable::new_empty(x, {M, n});
  if (M > 0)
    nanoseek_gemm_packed(static_cast<const float *>(x.data_ptr()), ldx,
                         static_cast<const float *>(pack.data_ptr()), b, static_cast<float *>(y.data_ptr()), n, M, n, K,
                         static_cast<int>(torch::stable::get_num_threads()));
  return y;
}

Tensor moe_packed(Tensor x, Tensor idx, Tensor w, Tensor gate_up, Tensor down, int64_t E, int64_t I) {
  check_f32(x, "x");
  check_f32(w, "topk_weight");
  check_f32(gate_up, "gate_up pack");
  check_f32(down, "down pack");
  STD_TORCH_CHECK(idx.scalar_type() == ScalarType::Long, "nanoseek_native.moe_packed: topk_idx must be int64");
  STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && idx.dim() == 2 && idx.is_contiguous() && w.is_contiguous() &&
                      idx.size(0) == x.size(0) && w.dim() == 2 && w.size(0) == idx.size(0) && w.size(1) == idx.size(1),
                  "nanoseek_native.moe_packed: x [N, H], topk_idx and topk_weight [N, top], all contiguous");
  const int64_t N = x.size(0), H = x.size(1);
  STD_TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous() && gate_up.numel() == E * 2 * I * H &&
                      down.numel() == E * H * I,
                  "nanoseek_native.moe_packed: the packs do not hold ", E, " experts of [", 2 * I, ", ", H, "] and [",
                  H, ", ", I, "]");
  Tensor y = torch::stable::new_empty(x, {N, H});
  if (N == 0) return y;
  int rc = nanoseek_moe_packed(static_cast<const float *>(x.data_ptr()), N, H,
                               static_cast<const int64_t *>(idx.data_ptr()), static_cast<const float *>(w.data_ptr()),
                               idx.size(1), static_cast<const float *>(gate_up.data_ptr()),
                               static_cast<const float *>(down.data_ptr()), E, I, static_cast<float *>(y.data_ptr()),
                               static_cast<int>(torch::stable::get_num_threads()));
  STD_TORCH_CHECK(rc == 0, "nanoseek_native.moe_packed failed: an expert index outside 0..", E - 1,
                  ", or out of memory");
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY(nanoseek_native, m) {
  m.def("gemm_packed(Tensor x, Tensor pack, Tensor? bias, int n) -> Tensor");
  m.def("moe_packed(Tensor x, Tensor topk_idx, Tensor topk_weight, Tensor gate_up, Tensor down, int E, int I) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(nanoseek_native, CPU, m) {
  m.impl("gemm_packed", TORCH_BOX(&gemm_packed));
  m.impl("moe_packed", TORCH_BOX(&moe_packed));
}
