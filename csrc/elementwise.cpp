// The CPU kernel of torch.ops.svdfuse.merge_block: one pass over a row block of T sources and the
// base computing the weighted (DARE: masked) sum of the task vectors in source order, divided and
// scaled, the base added back, and the block's checks (which sources differ from the base, which
// are all zeros, the first non-finite output). The schema, the pure-torch default kernel (svdfuse/reference.py: merge_block, the
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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace svdfuse {

namespace {

// The per-entry loops also in an AVX2 build chosen at load time where the CPU has it (8 floats a
// vector, not SSE2's 4). Not AVX-512 or FMA: a fused multiply-add would round differently from the
// reference, which the kernels match bit for bit.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SVDFUSE_WIDE __attribute__((target_clones("avx2", "default")))
#else
#define SVDFUSE_WIDE
#endif

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

  // In runs of the state: the twist and the tempering are then plain loops the compiler vectorizes.
  void fill(uint32_t* out, int64_t n) {
    while (n > 0) {
      if (next_ == kN) {
        twist();
      }
      const int64_t run = std::min<int64_t>(n, kN - next_);
      const uint32_t* s = state_.data() + next_;
      for (int64_t j = 0; j < run; ++j) {
        uint32_t y = s[j];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        out[j] = y ^ (y >> 18);
      }
      next_ += static_cast<uint32_t>(run);
      out += run;
      n -= run;
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
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((0u - (v & 1u)) & 0x9908b0dfu);
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
  int64_t T, N, start;
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

// Ask for the next tile of a source while this one is computed: T + 1 interleaved streams of a few
// KB each are more than the hardware prefetcher follows across page boundaries.
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

template <typename in_t, typename out_t>
SVDFUSE_WIDE void merge_unit(const Args& a, const in_t* const* src, const in_t* base, out_t* out, int64_t lo, int64_t hi, Flags& f,
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
    prefetch(base + t + n, std::min(kTile, hi - t - n));
    for (int64_t i = 0; i < a.T; ++i) {
      const in_t* x = src[i] + t;
      prefetch(x + n, std::min(kTile, hi - t - n));
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
      const float v = acc[j] / a.divisor * a.scale;
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

// Units handed out one at a time from a shared counter, not split evenly up front: where another job
// slows one thread (a shared machine), the others take its share instead of waiting for it. `body`
// runs once per worker with its own scratch and calls `pull()` for units until one is >= units.
template <typename Body>
void for_each_unit(int64_t units, const Body& body) {
  std::atomic<int64_t> next{0};
  const auto pull = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(units, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(pull); });
}

template <typename in_t, typename out_t>
void merge_all(const Args& a, const in_t* const* src, const in_t* base, out_t* out, std::vector<Flags>& flags) {
  const int64_t first = a.start / kChunk;
  const int64_t units = static_cast<int64_t>(flags.size());
  for_each_unit(units, [&](const auto& pull) {
    std::vector<MT19937> gens(a.seeds != nullptr ? a.T : 0);
    for (int64_t u; (u = pull()) < units;) {
      const int64_t lo = std::max<int64_t>(0, (first + u) * kChunk - a.start);
      const int64_t hi = std::min<int64_t>(a.N, (first + u + 1) * kChunk - a.start);
      merge_unit(a, src, base, out, lo, hi, flags[u], gens);
    }
  });
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The full checks, with their messages, are the Python ones (svdfuse/_native.py), run by the
// svdfuse.ops front door; these guard the pointers below.
void guard(const char* op, at::TensorList sources, const at::Tensor& base, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(base.dim() == 1, op, ": base must be (N,), found ", base.sizes());
  for (const at::Tensor& x : sources) {
    TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == base.size(0) && x.is_contiguous(), op,
                      ": each source must be contiguous (N,) = [", base.size(0), "], found ", x.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() == base.scalar_type(), op, ": every source must have the base's dtype");
  }
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": dtype must be float32, bfloat16 or float16");
}

// Runs body(source pointers, base pointer, output pointer) with the types of the call.
template <typename Body>
void dispatch(const char* op, at::TensorList sources, const at::Tensor& base, at::Tensor& out, Body body) {
  const auto run = [&](auto in_tag) {
    using in_t = decltype(in_tag);
    std::vector<const in_t*> x(sources.size());
    for (size_t i = 0; i < sources.size(); ++i) {
      x[i] = static_cast<const in_t*>(sources[i].const_data_ptr());
    }
    const in_t* x0 = static_cast<const in_t*>(base.const_data_ptr());
    switch (out.scalar_type()) {
      case at::kFloat: return body(x.data(), x0, out.mutable_data_ptr<float>());
      case at::kBFloat16: return body(x.data(), x0, out.mutable_data_ptr<c10::BFloat16>());
      default: return body(x.data(), x0, out.mutable_data_ptr<c10::Half>());
    }
  };
  switch (base.scalar_type()) {
    case at::kFloat: return run(float{});
    case at::kBFloat16: return run(c10::BFloat16{});
    case at::kHalf: return run(c10::Half{});
    default: TORCH_CHECK_TYPE(false, op, ": sources must be float32, bfloat16 or float16, found ", base.scalar_type());
  }
}

std::vector<Flags> new_flags(int64_t units, int64_t T) {
  std::vector<Flags> flags(std::max<int64_t>(0, units));
  for (Flags& f : flags) {
    f.differs.assign(T, 0);
    f.nonzero.assign(T + 1, 0);
  }
  return flags;
}

Result finish(const std::vector<Flags>& flags, int64_t T, const at::Tensor& out) {
  at::Tensor differs = at::zeros({T}, out.options().dtype(at::kBool));
  at::Tensor zero = at::ones({T + 1}, out.options().dtype(at::kBool));
  bool* d = differs.mutable_data_ptr<bool>();
  bool* z = zero.mutable_data_ptr<bool>();
  int64_t bad = -1;
  for (const Flags& f : flags) {
    for (int64_t i = 0; i < T; ++i) d[i] = d[i] || f.differs[i];
    for (int64_t i = 0; i <= T; ++i) z[i] = z[i] && !f.nonzero[i];
    if (bad < 0) bad = f.bad;
  }
  return {out, differs, zero, at::scalar_tensor(bad, out.options().dtype(at::kLong))};
}

Result merge_block_cpu(at::TensorList sources, const at::Tensor& base, const at::Tensor& weights, double scale,
                       double divisor, const std::optional<at::Tensor>& seeds, int64_t start, int64_t drop,
                       bool same_is_zero, bool add_base, at::ScalarType dtype) {
  guard("merge_block", sources, base, dtype);
  const int64_t T = static_cast<int64_t>(sources.size()), N = base.size(0);
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat && weights.numel() == T, "merge_block: weights must be float32 (T,)");
  const at::Tensor b = base.contiguous(), w = weights.contiguous();
  const at::Tensor s = seeds ? seeds->contiguous() : at::Tensor();
  const int64_t first = start / kChunk, last = (start + N + kChunk - 1) / kChunk;
  if (seeds) {
    TORCH_CHECK_VALUE(s.scalar_type() == at::kLong && s.dim() == 2 && s.size(0) == T && s.size(1) == last - first,
                      "merge_block: seeds must be int64 (T, chunks) = [", T, ", ", last - first, "], found ", s.sizes());
  }
  const Args a{T, N, start, w.const_data_ptr<float>(), static_cast<float>(scale), static_cast<float>(divisor),
               seeds ? s.const_data_ptr<int64_t>() : nullptr, last - first, static_cast<uint32_t>(drop), same_is_zero,
               add_base};
  at::Tensor out = at::empty({N}, base.options().dtype(dtype));
  std::vector<Flags> flags = new_flags(last - first, T);
  dispatch("merge_block", sources, b, out, [&](const auto* x, const auto* x0, auto* o) { merge_all(a, x, x0, o, flags); });
  return finish(flags, T, out);
}

// TIES on a block: each source's task vector trimmed to its survivors (|τ| > threshold, or equal
// and before the cutoff in the scope's flat order), weighted, the sign elected by their sum, and
// the values that agree with it combined (their weighted mean or sum). The T trimmed values of a
// tile are kept for the second pass: a tile holds kTiesBytes of them, whatever T.
constexpr int64_t kTiesBytes = 1 << 17;

struct TiesArgs {
  int64_t T, N, start;  // start: the block's first entry's flat index in the trim's scope
  const float* weight;  // nullptr: unweighted
  const float* threshold;
  const int64_t* cutoff;
  float scale;
  bool mean, positive, keep_none, same_is_zero, add_base;
};

template <typename in_t, typename out_t>
SVDFUSE_WIDE void ties_unit(const TiesArgs& a, const in_t* const* src, const in_t* base, out_t* out, int64_t lo, int64_t hi, Flags& f,
               std::vector<float>& kept) {
  const int64_t tile = std::clamp<int64_t>(kTiesBytes / (4 * std::max<int64_t>(a.T, 1)), 64, kTile);
  kept.resize(static_cast<size_t>(a.T * tile));
  alignas(64) float x0[kTile];
  alignas(64) float sum[kTile];
  alignas(64) float count[kTile];
  for (int64_t t = lo; t < hi; t += tile) {
    const int64_t n = std::min(tile, hi - t);
    uint32_t base_nonzero = 0;
    for (int64_t j = 0; j < n; ++j) {
      x0[j] = static_cast<float>(base[t + j]);
      base_nonzero |= x0[j] != 0.0f;
      sum[j] = 0.0f;
    }
    f.nonzero[a.T] |= base_nonzero;
    prefetch(base + t + n, std::min(tile, hi - t - n));
    for (int64_t i = 0; i < a.T; ++i) {
      const in_t* x = src[i] + t;
      prefetch(x + n, std::min(tile, hi - t - n));
      float* k = kept.data() + i * tile;
      const float thr = a.threshold[i], w = a.weight ? a.weight[i] : 1.0f;
      const bool live = !a.keep_none, same_is_zero = a.same_is_zero;
      // entries at the threshold survive up to the cutoff: [t, edge) of this tile
      const int64_t edge = std::clamp<int64_t>(a.cutoff[i] - a.start - t, 0, n);
      uint32_t differs = 0, nonzero = 0;
      // One loop before the cutoff (an entry equal to the threshold survives) and one after (it does
      // not): each loop body straight-line code, so that it vectorizes.
      const auto trim = [&](int64_t from, int64_t to, bool at_threshold) {
        for (int64_t j = from; j < to; ++j) {
          const float xi = static_cast<float>(x[j]);
          differs |= xi != x0[j];
          nonzero |= xi != 0.0f;
          // the flag first (the loop is split on it), then selects, not branches
          float d = (same_is_zero && xi == x0[j]) ? 0.0f : xi - x0[j];
          const float m = std::fabs(d);
          const bool keep = at_threshold ? m >= thr : m > thr;
          d *= (keep && live) ? 1.0f : 0.0f;  // a multiply: a NaN survives to be reported
          d *= w;
          k[j] = d;
          sum[j] += d;
        }
      };
      trim(0, edge, true);
      trim(edge, n, false);
      f.differs[i] |= differs;
      f.nonzero[i] |= nonzero;
    }
    for (int64_t j = 0; j < n; ++j) {
      // torch.sign: a NaN sum elects 0, as does an exact 0; "positive" turns both into +1
      const float e = static_cast<float>(static_cast<int>(sum[j] > 0.0f) - static_cast<int>(sum[j] < 0.0f));
      sum[j] = (a.positive && e == 0.0f) ? 1.0f : e;
      count[j] = 0.0f;
    }
    alignas(64) float agreeing[kTile];
    for (int64_t j = 0; j < n; ++j) agreeing[j] = 0.0f;
    for (int64_t i = 0; i < a.T; ++i) {
      const float* k = kept.data() + i * tile;
      const float w = a.weight ? a.weight[i] : 1.0f;
      for (int64_t j = 0; j < n; ++j) {
        const bool agree = k[j] * sum[j] > 0.0f;
        agreeing[j] += k[j] * (agree ? 1.0f : 0.0f);
        count[j] += agree ? w : 0.0f;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      float v = agreeing[j];
      if (a.mean) {
        v /= count[j] == 0.0f ? 1.0f : count[j];
      }
      v *= a.scale;
      out[t + j] = static_cast<out_t>(a.add_base ? v + x0[j] : v);
    }
    if (f.bad < 0) {
      for (int64_t j = 0; j < n; ++j) {
        const float v = static_cast<float>(out[t + j]);
        if (!(v - v == 0.0f)) {
          f.bad = t + j;
          break;
        }
      }
    }
  }
}

// Units of kChunk entries, as merge_block's: one parallel region, units handed out one at a time.
template <typename in_t, typename out_t>
void ties_all(const TiesArgs& a, const in_t* const* src, const in_t* base, out_t* out, std::vector<Flags>& flags) {
  const int64_t units = static_cast<int64_t>(flags.size());
  for_each_unit(units, [&](const auto& pull) {
    std::vector<float> kept;
    for (int64_t u; (u = pull()) < units;) {
      ties_unit(a, src, base, out, u * kChunk, std::min(a.N, (u + 1) * kChunk), flags[u], kept);
    }
  });
}


Result ties_block_cpu(at::TensorList sources, const at::Tensor& base, const std::optional<at::Tensor>& weights,
                      const at::Tensor& threshold, const at::Tensor& cutoff, int64_t start, bool keep_none, double scale,
                      bool mean, bool positive, bool same_is_zero, bool add_base, at::ScalarType dtype) {
  guard("ties_block", sources, base, dtype);
  const int64_t T = static_cast<int64_t>(sources.size()), N = base.size(0);
  TORCH_CHECK_TYPE(!weights || (weights->scalar_type() == at::kFloat && weights->numel() == T),
                   "ties_block: weights must be float32 (T,)");
  TORCH_CHECK_TYPE(threshold.scalar_type() == at::kFloat && threshold.numel() == T, "ties_block: threshold must be float32 (T,)");
  TORCH_CHECK_TYPE(cutoff.scalar_type() == at::kLong && cutoff.numel() == T, "ties_block: cutoff must be int64 (T,)");
  const at::Tensor b = base.contiguous(), thr = threshold.contiguous(), cut = cutoff.contiguous();
  const at::Tensor w = weights ? weights->contiguous() : at::Tensor();
  const TiesArgs a{T, N, start, weights ? w.const_data_ptr<float>() : nullptr, thr.const_data_ptr<float>(),
                   cut.const_data_ptr<int64_t>(), static_cast<float>(scale), mean, positive, keep_none, same_is_zero,
                   add_base};
  at::Tensor out = at::empty({N}, base.options().dtype(dtype));
  std::vector<Flags> flags = new_flags((N + kChunk - 1) / kChunk, T);
  dispatch("ties_block", sources, b, out, [&](const auto* x, const auto* x0, auto* o) { ties_all(a, x, x0, o, flags); });
  return finish(flags, T, out);
}


// The bracket pass of the exact trim (svdfuse/methods/trim.py) on a block: per source, how many
// |τ| = |x_i - x0| (formed here in fp32, as the merge forms it) lie above hi[i], the |τ| strictly
// between lo[i] and hi[i] with their flat indices (gathered source by source in flat order), and per
// unit of kChunk entries how many equal lo[i] and hi[i] (counted, not gathered: a bf16 task vector
// holds few distinct values, and millions of entries may equal a bound; where lo == hi, all count as hi).
using BracketResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One source's |τ| over a unit into `a`, with how many lie above h and equal l (where apart) and h.
template <typename in_t>
SVDFUSE_WIDE void bracket_counts(const in_t* x, const in_t* x0, int64_t n, float l, float h, bool apart, bool same_is_zero,
                                 float* a, int64_t& up, int64_t& at_lo, int64_t& at_hi) {
  int64_t above = 0, low = 0, high = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(x[j]), b = static_cast<float>(x0[j]);
    const float d = std::fabs(v - b);
    const float m = (same_is_zero && v == b) ? 0.0f : d;  // the flag first: the loop is split on it
    above += m > h;
    high += m == h;
    low += apart & (m == l);
    a[j] = m;
  }
  up = above, at_lo = low, at_hi = high;
}

// One source's unit: the counts, and the |τ| strictly inside (lo, hi) with their offsets in the unit
// gathered into v and jj (room for n + 8). Returns how many were gathered.
template <typename in_t>
int64_t bracket_source(const in_t* x, const in_t* x0, int64_t n, float l, float h, bool apart, bool same_is_zero,
                       float* a, float* v, int32_t* jj, int64_t& up, int64_t& at_lo, int64_t& at_hi);

#if defined(__GNUC__) && defined(__x86_64__)
// The same with AVX2 where the CPU has it: the gathering as well as the counting in vectors, each
// group of 8 entries stored whole with its inside lanes moved to the front by a permutation looked up
// from their mask, the position advanced by their number (no branch, no second loop over the unit).
#define SVDFUSE_AVX2 __attribute__((target("avx2,f16c,popcnt")))

struct CompressLanes {  // per 8-bit mask, the indices of its set lanes in order, a byte each
  uint64_t lanes[256];
  constexpr CompressLanes() : lanes() {
    for (int mask = 0; mask < 256; ++mask) {
      uint64_t packed = 0;
      for (int lane = 0, k = 0; lane < 8; ++lane) {
        if (mask >> lane & 1) packed |= static_cast<uint64_t>(lane) << (8 * k++);
      }
      lanes[mask] = packed;
    }
  }
};
constexpr CompressLanes kCompress;

SVDFUSE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SVDFUSE_AVX2 inline __m256 load8(const c10::BFloat16* p) {  // a bfloat16 is a float's top 16 bits
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
SVDFUSE_AVX2 inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <typename in_t>
SVDFUSE_AVX2 int64_t bracket_source_avx2(const in_t* x, const in_t* x0, int64_t n, float l, float h, bool apart,
                                          bool same_is_zero, float* v, int32_t* jj, int64_t& up, int64_t& at_lo,
                                          int64_t& at_hi) {
  const __m256 H = _mm256_set1_ps(h), L = _mm256_set1_ps(l), sign = _mm256_set1_ps(-0.0f);
  __m256i above = _mm256_setzero_si256(), high = above, low = above;  // minus the lanes' counts
  __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t in = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = load8(x + j), bv = load8(x0 + j);
    __m256 m = _mm256_andnot_ps(sign, _mm256_sub_ps(xv, bv));
    if (same_is_zero) m = _mm256_andnot_ps(_mm256_cmp_ps(xv, bv, _CMP_EQ_OQ), m);
    above = _mm256_add_epi32(above, _mm256_castps_si256(_mm256_cmp_ps(m, H, _CMP_GT_OQ)));
    high = _mm256_add_epi32(high, _mm256_castps_si256(_mm256_cmp_ps(m, H, _CMP_EQ_OQ)));
    low = _mm256_add_epi32(low, _mm256_castps_si256(_mm256_cmp_ps(m, L, _CMP_EQ_OQ)));
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(m, L, _CMP_GT_OQ), _mm256_cmp_ps(m, H, _CMP_LT_OQ));
    const int mask = _mm256_movemask_ps(inside);
    const __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kCompress.lanes[mask])));
    _mm256_storeu_ps(v + in, _mm256_permutevar8x32_ps(m, order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(jj + in), _mm256_permutevar8x32_epi32(index, order));
    in += __builtin_popcount(static_cast<unsigned>(mask));
    index = _mm256_add_epi32(index, eight);
  }
  alignas(32) int32_t lanes[3][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), above);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), high);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), low);
  int64_t counts[3] = {0, 0, 0};
  for (int c = 0; c < 3; ++c) {
    for (int k = 0; k < 8; ++k) counts[c] -= lanes[c][k];
  }
  for (; j < n; ++j) {
    const float xi = static_cast<float>(x[j]), b = static_cast<float>(x0[j]);
    const float m = (same_is_zero && xi == b) ? 0.0f : std::fabs(xi - b);
    counts[0] += m > h;
    counts[1] += m == h;
    counts[2] += m == l;
    v[in] = m;
    jj[in] = static_cast<int32_t>(j);
    in += (m > l) & (m < h);
  }
  up = counts[0], at_hi = counts[1], at_lo = apart ? counts[2] : 0;
  return in;
}

const bool kHasAvx2 = [] {
  __builtin_cpu_init();  // this initializer may run before the one that would have done it
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
}();
#endif

template <typename in_t>
int64_t bracket_source(const in_t* x, const in_t* x0, int64_t n, float l, float h, bool apart, bool same_is_zero,
                       float* a, float* v, int32_t* jj, int64_t& up, int64_t& at_lo, int64_t& at_hi) {
#ifdef SVDFUSE_AVX2
  if (kHasAvx2) return bracket_source_avx2(x, x0, n, l, h, apart, same_is_zero, v, jj, up, at_lo, at_hi);
#endif
  // |τ| and the counts in a loop that vectorizes (the sources' dtype converted there), then the
  // compaction, which cannot, over floats alone
  bracket_counts(x, x0, n, l, h, apart, same_is_zero, a, up, at_lo, at_hi);
  int64_t in = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float m = a[j];
    v[in] = m;
    jj[in] = static_cast<int32_t>(j);
    in += (m > l) & (m < h);
  }
  return in;
}

template <typename in_t>
BracketResult bracket(const in_t* const* x, const in_t* x0, int64_t T, int64_t N, const float* lp, const float* hp,
                      bool same_is_zero, const at::TensorOptions& options) {
  // One pass: each (unit, source) counts and gathers into a buffer of its own, written without a
  // branch (every entry stored, the position advanced by whether it is inside: a branch taken for a
  // few percent of entries at random is mispredicted at every one of them); then one copy into place.
  const int64_t units = (N + kChunk - 1) / kChunk;
  std::vector<int64_t> above(units * T, 0);
  at::Tensor bounds = at::zeros({T, units, 2}, options.dtype(at::kLong));
  int64_t* bp = bounds.mutable_data_ptr<int64_t>();
  std::vector<std::vector<float>> found_v(units * T);
  std::vector<std::vector<int32_t>> found_j(units * T);
  for_each_unit(units, [&](const auto& pull) {
    std::vector<float> a(kChunk), v(kChunk + 8);
    std::vector<int32_t> jj(kChunk + 8);
    for (int64_t u; (u = pull()) < units;) {
      const int64_t lo_j = u * kChunk, n = std::min(N, lo_j + kChunk) - lo_j;
      for (int64_t i = 0; i < T; ++i) {
        const float l = lp[i], h = hp[i];
        int64_t up = 0, at_lo = 0, at_hi = 0;
        const int64_t in = bracket_source(x[i] + lo_j, x0 + lo_j, n, l, h, l != h, same_is_zero, a.data(), v.data(),
                                          jj.data(), up, at_lo, at_hi);
        above[u * T + i] = up;
        bp[(i * units + u) * 2] = at_lo;
        bp[(i * units + u) * 2 + 1] = at_hi;
        found_v[u * T + i].assign(v.begin(), v.begin() + in);
        found_j[u * T + i].assign(jj.begin(), jj.begin() + in);
      }
    }
  });
  at::Tensor up = at::zeros({T}, options.dtype(at::kLong));
  at::Tensor counts = at::zeros({T}, options.dtype(at::kLong));
  int64_t* upp = up.mutable_data_ptr<int64_t>();
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> at_(units * T);  // where each (unit, source) goes: source-major, then unit order
  int64_t total = 0;
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t u = 0; u < units; ++u) {
      const int64_t in = static_cast<int64_t>(found_v[u * T + i].size());
      at_[u * T + i] = total;
      total += in;
      cp[i] += in;
      upp[i] += above[u * T + i];
    }
  }
  at::Tensor values = at::empty({total}, options.dtype(at::kFloat));
  at::Tensor index = at::empty({total}, options.dtype(at::kLong));
  float* vp = values.mutable_data_ptr<float>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      for (int64_t i = 0; i < T; ++i) {
        const std::vector<float>& fv = found_v[u * T + i];
        const std::vector<int32_t>& fj = found_j[u * T + i];
        std::copy(fv.begin(), fv.end(), vp + at_[u * T + i]);
        for (size_t k = 0; k < fj.size(); ++k) ip[at_[u * T + i] + k] = u * kChunk + fj[k];
      }
    }
  });
  return {up, counts, values, index, bounds};
}

BracketResult trim_bracket_cpu(at::TensorList sources, const at::Tensor& base, const at::Tensor& lo,
                               const at::Tensor& hi, bool same_is_zero) {
  guard("trim_bracket", sources, base, at::kFloat);
  const int64_t T = static_cast<int64_t>(sources.size()), N = base.size(0);
  TORCH_CHECK_TYPE(lo.scalar_type() == at::kFloat && hi.scalar_type() == at::kFloat && lo.numel() == T && hi.numel() == T,
                   "trim_bracket: lo and hi must be float32 (T,)");
  const at::Tensor b = base.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  const float* lp = l.const_data_ptr<float>();
  const float* hp = h.const_data_ptr<float>();
  const auto run = [&](auto in_tag) {
    using in_t = decltype(in_tag);
    std::vector<const in_t*> x(T);
    for (int64_t i = 0; i < T; ++i) x[i] = static_cast<const in_t*>(sources[i].const_data_ptr());
    return bracket(x.data(), static_cast<const in_t*>(b.const_data_ptr()), T, N, lp, hp, same_is_zero, l.options());
  };
  switch (b.scalar_type()) {
    case at::kFloat: return run(float{});
    case at::kBFloat16: return run(c10::BFloat16{});
    case at::kHalf: return run(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "trim_bracket: sources must be float32, bfloat16 or float16, found ", b.scalar_type());
  }
}

// The sample of the exact trim's bracket: |τ| of every source at flat indices first, first + stride,
// ... (T, m) fp32, formed as the bracket forms them. One parallel region over the T·m entries.
at::Tensor trim_sample_cpu(at::TensorList sources, const at::Tensor& base, int64_t first, int64_t stride, bool same_is_zero) {
  guard("trim_sample", sources, base, at::kFloat);
  TORCH_CHECK_VALUE(first >= 0 && stride >= 1, "trim_sample: first must be >= 0 and stride >= 1, found ", first, " and ", stride);
  const int64_t T = static_cast<int64_t>(sources.size()), N = base.size(0);
  const int64_t m = first < N ? (N - first + stride - 1) / stride : 0;
  at::Tensor out = at::empty({T, m}, base.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const at::Tensor b = base.contiguous();
  const auto run = [&](auto in_tag) {
    using in_t = decltype(in_tag);
    const in_t* x0 = static_cast<const in_t*>(b.const_data_ptr()) + first;
    at::parallel_for(0, T * m, kTile, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi;) {  // a run of one source at a time
        const int64_t i = e / m, j0 = e - i * m, j1 = std::min(m, j0 + (hi - e));
        const in_t* x = static_cast<const in_t*>(sources[i].const_data_ptr()) + first;
        float* row = o + i * m;
        for (int64_t j = j0; j < j1; ++j) {
          const float v = static_cast<float>(x[j * stride]), w = static_cast<float>(x0[j * stride]);
          row[j] = (same_is_zero && v == w) ? 0.0f : std::fabs(v - w);
        }
        e += j1 - j0;
      }
    });
  };
  switch (b.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "trim_sample: sources must be float32, bfloat16 or float16, found ", b.scalar_type());
  }
  return out;
}

// The order statistics of the exact trim: per source i, of its counts[i] values (concatenated source by
// source in flat order), the rank[i]-th largest t (NaN above +inf, as torch.kthvalue orders them), how
// many are > t and == t, and the position among them of the need[i]-th equal to t (need[i] = rank[i]
// minus the count above t; -1 where every equal one is needed). A rank outside [1, counts[i]] gives NaN
// and -1 counts. One parallel region over the sources: a radix select where a list holds no NaN and
// no negative number (|τ| always), else a copy and an nth_element.

// The bits of a non-negative float (sign clear, not NaN) order as the floats do.
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr int kRadixBits = 10;

// Largest and smallest bits of a list (a NaN or a set sign bit makes the largest > kInfBits).
SVDFUSE_WIDE void bits_range(const uint32_t* x, int64_t n, uint32_t& lo, uint32_t& hi) {
  uint32_t l = 0xffffffffu, h = 0;
  for (int64_t j = 0; j < n; ++j) {
    l = std::min(l, x[j]);
    h = std::max(h, x[j]);
  }
  lo = l, hi = h;
}

// The k-th largest (1-based) of n >= k bit patterns in [lo, hi]: a histogram of kRadixBits-bit digits
// of (bits - lo) picks the digit's bucket that holds it, and the values in that bucket, copied to
// `keys`, are narrowed the same way until the bucket is one value. Four histograms taken in turn, so
// that runs of equal values (ties: low-precision task vectors) do not wait on one counter.
SVDFUSE_WIDE void count_around(const float* x, int64_t n, float t, int64_t& above, int64_t& same) {
  int64_t a = 0, e = 0;
  for (int64_t j = 0; j < n; ++j) {
    a += x[j] > t;
    e += x[j] == t;
  }
  above = a, same = e;
}

uint32_t radix_kth_largest(const uint32_t* x, int64_t n, int64_t k, uint32_t lo, uint32_t hi, std::vector<uint32_t>& keys) {
  constexpr int64_t buckets = int64_t{1} << kRadixBits;
  std::vector<int64_t> hist(4 * buckets);
  const uint32_t* cur = x;
  while (lo != hi) {
    const int width = 32 - __builtin_clz(hi - lo);
    const int shift = std::max(0, width - kRadixBits);
    std::fill(hist.begin(), hist.end(), 0);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      for (int64_t q = 0; q < 4; ++q) ++hist[q * buckets + ((cur[j + q] - lo) >> shift)];
    }
    for (; j < n; ++j) ++hist[(cur[j] - lo) >> shift];
    int64_t b = ((hi - lo) >> shift) + 1, above = 0, in = 0;
    while (--b >= 0) {
      in = hist[b] + hist[buckets + b] + hist[2 * buckets + b] + hist[3 * buckets + b];
      if (above + in >= k) break;
      above += in;
    }
    k -= above;
    const uint32_t first = lo + (static_cast<uint32_t>(b) << shift);
    if (shift == 0) return first;
    const uint32_t last = std::min<uint32_t>(hi, first + ((uint32_t{1} << shift) - 1));
    if (keys.size() <= static_cast<size_t>(in)) keys.resize(in + 1);  // every key is stored, the next one over it
    int64_t w = 0;
    for (j = 0; j < n; ++j) {
      const uint32_t key = cur[j];
      keys[w] = key;
      w += (key >= first) & (key <= last);
    }
    cur = keys.data(), n = w, lo = first, hi = last;
  }
  return lo;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> trim_select_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                                            const at::Tensor& rank) {
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat && values.dim() == 1, "trim_select: values must be float32 (M,)");
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong && rank.scalar_type() == at::kLong && counts.dim() == 1 &&
                       rank.sizes() == counts.sizes(),
                   "trim_select: counts and rank must be int64 (T,)");
  const int64_t T = counts.numel();
  const at::Tensor v = values.contiguous(), c = counts.contiguous(), r = rank.contiguous();
  const float* vp = v.const_data_ptr<float>();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  std::vector<int64_t> offset(T + 1, 0);
  for (int64_t i = 0; i < T; ++i) offset[i + 1] = offset[i] + cp[i];
  TORCH_CHECK_VALUE(offset[T] == v.numel(), "trim_select: counts must add up to the values' length ", v.numel(),
                    ", found ", offset[T]);
  at::Tensor threshold = at::empty({T}, v.options());
  at::Tensor greater = at::empty({T}, c.options()), equal = at::empty({T}, c.options()), position = at::empty({T}, c.options());
  float* tp = threshold.mutable_data_ptr<float>();
  int64_t* gp = greater.mutable_data_ptr<int64_t>();
  int64_t* ep = equal.mutable_data_ptr<int64_t>();
  int64_t* pp = position.mutable_data_ptr<int64_t>();
  const auto larger = [](float a, float b) { return std::isnan(a) ? !std::isnan(b) : a > b; };
  // a few values in all (a small tensor's): on this thread, not worth a thread-pool round trip
  const int64_t grain = offset[T] < kChunk ? std::max<int64_t>(T, 1) : 1;
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    std::vector<float> scratch;
    std::vector<uint32_t> keys;
    for (int64_t i = b; i < e; ++i) {
      const float* x = vp + offset[i];
      const int64_t n = cp[i], k = rp[i];
      if (k < 1 || k > n) {
        tp[i] = std::nanf("");
        gp[i] = ep[i] = pp[i] = -1;
        continue;
      }
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
      uint32_t lo, hi;
      bits_range(bits, n, lo, hi);
      float t;
      if (hi <= kInfBits) {
        const uint32_t found = radix_kth_largest(bits, n, k, lo, hi, keys);
        std::memcpy(&t, &found, sizeof t);
      } else {
        scratch.assign(x, x + n);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), larger);
        t = scratch[k - 1];
      }
      const bool nan = std::isnan(t);
      int64_t above = 0, same = 0;
      if (hi <= kInfBits) {  // no NaN: plain comparisons, a loop that vectorizes
        count_around(x, n, t, above, same);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const bool eq = nan ? std::isnan(x[j]) : x[j] == t;
          above += !eq && larger(x[j], t);
          same += eq;
        }
      }
      tp[i] = t;
      gp[i] = above;
      ep[i] = same;
      const int64_t need = k - above;  // >= 1: the k-th largest is one of the equal ones
      pp[i] = -1;
      if (need < same) {
        for (int64_t j = 0, seen = 0; j < n; ++j) {
          if ((nan ? std::isnan(x[j]) : x[j] == t) && ++seen == need) {
            pp[i] = j;
            break;
          }
        }
      }
    }
  });
  return {threshold, greater, equal, position};
}

}  // namespace

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, CPU, m) {
  m.impl("merge_block", &svdfuse::merge_block_cpu);
  m.impl("ties_block", &svdfuse::ties_block_cpu);
  m.impl("trim_bracket", &svdfuse::trim_bracket_cpu);
  m.impl("trim_sample", &svdfuse::trim_sample_cpu);
  m.impl("trim_select", &svdfuse::trim_select_cpu);
}
