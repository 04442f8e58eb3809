// The CPU kernel of torch.ops.svdfuse.gram: the float64 Gram matrices of a batch of thin factors
// (LoRA's B (m, r) and A (r, n)), read in their stored dtype and converted one cache-sized tile at a
// time, never as a float64 copy of the batch. The schema, the pure-torch default kernel
// (svdfuse/reference.py: gram, the oracle) and the fake impl are defined in svdfuse/_native.py.
//
// Compute-bound at LoRA ranks (2·r flops per value read). One parallel region per call, the batch's
// factors handed out one at a time. Each thread converts a tile of the factor to float64 (r padded to a multiple of 4) that
// stays in L1, then sweeps it once per pair of Gram rows with a block of sums held in registers:
// 8 fused multiply-adds for 6 loads, where a rank-one update of the whole r × r accumulator per
// vector would load and store every sum (2-core x86-64, 2026-12-07, 64 bf16 factors 4096 × 16 on
// one thread: 3.6 ms, against 6.5 ms for that update). The left Gram (xᵀx) sums outer products of
// x's rows, the right one (x xᵀ) dot products along them: both read x as stored, no transposing
// copy. Only the blocks on or above the diagonal are summed; the rest is their mirror, so the
// result is exactly symmetric.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace svdfuse {

namespace {

constexpr int64_t kTileDoubles = 2048;  // 16 KB of converted vectors: half of L1, swept r/2 times

// acc (p × p, row-major) rows i, i+1, columns [c, c + W) += Σ_t v_t[i or i+1] · v_t[c:c+W] over the
// `count` vectors of length p in `tile`.
template <int W>
[[gnu::always_inline]] inline void pair_block(const double* tile, int64_t count, int64_t p, int64_t i, int64_t c, double* acc) {
  double top[W] = {}, bottom[W] = {};
  for (int64_t t = 0; t < count; ++t) {
    const double* v = tile + t * p;
    const double s0 = v[i], s1 = v[i + 1];
    for (int j = 0; j < W; ++j) {
      top[j] += s0 * v[c + j];
      bottom[j] += s1 * v[c + j];
    }
  }
  for (int j = 0; j < W; ++j) {
    acc[i * p + c + j] += top[j];
    acc[(i + 1) * p + c + j] += bottom[j];
  }
}

// The blocks of acc (p × p, p a multiple of 4) on or above the diagonal += the tile's sums.
[[gnu::always_inline]] inline void accumulate_upper(const double* tile, int64_t count, int64_t p, double* acc) {
  for (int64_t i = 0; i < p; i += 2) {
    int64_t c = i & ~int64_t{3};
    for (; c + 16 <= p; c += 16) pair_block<16>(tile, count, p, i, c, acc);
    if (c + 8 <= p) pair_block<8>(tile, count, p, i, c, acc), c += 8;
    if (c + 4 <= p) pair_block<4>(tile, count, p, i, c, acc);
  }
}

// acc rows i, i+1, columns [j, j + 4) += the dot products of the tile's rows, `tile` holding p
// rows of `width` values (a multiple of 4): the right Gram x xᵀ sums along x's rows, so its rows
// are read as stored, four lanes of partial sums per pair.
[[gnu::always_inline]] inline void pair_dots(const double* tile, int64_t width, int64_t p, int64_t i, int64_t j, double* acc) {
  double s[2][4][4] = {};
  for (int64_t k = 0; k < width; k += 4) {
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 4; ++b) {
        for (int l = 0; l < 4; ++l) s[a][b][l] += tile[(i + a) * width + k + l] * tile[(j + b) * width + k + l];
      }
    }
  }
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 4; ++b) acc[(i + a) * p + j + b] += (s[a][b][0] + s[a][b][1]) + (s[a][b][2] + s[a][b][3]);
  }
}

[[gnu::always_inline]] inline void accumulate_rows_upper(const double* tile, int64_t width, int64_t p, double* acc) {
  for (int64_t i = 0; i < p; i += 2) {
    for (int64_t j = i & ~int64_t{3}; j < p; j += 4) pair_dots(tile, width, p, i, j, acc);
  }
}

// acc (p × p) += the tile's sums: `rows`, the tile holds p rows of `count` values (x xᵀ), else
// `count` vectors of p values (xᵀx).
[[gnu::always_inline]] inline void accumulate_any(const double* tile, int64_t count, int64_t p, double* acc, bool rows) {
  rows ? accumulate_rows_upper(tile, count, p, acc) : accumulate_upper(tile, count, p, acc);
}

// The same loops built for AVX2 with fused multiply-adds, chosen at load time where the CPU has
// them (the sums are compared with float64 truth, not bit for bit with the reference).
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void accumulate_fma(const double* tile, int64_t count, int64_t p, double* acc, bool rows) {
  accumulate_any(tile, count, p, acc, rows);
}
const bool kHasFma = [] {
  __builtin_cpu_init();  // a static initializer may run before libgcc's own
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#else
constexpr bool kHasFma = false;
void accumulate_fma(const double*, int64_t, int64_t, double*, bool) {}
#endif

void accumulate(const double* tile, int64_t count, int64_t p, double* acc, bool rows) {
  kHasFma ? accumulate_fma(tile, count, p, acc, rows) : accumulate_any(tile, count, p, acc, rows);
}

// out (r × r) = xᵀx (left: the vectors are x's a rows of length b) or x xᵀ (right: its b columns
// of length a), x (a, b) row-major. `tile` and `acc`: the thread's scratch.
template <typename T>
void gram_one_portable(const T* x, int64_t a, int64_t b, bool left, double* out, std::vector<double>& tile, std::vector<double>& acc) {
  const int64_t r = left ? b : a;
  const int64_t p = (r + 3) & ~int64_t{3};
  const int64_t count = left ? a : b;
  const int64_t per = std::max<int64_t>(4, kTileDoubles / p) & ~int64_t{3};  // a multiple of 4: the lanes of `pair_dots`
  tile.assign(per * p, 0.0);  // the padding columns stay zero
  acc.assign(p * p, 0.0);
  for (int64_t first = 0; first < count; first += per) {
    const int64_t n = std::min(per, count - first);
    if (left) {
      for (int64_t k = 0; k < n; ++k) {
        const T* row = x + (first + k) * b;
        double* v = tile.data() + k * p;
        for (int64_t i = 0; i < r; ++i) v[i] = static_cast<double>(row[i]);
      }
      accumulate(tile.data(), n, p, acc.data(), false);
    } else {  // the tile holds p rows of `per` values: the columns [first, first + n) of x's rows
      for (int64_t i = 0; i < a; ++i) {
        const T* row = x + i * b + first;
        double* v = tile.data() + i * per;
        for (int64_t k = 0; k < n; ++k) v[k] = static_cast<double>(row[k]);
        std::fill(v + n, v + per, 0.0);
      }
      accumulate(tile.data(), per, p, acc.data(), true);
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) out[i * r + j] = j >= i ? acc[i * p + j] : acc[j * p + i];
  }
}

// The AVX-512 build, chosen at load time where the CPU has it (and SVDFUSE_NO_AVX512 is unset): the
// factors widened to float64 eight values at a time by masked loads, and the sums in 8-lane
// registers. The left Gram takes 4 × 16 blocks of outer products (8 registers of sums, 4 broadcasts
// and 2 loads per vector), the right one 4 × 4 blocks of dot products along the rows (16 registers,
// 8 loads per 8 columns), each reduced once per tile. 2-core x86-64 (AMD EPYC), 2026-12-07, 1000 bf16
// factors 4096 × 16 (131 MB) on two threads: left 30 ms with the AVX2 build, 12 ms with this one;
// right 44 ms, 11 ms.
#if defined(__GNUC__) && defined(__x86_64__)
// GCC 12's own AVX-512 headers trip its uninitialized-value warnings (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define SVDFUSE_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl")))

SVDFUSE_AVX512 inline __m512d load8(const double* x, __mmask8 m) { return _mm512_maskz_loadu_pd(m, x); }
SVDFUSE_AVX512 inline __m512d load8(const float* x, __mmask8 m) { return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x)); }
SVDFUSE_AVX512 inline __m512d load8(const c10::Half* x, __mmask8 m) { return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, x))); }
SVDFUSE_AVX512 inline __m512d load8(const c10::BFloat16* x, __mmask8 m) {  // a bfloat16 is a float's top 16 bits
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, x));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
}

// x[0, n) widened into out[0, n rounded up to 8), the padding zero.
template <typename T>
SVDFUSE_AVX512 inline void widen(const T* x, int64_t n, double* out) {
  for (int64_t k = 0; k < n; k += 8) {
    const __mmask8 m = n - k >= 8 ? __mmask8{0xFF} : static_cast<__mmask8>((1u << (n - k)) - 1);
    _mm512_storeu_pd(out + k, load8(x + k, m));
  }
}

// acc rows [i, i + NR), columns [c, c + 8·NW) += Σ_t v_t[i + a] · v_t[c:], the tile's `count` vectors of p values.
template <int NR, int NW>
SVDFUSE_AVX512 inline void outer_block(const double* tile, int64_t count, int64_t p, int64_t i, int64_t c, double* acc) {
  __m512d s[NR][NW];
  for (int a = 0; a < NR; ++a) {
    for (int w = 0; w < NW; ++w) s[a][w] = _mm512_setzero_pd();
  }
  for (int64_t t = 0; t < count; ++t) {
    const double* v = tile + t * p;
    __m512d col[NW];
    for (int w = 0; w < NW; ++w) col[w] = _mm512_loadu_pd(v + c + 8 * w);
    for (int a = 0; a < NR; ++a) {
      const __m512d e = _mm512_set1_pd(v[i + a]);
      for (int w = 0; w < NW; ++w) s[a][w] = _mm512_fmadd_pd(e, col[w], s[a][w]);
    }
  }
  for (int a = 0; a < NR; ++a) {
    for (int w = 0; w < NW; ++w) {
      double* sum = acc + (i + a) * p + c + 8 * w;
      _mm512_storeu_pd(sum, _mm512_add_pd(_mm512_loadu_pd(sum), s[a][w]));
    }
  }
}

// acc rows [i, i + 4), columns [j, j + 4) += the dot products of the tile's rows (p rows of `width`
// values, a multiple of 8).
SVDFUSE_AVX512 inline void dot_block(const double* tile, int64_t width, int64_t p, int64_t i, int64_t j, double* acc) {
  __m512d s[4][4];
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) s[a][b] = _mm512_setzero_pd();
  }
  for (int64_t k = 0; k < width; k += 8) {
    __m512d x[4], y[4];
    for (int a = 0; a < 4; ++a) x[a] = _mm512_loadu_pd(tile + (i + a) * width + k);
    for (int b = 0; b < 4; ++b) y[b] = _mm512_loadu_pd(tile + (j + b) * width + k);
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) s[a][b] = _mm512_fmadd_pd(x[a], y[b], s[a][b]);
    }
  }
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) acc[(i + a) * p + j + b] += _mm512_reduce_add_pd(s[a][b]);
  }
}

// gram_one's AVX-512 build: p = r rounded up to 8, tiles of `per` (a multiple of 8) vectors or columns.
template <typename T>
SVDFUSE_AVX512 void gram_one_avx512(const T* x, int64_t a, int64_t b, bool left, double* out, std::vector<double>& tile, std::vector<double>& acc) {
  const int64_t r = left ? b : a;
  const int64_t p = (r + 7) & ~int64_t{7};
  const int64_t count = left ? a : b;
  const int64_t per = std::max<int64_t>(8, kTileDoubles / p) & ~int64_t{7};
  tile.assign(per * p, 0.0);
  acc.assign(p * p, 0.0);
  for (int64_t first = 0; first < count; first += per) {
    const int64_t n = std::min(per, count - first);
    if (left) {
      for (int64_t k = 0; k < n; ++k) widen(x + (first + k) * b, r, tile.data() + k * p);
      for (int64_t i = 0; i < p; i += 4) {  // the blocks on or above the diagonal
        int64_t c = i & ~int64_t{7};
        for (; c + 16 <= p; c += 16) outer_block<4, 2>(tile.data(), n, p, i, c, acc.data());
        if (c < p) outer_block<4, 1>(tile.data(), n, p, i, c, acc.data());
      }
    } else {
      const int64_t width = (n + 7) & ~int64_t{7};
      for (int64_t i = 0; i < a; ++i) {
        double* v = tile.data() + i * per;
        widen(x + i * b + first, n, v);
        std::fill(v + width, v + per, 0.0);
      }
      for (int64_t i = 0; i < p; i += 4) {
        for (int64_t j = i; j < p; j += 4) dot_block(tile.data(), per, p, i, j, acc.data());
      }
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) out[i * r + j] = j >= i ? acc[i * p + j] : acc[j * p + i];
  }
}

const bool kHasAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") && std::getenv("SVDFUSE_NO_AVX512") == nullptr;
}();
#else
constexpr bool kHasAvx512 = false;
template <typename T>
void gram_one_avx512(const T*, int64_t, int64_t, bool, double*, std::vector<double>&, std::vector<double>&) {}
#endif

// out (r × r) = xᵀx or x xᵀ, by the widest build the CPU runs.
template <typename T>
void gram_one(const T* x, int64_t a, int64_t b, bool left, double* out, std::vector<double>& tile, std::vector<double>& acc) {
  kHasAvx512 ? gram_one_avx512(x, a, b, left, out, tile, acc) : gram_one_portable(x, a, b, left, out, tile, acc);
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
    // Factors handed out one at a time from a shared counter, not split evenly up front: where
    // another job slows one thread, the others take its share (1000 bf16 factors 4096 × 16 with
    // one core busy, 2-core machine, 2026-12-07: left Gram 31.8 ms split evenly, 16.7 ms handed out;
    // 13.2 ms quiet).
    std::atomic<int64_t> next{0};
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(batch, at::get_num_threads()));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<double> tile, acc;
      for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < batch;) {
        gram_one(data + k * a * b, a, b, left, result + k * r * r, tile, acc);
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
