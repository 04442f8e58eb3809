// The CPU kernel of torch.ops.svdfuse.lowrank_matmul. Its autograd is in lowrank_matmul_autograd.cpp,
// its CUDA kernels in lowrank_matmul_cuda.cu. The schema, the pure-torch default kernel (every device
// without a kernel here) and the fake impl are defined once, in Python: svdfuse/_native.py.
#include <torch/library.h>

#include <vector>

#include "lowrank_matmul.h"

namespace svdfuse {

namespace {

// On the CPU reading the ids is free, so a bad one raises here, with where it is, instead of reaching
// index_select. A plain loop rather than ATen reductions and item() calls, whose dispatch would add
// host time to every call (DESIGN.md §4 L1).
void check_task_range(const at::Tensor& task, int64_t num_tasks) {
  const at::Tensor ids = task.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (id[i] < 0 || id[i] >= num_tasks) {
      std::vector<int64_t> where(task.dim());
      for (int64_t d = task.dim() - 1, rest = i; d >= 0; --d) {
        where[d] = rest % task.size(d);
        rest /= task.size(d);
      }
      TORCH_CHECK_VALUE(false, "lowrank_matmul: task ids must be in [0, num_tasks) = [0, ", num_tasks,
                        ") (the rows of S), found ", id[i], " at ", at::IntArrayRef(where));
    }
  }
}

// The GEMM sequence of reference.lowrank_matmul: upcast to the accumulation dtype (fp32, fp64 for
// fp64), add the terms in the reference's order, cast back once at the end.
at::Tensor lowrank_matmul_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                              const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& task) {
  check_lowrank_matmul(x, U, S, V, base, bias, task);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = rows_of(x), n = V.size(0);
  const at::Tensor x2 = x.reshape({rows, n}).to(acc);
  at::Tensor sigma = S.to(acc);
  if (task) {
    check_task_range(*task, S.size(0));
    sigma = sigma.index_select(0, task->reshape({rows}));  // (rows, K): each row's σ
  }
  at::Tensor y = at::mm(at::mm(x2, V.to(acc)).mul_(sigma), U.to(acc).t());
  if (base) {
    y.addmm_(x2, base->to(acc).t());
  }
  if (bias) {
    y.add_(bias->to(acc));
  }
  return y.to(x.scalar_type()).reshape(output_shape(x, U.size(0)));
}

}  // namespace

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, CPU, m) {
  m.impl("lowrank_matmul", &svdfuse::lowrank_matmul_cpu);
}
