// CUDA kernel of torch.ops.svdfuse.lowrank_matmul: for now the fp32-accumulating cuBLAS GEMM
// sequence of the header; the fused kernel replaces it behind the same registration.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lowrank_matmul.h"

namespace svdfuse {

at::Tensor lowrank_matmul_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias) {
  // Allocations and cuBLAS handles follow x's GPU, not whichever GPU happens to be current.
  const c10::cuda::CUDAGuard guard(x.device());
  return lowrank_matmul(x, U, S, V, base, bias);
}

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, CUDA, m) {
  m.impl("lowrank_matmul", &svdfuse::lowrank_matmul_cuda);
}
