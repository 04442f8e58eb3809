// Autograd of torch.ops.svdfuse.lowrank_matmul. In C++ rather than Python (torch.library's
// register_autograd) because a Python autograd kernel costs a few host microseconds on every call,
// gradient or not, and a decode call has about 6 µs in all (DESIGN.md §4 L1).
//
// The backward is written in ATen ops on symbolic sizes, so that AOT autograd (torch.compile,
// opcheck's aot_dispatch checks) traces it like any other formula.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <limits>

namespace svdfuse {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor lowrank_matmul_below_autograd(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                                         const at::Tensor& V, const std::optional<at::Tensor>& base,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& task) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("svdfuse::lowrank_matmul", "")
                             .typed<decltype(lowrank_matmul_below_autograd)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, U, S, V, base, bias, task);
}

// σ of each row in the accumulation dtype, as reference.task_sigma: S (K,) -> (1, K) for every row;
// S (num_tasks, K) -> (rows, K), NaN for a row whose id is outside [0, num_tasks) (the CUDA kernels
// give that row's output NaN), and its ids clamped into range, safe to index with.
struct RowSigma {
  at::Tensor sigma, ids, bad;
};

RowSigma row_sigma(const at::Tensor& S, const at::Tensor& task, const c10::SymInt& rows) {
  if (!task.defined()) {
    return {S.unsqueeze(0), {}, {}};
  }
  const c10::SymInt num_tasks = S.sym_size(0);
  const at::Tensor flat = task.reshape_symint({rows});
  const at::Tensor bad = flat.lt(0).logical_or_(flat.ge(num_tasks)).unsqueeze(1);
  const at::Tensor ids = flat.clamp(0, num_tasks - 1);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  return {S.index_select(0, ids).masked_fill(bad, nan), ids, bad};
}

struct LowrankMatmul : torch::autograd::Function<LowrankMatmul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& V, const std::optional<at::Tensor>& base,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task) {
    ctx->save_for_backward({x, U, S, V, base.value_or(at::Tensor()), task.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value();
    return lowrank_matmul_below_autograd(x, U, S, V, base, bias, task);
  }

  // In the forward's accumulation dtype (fp32, fp64 for fp64), cast once per gradient, as the
  // kernels do. With a per-row σ, S's gradient sums each row's contribution into the row of S that
  // its task id picked; task itself is an index and gets none.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &U = saved[1], &S = saved[2], &V = saved[3], &base = saved[4], &task = saved[5];
    // needs_input_grad counts only the tensors passed: without a base, bias is input 4, not 5.
    const bool need_x = ctx->needs_input_grad(0), need_U = ctx->needs_input_grad(1),
               need_S = ctx->needs_input_grad(2), need_V = ctx->needs_input_grad(3);
    const bool need_base = base.defined() && ctx->needs_input_grad(4);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(base.defined() ? 5 : 4);

    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    // Rows counted, not reshape(-1, ...): -1 is ambiguous for 0 elements (n = 0 or m = 0).
    c10::SymInt rows = 1;
    for (const c10::SymInt& size : x.sym_sizes().slice(0, x.dim() - 1)) {
      rows *= size;
    }
    const at::Tensor x2 = x.reshape_symint({rows, V.sym_size(0)}).to(acc);
    const at::Tensor g2 = grads[0].reshape_symint({rows, U.sym_size(0)}).to(acc);
    const at::Tensor U_ = U.to(acc), V_ = V.to(acc);
    const RowSigma sigma = row_sigma(S.to(acc), task, rows);
    const at::Tensor gU = g2.mm(U_);  // the gradient with respect to (x V) ⊙ σ
    const at::Tensor t = need_U || need_S ? x2.mm(V_) : at::Tensor();

    variable_list out(7);  // x, U, S, V, base, bias, task
    if (need_x) {
      at::Tensor gx = gU.mul(sigma.sigma).mm(V_.t());
      if (base.defined()) {
        gx.add_(g2.mm(base.to(acc)));
      }
      out[0] = gx.to(x.scalar_type()).reshape_symint(x.sym_sizes());
    }
    if (need_U) {
      out[1] = g2.t().mm(t.mul(sigma.sigma)).to(U.scalar_type());
    }
    if (need_S) {
      const at::Tensor per_row = gU.mul(t);
      if (!task.defined()) {
        out[2] = per_row.sum(0).to(S.scalar_type());
      } else {
        // A row with a bad id adds NaN to the row its clamped id names, as its output row is NaN.
        const double nan = std::numeric_limits<double>::quiet_NaN();
        out[2] = at::zeros_like(S, S.options().dtype(acc))
                     .index_add_(0, sigma.ids, per_row.masked_fill(sigma.bad, nan))
                     .to(S.scalar_type());
      }
    }
    if (need_V) {
      out[3] = x2.t().mm(gU.mul(sigma.sigma)).to(V.scalar_type());
    }
    if (need_base) {
      out[4] = g2.t().mm(x2).to(base.scalar_type());
    }
    if (need_bias) {
      out[5] = g2.sum(0).to(x.scalar_type());
    }
    return out;
  }
};

at::Tensor lowrank_matmul_autograd(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                   const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& task) {
  // Without a gradient to compute, straight to the kernel: Function::apply would still build a graph
  // node and wrap the output, 0.8 µs of host time per call (measured on the CPU, 1 x 64 input).
  if (!torch::autograd::compute_requires_grad(x, U, S, V, base, bias)) {
    return lowrank_matmul_below_autograd(x, U, S, V, base, bias, task);
  }
  return LowrankMatmul::apply(x, U, S, V, base, bias, task);
}

}  // namespace

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, Autograd, m) {
  m.impl("lowrank_matmul", &svdfuse::lowrank_matmul_autograd);
}
