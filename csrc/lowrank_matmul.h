// svdfuse::lowrank_matmul: y = x Wbᵀ + ((x V) ⊙ σ) Uᵀ + bias, checks shared by the CPU and CUDA kernels.
//
// σ is S (K,), one σ for every row of x, or S (num_tasks, K) with task (x.shape[:-1]) int64 picking
// each row's σ (serving many target tasks that share U and V in one batch). Task ids are range
// checked only where reading them is free: the CPU kernel raises; the CUDA kernels never index S
// with a bad id and give its output row NaN instead, since a check would cost a device-to-host sync.
//
// These checks are the op's validation: svdfuse.ops.lowrank_matmul calls the op without checking, and
// every kernel of the op checks its inputs itself. The Python kernels (the pure-torch default kernel
// and the fake impl, svdfuse/_native.py) run check_lowrank_matmul there, which raises these messages
// word for word; tests/test_lowrank_matmul.py holds both to the one set. They raise the Python
// exceptions the docstring promises: ValueError for shapes, devices and task ids (TORCH_CHECK_VALUE),
// TypeError for dtypes (TORCH_CHECK_TYPE). Dtypes are named as Python prints them (torch.float32).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <cctype>
#include <optional>
#include <string>

namespace svdfuse {

// A dtype as Python prints it ("torch.float32"), the language of every svdfuse message.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // the rest print as their C++ name in lower case: BFloat16, Bool, Float8_e4m3fn, UInt16, ...
      std::string name = c10::toString(dtype);
      for (char& c : name) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      }
      return "torch." + name;
    }
  }
}

// Flash-attention's CHECK_SHAPE, with values: "base must have shape (m, n) = [33, 17], found [17, 33]".
inline void check_shape(const at::Tensor& t, const char* name, const char* dims, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "lowrank_matmul: ", name, " must have shape ", dims, " = ", expected,
                    ", found ", t.sizes());
}

// One dtype and one device for all tensors: a mixed call fails here instead of being promoted or copied.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "lowrank_matmul: ", name, " must have x's dtype ",
                   dtype_name(x.scalar_type()), ", found ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), "lowrank_matmul: ", name, " must be on x's device ", x.device(),
                    ", found ", t.device());
}

// Rows of x, counted explicitly rather than reshape(-1, n), which is ambiguous for empty tensors.
inline int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

// S (K,) takes no task; S (num_tasks, K) needs task: int64, shape x.shape[:-1], on x's device.
inline void check_task(const at::Tensor& S, const std::optional<at::Tensor>& task, const at::Tensor& x) {
  if (S.dim() == 1) {
    TORCH_CHECK_VALUE(!task, "lowrank_matmul: task must be None when S has shape (K,) (one S for every row), found ",
                      "a task of shape ", task->sizes());
    return;
  }
  TORCH_CHECK_VALUE(S.size(0) >= 1, "lowrank_matmul: S must have at least one task row, found shape ", S.sizes());
  TORCH_CHECK_VALUE(task, "lowrank_matmul: task is required when S has shape (num_tasks, K) = ", S.sizes(),
                    ": an int64 tensor of shape x.shape[:-1] = ", x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK_TYPE(task->scalar_type() == at::kLong, "lowrank_matmul: task must have dtype torch.int64, found ",
                   dtype_name(task->scalar_type()));
  check_shape(*task, "task", "x.shape[:-1]", x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK_VALUE(task->device() == x.device(), "lowrank_matmul: task must be on x's device ", x.device(),
                    ", found ", task->device());
}

// x: (..., n), U: (m, K), S: (K,) or (num_tasks, K), V: (n, K), base: (m, n), bias: (m,), task: x.shape[:-1];
// m and K come from U, n from V.
inline void check_lowrank_matmul(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                 const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& task) {
  TORCH_CHECK_VALUE(U.dim() == 2, "lowrank_matmul: U must have shape (m, K), found ", U.sizes());
  TORCH_CHECK_VALUE(V.dim() == 2, "lowrank_matmul: V must have shape (n, K), found ", V.sizes());
  const int64_t m = U.size(0), K = U.size(1), n = V.size(0);
  TORCH_CHECK_VALUE(S.dim() == 1 || S.dim() == 2, "lowrank_matmul: S must have shape (K,) or (num_tasks, K), found ",
                    S.sizes());
  if (S.dim() == 2) {
    check_shape(S, "S", "(num_tasks, K)", {S.size(0), K});
  } else {
    check_shape(S, "S", "(K,)", {K});
  }
  check_shape(V, "V", "(n, K)", {n, K});
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == n,
                    "lowrank_matmul: x must have shape (..., n) with n = V.size(0) = ", n, ", found ", x.sizes());
  // The four dtypes the kernels are written for; isFloatingType would also admit the fp8 types, which
  // the CPU kernel would silently upcast and the CUDA one reject deep inside cuBLAS.
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "lowrank_matmul: x must be torch.float32, torch.float64, torch.float16 or torch.bfloat16, found ",
                   dtype_name(dtype));
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
  check_task(S, task, x);
}

// The output shape x.shape[:-1] + (m,).
inline std::vector<int64_t> output_shape(const at::Tensor& x, int64_t m) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = m;
  return shape;
}

}  // namespace svdfuse
