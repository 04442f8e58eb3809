// The CPU kernel of torch.ops.svdfuse.gram: the float64 Gram matrices of a batch of thin factors
// (LoRA's B (m, r) and A (r, n)), read in their stored dtype and converted one cache-sized tile at a
// time, never as a float64 copy of the batch. The schema, the pure-torch default kernel
// (svdfuse/reference.py: gram, the oracle) and the fake impl are defined in svdfuse/_native.py.
//
// Memory-bound: every factor is read once. One parallel region per call over the batch; each
// thread converts a tile of vectors to float64 and accumulates their outer products into its r×r
// accumulator, which stays in L1 for the ranks LoRAs have (16: 2 KB).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace svdfuse {

namespace {

constexpr int64_t kTileDoubles = 4096;  // 32 KB of converted vectors: the tile and the accumulator share L1/L2

// acc (r × r, row-major) += Σ_t v_t v_tᵀ over the `count` vectors of length r in `tile`. The
// inner loop runs over contiguous doubles; the clones let the loader pick AVX-512 or AVX2 where the
// machine has them, the baseline build being plain x86-64.
__attribute__((target_clones("avx512f", "avx2", "default"))) void accumulate(const double* tile, int64_t count, int64_t r, double* acc) {
  for (int64_t t = 0; t < count; ++t) {
    const double* v = tile + t * r;
    for (int64_t i = 0; i < r; ++i) {
      const double s = v[i];
      double* row = acc + i * r;
      for (int64_t j = 0; j < r; ++j) {
        row[j] += s * v[j];
      }
    }
  }
}

// out (r × r) = xᵀx (left: the vectors are x's a rows of length b) or x xᵀ (right: its b columns
// of length a), x (a, b) row-major.
template <typename T>
void gram_one(const T* x, int64_t a, int64_t b, bool left, double* out, std::vector<double>& tile) {
  const int64_t r = left ? b : a;
  const int64_t count = left ? a : b;
  const int64_t per = std::max<int64_t>(1, kTileDoubles / r);
  tile.resize(per * r);
  std::fill(out, out + r * r, 0.0);
  for (int64_t first = 0; first < count; first += per) {
    const int64_t n = std::min(per, count - first);
    if (left) {
      const T* rows = x + first * b;
      for (int64_t k = 0; k < n * r; ++k) {
        tile[k] = static_cast<double>(rows[k]);
      }
    } else {
      for (int64_t i = 0; i < a; ++i) {
        const T* row = x + i * b + first;
        for (int64_t k = 0; k < n; ++k) {
          tile[k * r + i] = static_cast<double>(row[k]);
        }
      }
    }
    accumulate(tile.data(), n, r, out);
  }
}

at::Tensor gram_cpu(const at::Tensor& x_in, bool left) {
  TORCH_CHECK(x_in.dim() >= 2, "gram: x must have shape (..., a, b), found ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t a = x.size(-2), b = x.size(-1);
  const int64_t r = left ? b : a;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(r);
  shape.push_back(r);
  at::Tensor out = at::empty(shape, x.options().dtype(at::kDouble));
  const int64_t batch = a * b == 0 ? 0 : x.numel() / (a * b);
  if (r == 0 || batch == 0) {
    return out.zero_();
  }
  double* result = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gram", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> tile;
      for (int64_t k = begin; k < end; ++k) {
        gram_one(data + k * a * b, a, b, left, result + k * r * r, tile);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(svdfuse, CPU, m) {
  m.impl("gram", &gram_cpu);
}

}  // namespace svdfuse
