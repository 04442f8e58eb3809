// svdfuse::lowrank_matmul: y = x Wbᵀ + ((x V) ⊙ S) Uᵀ + bias, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <optional>

namespace svdfuse {

// Flash-attention's CHECK_SHAPE, with values: "base must have shape (m, n) = [33, 17], found [17, 33]".
inline void check_shape(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "lowrank_matmul: ", name, " must have shape ", dims, " = ", expected,
              ", found ", t.sizes());
}

// One dtype and one device for all tensors: a mixed call fails here instead of being promoted or copied.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lowrank_matmul: ", name, " must have x's dtype ",
              x.scalar_type(), ", found ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "lowrank_matmul: ", name, " must be on x's device ", x.device(),
              ", found ", t.device());
}

// x: (..., n), U: (m, K), S: (K,), V: (n, K), base: (m, n), bias: (m,); m and K come from U, n from V.
inline void check_lowrank_matmul(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                 const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(U.dim() == 2, "lowrank_matmul: U must have shape (m, K), found ", U.sizes());
  TORCH_CHECK(V.dim() == 2, "lowrank_matmul: V must have shape (n, K), found ", V.sizes());
  const int64_t m = U.size(0), K = U.size(1), n = V.size(0);
  check_shape(S, "S", "(K,)", {K});
  check_shape(V, "V", "(n, K)", {n, K});
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, "lowrank_matmul: x must have shape (..., n) with n = V.size(0) = ",
              n, ", found ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lowrank_matmul: x must be floating point, found ",
              x.scalar_type());
  check_like_x(U, "U", x);
  check_like_x(S, "S", x);
  check_like_x(V, "V", x);
  if (base) {
    check_shape(*base, "base", "(m, n)", {m, n});
    check_like_x(*base, "base", x);
  }
  if (bias) {
    check_shape(*bias, "bias", "(m,)", {m});
    check_like_x(*bias, "bias", x);
  }
}

// The GEMM sequence of reference.lowrank_matmul, on any device: upcast to the accumulation dtype
// (fp32, fp64 for fp64), add the terms in the reference's order, cast back once at the end.
inline at::Tensor lowrank_matmul(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                 const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias) {
  check_lowrank_matmul(x, U, S, V, base, bias);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t m = U.size(0), n = V.size(0);
  // Rows counted explicitly rather than reshape(-1, n), which is ambiguous for empty tensors.
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const at::Tensor x2 = x.reshape({rows, n}).to(acc);
  at::Tensor y = at::mm(at::mm(x2, V.to(acc)).mul_(S.to(acc)), U.to(acc).t());
  if (base) {
    y.addmm_(x2, base->to(acc).t());
  }
  if (bias) {
    y.add_(bias->to(acc));
  }
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = m;
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace svdfuse
