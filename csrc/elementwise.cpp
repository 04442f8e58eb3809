// The CPU kernel of torch.ops.svdfuse.merge_block: one pass over a row block of T sources and the
// base computing the weighted (DARE: masked) sum of the task vectors, the base added back, and the
// block's checks (which sources differ from the base, which are all zeros, the first non-finite
// output). The schema, the pure-torch default kernel (svdfuse/reference.py: merge_block, the
// oracle) and the fake impl are defined in svdfuse/_native.py.
//
// Memory-bound: the block is read once. One parallel region per call over units of the flat index
// (DARE's 65536-entry chunks, so a unit seeds its own generators); inside a unit each thread
// streams every source through a tile of kTile entries whose fp32 accumulator stays in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace svdfuse {

namespace {

constexpr int64_t kChunk = 1 << 16;  // DARE's chunk of seeded draws: svdfuse/methods/elementwise.py _CHUNK
constexpr int64_t kTile = 2048;

// at::mt19937, the generator of torch.rand on the CPU: the same seeding and tempering, so a chunk's
// draws are torch.rand(65536, generator=torch.Generator().manual_seed(seed))'s, bit for bit.
class MT19937 {
 public:
  void seed(uint64_t seed) {
    state_[0] = static_cast<uint32_t>(seed & 0xffffffffu);
    for (uint32_t j = 1; j < kN; ++j) {
      state_[j] = 1812433253u * (state_[j - 1] ^ (state_[j - 1] >> 30)) + j;
    }
    next_ = kN;
  }

  void fill(uint32_t* out, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      if (next_ == kN) {
        twist();
      }
      uint32_t y = state_[next_++];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      out[j] = y ^ (y >> 18);
    }
  }

  void discard(int64_t n) {
    std::array<uint32_t, kTile> sink;
    for (; n > 0; n -= kTile) {
      fill(sink.data(), std::min(n, kTile));
    }
  }

 private:
  static constexpr uint32_t kN = 624, kM = 397;
  static uint32_t mix(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
  }
  void twist() {
    uint32_t j = 0;
    for (; j < kN - kM; ++j) state_[j] = state_[j + kM] ^ mix(state_[j], state_[j + 1]);
    for (; j < kN - 1; ++j) state_[j] = state_[j + kM - kN] ^ mix(state_[j], state_[j + 1]);
    state_[kN - 1] = state_[kM - 1] ^ mix(state_[kN - 1], state_[0]);
    next_ = 0;
  }
  std::array<uint32_t, kN> state_;
  uint32_t next_ = kN;
};

struct Args {
  int64_t T, N, stride, start;
  const float* weight;
  float scale, divisor;
  const int64_t* seeds;  // (T, chunks) for DARE, else nullptr
  int64_t chunks;
  uint32_t drop;  // a draw survives iff its 24 low bits >= drop: torch.rand's value >= float32(drop_rate)
  bool same_is_zero, add_base;
};

// Flags of one unit: per source "differs from the base" and "has a nonzero", the base's nonzero
// last; the first non-finite output (flat index) or -1.
struct Flags {
  std::vector<uint8_t> differs, nonzero;
  int64_t bad = -1;
};

template <typename in_t, typename out_t>
void merge_unit(const Args& a, const in_t* src, const in_t* base, out_t* out, int64_t lo, int64_t hi, Flags& f,
                std::vector<MT19937>& gens) {
  const bool dare = a.seeds != nullptr;
  if (dare) {
    const int64_t chunk = (a.start + lo) / kChunk, first = a.start / kChunk;
    for (int64_t i = 0; i < a.T; ++i) {
      gens[i].seed(static_cast<uint64_t>(a.seeds[i * a.chunks + chunk - first]));
      gens[i].discard((a.start + lo) - chunk * kChunk);
    }
  }
  alignas(64) float x0[kTile];
  alignas(64) float acc[kTile];
  alignas(64) uint32_t draws[kTile];
  for (int64_t t = lo; t < hi; t += kTile) {
    const int64_t n = std::min(kTile, hi - t);
    uint32_t base_nonzero = 0;
    for (int64_t j = 0; j < n; ++j) {
      x0[j] = static_cast<float>(base[t + j]);
      base_nonzero |= x0[j] != 0.0f;
      acc[j] = 0.0f;  // torch's sum starts from +0: a lone -0 task vector sums to +0
    }
    f.nonzero[a.T] |= base_nonzero;
    for (int64_t i = 0; i < a.T; ++i) {
      const in_t* x = src + i * a.stride + t;
      const float w = a.weight[i];
      uint32_t differs = 0, nonzero = 0;
      if (dare) {
        gens[i].fill(draws, n);
      }
      for (int64_t j = 0; j < n; ++j) {
        const float xi = static_cast<float>(x[j]);
        differs |= xi != x0[j];
        nonzero |= xi != 0.0f;
        float d = xi - x0[j];
        if (a.same_is_zero && xi == x0[j]) {
          d = 0.0f;  // an infinite entry equal to the base's is no change (inf - inf would be NaN)
        }
        d *= w;
        if (dare) {
          d *= (draws[j] & 0xffffffu) >= a.drop ? 1.0f : 0.0f;  // a multiply: a dropped NaN stays NaN
        }
        acc[j] += d;
      }
      f.differs[i] |= differs;
      f.nonzero[i] |= nonzero;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float v = acc[j] * a.scale / a.divisor;
      out[t + j] = static_cast<out_t>(a.add_base ? v + x0[j] : v);
    }
    if (f.bad < 0) {
      for (int64_t j = 0; j < n; ++j) {
        const float v = static_cast<float>(out[t + j]);
        if (!(v - v == 0.0f)) {  // NaN or ±inf
          f.bad = t + j;
          break;
        }
      }
    }
  }
}

template <typename in_t, typename out_t>
void merge_all(const Args& a, const in_t* src, const in_t* base, out_t* out, std::vector<Flags>& flags) {
  const int64_t first = a.start / kChunk;
  const int64_t units = static_cast<int64_t>(flags.size());
  at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
    std::vector<MT19937> gens(a.seeds != nullptr ? a.T : 0);
    for (int64_t u = b; u < e; ++u) {
      const int64_t lo = std::max<int64_t>(0, (first + u) * kChunk - a.start);
      const int64_t hi = std::min<int64_t>(a.N, (first + u + 1) * kChunk - a.start);
      merge_unit(a, src, base, out, lo, hi, flags[u], gens);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_block_cpu(
    const at::Tensor& sources, const at::Tensor& base, const at::Tensor& weights, double scale, double divisor,
    const std::optional<at::Tensor>& seeds, int64_t start, int64_t drop, bool same_is_zero, bool add_base,
    at::ScalarType dtype) {
  // The full checks, with their messages, are the Python ones (svdfuse/_native.py check_merge_block),
  // run by svdfuse.ops.merge_block; these guard the pointers below.
  TORCH_CHECK_VALUE(sources.dim() == 2 && base.dim() == 1 && base.size(0) == sources.size(1),
                    "merge_block: sources must be (T, N) and base (N,), found ", sources.sizes(), " and ", base.sizes());
  TORCH_CHECK_VALUE(sources.size(1) == 0 || sources.stride(1) == 1, "merge_block: sources' rows must be contiguous");
  TORCH_CHECK_TYPE(sources.scalar_type() == base.scalar_type(), "merge_block: base must have the sources' dtype");
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat && weights.numel() == sources.size(0),
                   "merge_block: weights must be float32 (T,)");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "merge_block: dtype must be float32, bfloat16 or float16");
  const int64_t T = sources.size(0), N = sources.size(1);
  const at::Tensor b = base.contiguous(), w = weights.contiguous();
  at::Tensor s = seeds ? seeds->contiguous() : at::Tensor();
  const int64_t first = start / kChunk, last = (start + N + kChunk - 1) / kChunk;
  if (seeds) {
    TORCH_CHECK_VALUE(s.scalar_type() == at::kLong && s.dim() == 2 && s.size(0) == T && s.size(1) == last - first,
                      "merge_block: seeds must be int64 (T, chunks) = [", T, ", ", last - first, "], found ", s.sizes());
  }
  Args a{T, N, T > 0 ? sources.stride(0) : 0, start, w.const_data_ptr<float>(), static_cast<float>(scale),
         static_cast<float>(divisor), seeds ? s.const_data_ptr<int64_t>() : nullptr, last - first,
         static_cast<uint32_t>(drop), same_is_zero, add_base};
  at::Tensor out = at::empty({N}, base.options().dtype(dtype));
  std::vector<Flags> flags(std::max<int64_t>(0, last - first));
  for (Flags& f : flags) {
    f.differs.assign(T, 0);
    f.nonzero.assign(T + 1, 0);
  }
  const auto run = [&](auto in_tag) {
    using in_t = decltype(in_tag);
    const in_t* x = static_cast<const in_t*>(sources.const_data_ptr());
    const in_t* x0 = static_cast<const in_t*>(b.const_data_ptr());
    switch (dtype) {
      case at::kFloat: return merge_all(a, x, x0, out.mutable_data_ptr<float>(), flags);
      case at::kBFloat16: return merge_all(a, x, x0, out.mutable_data_ptr<c10::BFloat16>(), flags);
      default: return merge_all(a, x, x0, out.mutable_data_ptr<c10::Half>(), flags);
    }
  };
  switch (sources.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "merge_block: sources must be float32, bfloat16 or float16, found ",
                              sources.scalar_type());
  }
  at::Tensor differs = at::zeros({T}, base.options().dtype(at::kBool));
  at::Tensor zero = at::ones({T + 1}, base.options().dtype(at::kBool));
  bool* d = differs.mutable_data_ptr<bool>();
  bool* z = zero.mutable_data_ptr<bool>();
  int64_t bad = -1;
  for (const Flags& f : flags) {
    for (int64_t i = 0; i < T; ++i) d[i] = d[i] || f.differs[i];
    for (int64_t i = 0; i <= T; ++i) z[i] = z[i] && !f.nonzero[i];
    if (bad < 0) bad = f.bad;
  }
  return {out, differs, zero, at::scalar_tensor(bad, base.options().dtype(at::kLong))};
}

}  // namespace

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, CPU, m) {
  m.impl("merge_block", &svdfuse::merge_block_cpu);
}
