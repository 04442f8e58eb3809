// Schema of torch.ops.svdfuse.lowrank_matmul and its CPU kernel. The fake (meta) impl and autograd
// are registered from Python, in svdfuse/_native.py.
#include <torch/library.h>

#include "lowrank_matmul.h"

TORCH_LIBRARY(svdfuse, m) {
  // Tells the dispatcher which module holds the Python half, so a trace without it names the fix.
  m.set_python_module("svdfuse._native");
  m.def("lowrank_matmul(Tensor x, Tensor U, Tensor S, Tensor V, Tensor? base, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdfuse, CPU, m) {
  m.impl("lowrank_matmul", &svdfuse::lowrank_matmul);
}
