// CUDA kernels of torch.ops.svdfuse.lowrank_matmul: y = x Wbᵀ + ((x V) ⊙ σ) Uᵀ + bias.
//
// Two paths, chosen per call by the rows of x (its leading dims flattened):
// * Decode (rows <= kFusedMaxRows; fp32/bf16/fp16; 1 <= K <= kFusedMaxRank; not under
//   torch.use_deterministic_algorithms): one cooperative kernel.
//   The op is memory-bound there: the floor is reading U and V (and W0) once, and a GEMM pair spends
//   more on two launches and a round trip of the tiny (rows, K) intermediate than on the bytes.
//   Phase 1: every block multiplies its slice of x's columns by its slice of V's rows and adds the
//   partial x V into an fp32 workspace (rows, K) with one atomic per entry per block. Grid-wide sync.
//   Phase 2: every block stages t = (x V) ⊙ σ in shared memory; each warp then produces a few output
//   columns y[:, i], streaming U's rows i (and W0's rows i, for the dense term).
// * Everything else (more rows, fp64, larger K): cuBLAS GEMMs in the storage dtype, fp32
//   accumulation inside cuBLAS, with σ applied to the (rows, K) intermediate by one small kernel:
//   the launches of plain torch `((x @ V) * S) @ U.T`, so it costs about the same.
// Per-request σ (S (num_tasks, K), task (rows,)) only changes where σ is read, in both paths.
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "lowrank_matmul.h"

namespace svdfuse {

namespace {

// Up to 16 rows (decode and small speculative batches) the fused pass reads U and V once for all
// rows; beyond that the (rows, K) work grows and cuBLAS's tensor-core tiles win, and the per-row
// accumulators (kFusedMaxRows x 16 bytes of one V row per thread) would no longer fit in registers.
constexpr int kFusedMaxRows = 16;
// Rows of a single request (1-4) get a kernel with 4 accumulator rows: fewer registers, more warps
// per SM, more loads in flight.
constexpr int kFusedFewRows = 4;
// Phase 2 keeps t (rows, K) in fp32 shared memory of every block: 16 x 512 x 4 B = 32 KiB fits the
// 48 KiB a launch gets without opt-in, and one thread per 16-byte chunk of a V row fits a block.
constexpr int kFusedMaxRank = 512;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Columns of x staged in shared memory per step of phase 1.
constexpr int kTileN = 256;
// V rows a thread loads before using them, and output columns a warp computes together in phase 2:
// independent 16-byte loads in flight per thread, which a memory-bound kernel needs to reach HBM
// bandwidth at one or two blocks per SM.
constexpr int kVRowsInFlight = 4;
constexpr int kOutColsPerWarp = 4;

// Elements of T in one 128-bit load.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// The most dynamic shared memory a fused launch for up to MAX_ROWS rows asks for: phase 1 holds the
// x tile and the lanes' partial sums (at most kThreads chunks of kVec floats), phase 2 holds t.
template <typename T, int MAX_ROWS>
constexpr size_t kFusedMaxSmemBytes =
    sizeof(float) * std::max(MAX_ROWS * kTileN + kThreads * kVec<T>, MAX_ROWS * kFusedMaxRank);

// What the indexing below relies on, so that a retuned constant fails here rather than on the GPU.
static_assert(kFusedMaxRows <= 32, "phase 2: lane r of a warp writes row r");
static_assert(kFusedMaxRank <= kThreads * kVec<float>, "phase 1: one thread per 16-byte chunk of a V row");
static_assert(kThreads % 32 == 0, "whole warps");

// p[0, valid) as floats, zeros beyond. One 128-bit load where the chunk is full and aligned (every
// chunk of an aligned shape); for bf16/fp16, two 64-bit loads where it is 8-byte aligned (every
// other row when K = 4 mod 8, as the paper's K = 76); element loads otherwise (odd K or n, where
// rows start unaligned). Not for fp32, where the extra path made ptxas spill at 16 rows.
template <typename T>
__device__ __forceinline__ void load_floats(const T* p, int valid, float (&out)[kVec<T>]) {
  if (valid == kVec<T> && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int q = 0; q < kVec<T>; ++q) {
      out[q] = static_cast<float>(e[q]);
    }
    return;
  }
  if constexpr (sizeof(T) == 2) {
    if (valid == kVec<T> && reinterpret_cast<uintptr_t>(p) % 8 == 0) {
      const uint2 raw[2] = {__ldg(reinterpret_cast<const uint2*>(p)), __ldg(reinterpret_cast<const uint2*>(p) + 1)};
      const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int q = 0; q < kVec<T>; ++q) {
        out[q] = static_cast<float>(e[q]);
      }
      return;
    }
  }
#pragma unroll
  for (int q = 0; q < kVec<T>; ++q) {
    out[q] = q < valid ? static_cast<float>(p[q]) : 0.f;
  }
}

// p[0, N) from shared memory in 16-byte reads (p is 16-byte aligned). The lanes of a warp read
// chunks N floats apart; element reads at that stride would conflict N/4 times more on the banks.
template <int N>
__device__ __forceinline__ void load_shared(const float* p, float (&out)[N]) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int h = 0; h < N / 4; ++h) {
    const float4 v = reinterpret_cast<const float4*>(p)[h];
    out[4 * h] = v.x;
    out[4 * h + 1] = v.y;
    out[4 * h + 2] = v.z;
    out[4 * h + 3] = v.w;
  }
}

// σ[k] of row r: row task[r] of S, row 0 without task. A bad id is never read: its row gets NaN, so
// the error shows in the output instead of passing silently (a host-side check would need a sync).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t sigma_of(const T* S, const int64_t* task, int64_t num_tasks, int64_t r, int64_t k,
                                          int64_t K) {
  const int64_t id = task ? task[r] : 0;
  return id >= 0 && id < num_tasks ? static_cast<acc_t>(S[id * K + k]) : static_cast<acc_t>(NAN);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// An attribute of the current GPU. Read directly rather than through ATen/cuda/CUDAContext.h, whose
// headers need cuBLAS and cuSPARSE headers that a minimal CUDA toolkit lacks.
int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// An int per GPU, queried on first use and remembered: device attributes and the occupancy
// calculator cost host microseconds per query, about the whole budget of a decode call (DESIGN.md
// §4 L1). A query that throws is retried on the next call.
class PerDevice {
 public:
  template <typename Query>
  int get(Query query) {
    const c10::DeviceIndex device = c10::cuda::current_device();
    std::call_once(once_.at(device), [&] { value_[device] = query(); });
    return value_[device];
  }

 private:
  std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once_;
  std::array<int, C10_COMPILE_TIME_MAX_GPUS> value_{};
};

int sm_count() {
  static PerDevice cache;
  return cache.get([] { return device_attribute(cudaDevAttrMultiProcessorCount); });
}

bool supports_cooperative_launch() {
  static PerDevice cache;
  return cache.get([] { return device_attribute(cudaDevAttrCooperativeLaunch); }) != 0;
}

template <typename T>
struct FusedArgs {
  const T* x;           // (rows, n)
  const T* U;           // (m, K)
  const T* S;           // (num_tasks, K)
  const T* V;           // (n, K)
  const T* base;        // (m, n) or null
  const T* bias;        // (m,) or null
  const int64_t* task;  // (rows,) or null
  float* xv;            // (rows, K), zeroed: x V, summed over the blocks
  T* y;                 // (rows, m)
  int rows, K;
  int kp;  // K padded to a whole 16-byte chunk: the row stride of the shared-memory buffers
  int64_t n, m, num_tasks;
};

// Phase 1: xv += x[:, slice] V[slice, :] for this block's slice of n. Thread t owns the 16-byte chunk
// c = t % chunks of a V row and walks the rows lane, lane + lanes, ... of each tile: a warp reads
// consecutive chunks (consecutive rows of V are contiguous), and V is read once by the whole grid.
template <typename T, int MAX_ROWS>
__device__ void accumulate_xv(const FusedArgs<T>& a, float* smem) {
  constexpr int VEC = kVec<T>;
  const int chunks = a.kp / VEC, lanes = kThreads / chunks;
  const int c = threadIdx.x % chunks, lane = threadIdx.x / chunks;
  const bool active = lane < lanes;  // kThreads need not be a multiple of chunks
  const int k0 = c * VEC, valid = min(VEC, a.K - k0);
  float* xs = smem;                          // (rows, kTileN): the x tile, in fp32
  float* partial = smem + a.rows * kTileN;   // (lanes, kp): each lane's sums for one row of x

  const int64_t per_block = at::ceil_div(a.n, static_cast<int64_t>(gridDim.x));
  const int64_t begin = blockIdx.x * per_block, end = std::min(a.n, begin + per_block);
  if (begin >= end) {
    return;  // the whole block: nothing to add
  }
  float acc[MAX_ROWS][VEC] = {};
  for (int64_t j0 = begin; j0 < end; j0 += kTileN) {
    const int width = static_cast<int>(std::min<int64_t>(kTileN, end - j0));
    __syncthreads();  // the previous tile is consumed
    for (int e = threadIdx.x; e < a.rows * width; e += kThreads) {
      const int r = e / width, j = e % width;
      xs[r * kTileN + j] = static_cast<float>(a.x[r * a.n + j0 + j]);
    }
    __syncthreads();
    if (!active) {
      continue;
    }
    for (int j = lane; j < width; j += lanes * kVRowsInFlight) {
      float v[kVRowsInFlight][VEC];
#pragma unroll
      for (int u = 0; u < kVRowsInFlight; ++u) {
        const int jj = j + u * lanes;
        load_floats(a.V + (j0 + std::min(jj, width - 1)) * a.K + k0, jj < width ? valid : 0, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kVRowsInFlight; ++u) {
        const int jj = j + u * lanes;
#pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r) {
          // xs past the tile's width is stale (or never written, possibly NaN), so it is not read.
          if (r < a.rows && jj < width) {
            const float xr = xs[r * kTileN + jj];
#pragma unroll
            for (int q = 0; q < VEC; ++q) {
              acc[r][q] += xr * v[u][q];
            }
          }
        }
      }
    }
  }
  // One row of x at a time: the lanes' sums meet in shared memory, then one atomic per (row, k)
  // per block; the grid's blocks meet in xv.
#pragma unroll
  for (int r = 0; r < MAX_ROWS; ++r) {
    if (r < a.rows) {
      __syncthreads();
      if (active) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          partial[lane * a.kp + k0 + q] = acc[r][q];
        }
      }
      __syncthreads();
      for (int k = threadIdx.x; k < a.K; k += kThreads) {
        float sum = 0.f;
        for (int l = 0; l < lanes; ++l) {
          sum += partial[l * a.kp + k];
        }
        atomicAdd(&a.xv[r * a.K + k], sum);
      }
    }
  }
}

// Phase 2: y[:, i] for kOutColsPerWarp output columns i per warp at a time: the rank-K dot products
// with U's rows i and, with a base, the length-n dot products with W0's rows i (x is read through
// the cache, once per kOutColsPerWarp columns). Lanes split K (and n); shuffles sum them.
template <typename T, int MAX_ROWS>
__device__ void write_outputs(const FusedArgs<T>& a, float* smem) {
  constexpr int VEC = kVec<T>;
  float* t = smem;  // (rows, kp): (x V) ⊙ σ in fp32, zero padding
  for (int e = threadIdx.x; e < a.rows * a.kp; e += kThreads) {
    const int r = e / a.kp, k = e % a.kp;
    // __ldcg: xv was written by other blocks' atomics, into L2; this SM's L1 is not coherent with it.
    t[e] = k < a.K ? __ldcg(&a.xv[r * a.K + k]) * sigma_of<float>(a.S, a.task, a.num_tasks, r, k, a.K) : 0.f;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * kOutColsPerWarp;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kOutColsPerWarp; i0 < a.m; i0 += stride) {
    float acc[kOutColsPerWarp][MAX_ROWS] = {};
    for (int k0 = lane * VEC; k0 < a.K; k0 += 32 * VEC) {
      float u[kOutColsPerWarp][VEC];
#pragma unroll
      for (int o = 0; o < kOutColsPerWarp; ++o) {
        const int64_t i = std::min(i0 + o, a.m - 1);
        load_floats(a.U + i * a.K + k0, i0 + o < a.m ? min(VEC, a.K - k0) : 0, u[o]);
      }
#pragma unroll
      for (int r = 0; r < MAX_ROWS; ++r) {
        if (r < a.rows) {
          float tr[VEC];
          load_shared(t + r * a.kp + k0, tr);  // k0 + VEC <= kp: padding is zero, like u there
#pragma unroll
          for (int q = 0; q < VEC; ++q) {
#pragma unroll
            for (int o = 0; o < kOutColsPerWarp; ++o) {
              acc[o][r] += u[o][q] * tr[q];
            }
          }
        }
      }
    }
    if (a.base) {
      for (int64_t j0 = lane * VEC; j0 < a.n; j0 += 32 * VEC) {
        const int valid = static_cast<int>(std::min<int64_t>(VEC, a.n - j0));
        float w[kOutColsPerWarp][VEC];
#pragma unroll
        for (int o = 0; o < kOutColsPerWarp; ++o) {
          const int64_t i = std::min(i0 + o, a.m - 1);
          load_floats(a.base + i * a.n + j0, i0 + o < a.m ? valid : 0, w[o]);
        }
#pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r) {
          if (r < a.rows) {
            float xr[VEC];
            load_floats(a.x + r * a.n + j0, valid, xr);
#pragma unroll
            for (int q = 0; q < VEC; ++q) {
#pragma unroll
              for (int o = 0; o < kOutColsPerWarp; ++o) {
                acc[o][r] += w[o][q] * xr[q];
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int o = 0; o < kOutColsPerWarp; ++o) {
      const int64_t i = i0 + o;
      const float b = a.bias && i < a.m ? static_cast<float>(a.bias[i]) : 0.f;
#pragma unroll
      for (int r = 0; r < MAX_ROWS; ++r) {
        if (r < a.rows) {
          const float sum = warp_sum(acc[o][r]);
          if (lane == r && i < a.m) {  // rows <= kFusedMaxRows < 32: lane r writes row r
            a.y[r * a.m + i] = static_cast<T>(sum + b);
          }
        }
      }
    }
  }
}

template <typename T, int MAX_ROWS>
__global__ void __launch_bounds__(kThreads) fused_lowrank_matmul_kernel(FusedArgs<T> a) {
  extern __shared__ __align__(16) float smem[];
  accumulate_xv<T, MAX_ROWS>(a, smem);
  cooperative_groups::this_grid().sync();  // xv is complete; also orders the reuse of smem
  write_outputs<T, MAX_ROWS>(a, smem);
}

template <typename T, int MAX_ROWS>
void launch_fused(FusedArgs<T> a, cudaStream_t stream) {
  constexpr size_t max_smem_bytes = kFusedMaxSmemBytes<T, MAX_ROWS>;
  static_assert(max_smem_bytes <= 48 * 1024,
                "above the 48 KiB a launch gets without cudaFuncAttributeMaxDynamicSharedMemorySize");
  const auto kernel = fused_lowrank_matmul_kernel<T, MAX_ROWS>;
  const int lanes = kThreads / (a.kp / kVec<T>);
  const size_t smem_bytes = sizeof(float) * std::max(a.rows * kTileN + lanes * a.kp, a.rows * a.kp);
  TORCH_INTERNAL_ASSERT(smem_bytes <= max_smem_bytes);
  // Blocks per SM at the largest shared memory this kernel is launched with, once per device: a
  // lower bound for every launch (occupancy only falls as shared memory grows), so the grid below
  // is always co-resident. Registers, not shared memory, are what limit it (ptxas: 60-196).
  static PerDevice blocks_per_sm;
  const int per_sm = blocks_per_sm.get([&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, max_smem_bytes));
    return blocks;
  });
  TORCH_INTERNAL_ASSERT(per_sm > 0, "lowrank_matmul: the fused kernel fits no SM");
  // A grid-wide sync needs every block resident at once; within that, one block per kTileN columns of x
  // or per kWarps * kOutColsPerWarp output columns, whichever needs more.
  const int64_t resident = static_cast<int64_t>(per_sm) * sm_count();
  const int64_t wanted = std::max(at::ceil_div(a.n, static_cast<int64_t>(kTileN)),
                                  at::ceil_div(a.m, static_cast<int64_t>(kWarps * kOutColsPerWarp)));
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>(wanted, 1, resident)));
  void* args[] = {&a};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kThreads), args,
                                             smem_bytes, stream));
}

template <typename T>
void run_fused(const at::Tensor& x2, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
               const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& task, const at::Tensor& xv, const at::Tensor& y) {
  const int K = static_cast<int>(U.size(1));
  const FusedArgs<T> a{x2.data_ptr<T>(),
                       U.data_ptr<T>(),
                       S.data_ptr<T>(),
                       V.data_ptr<T>(),
                       base ? base->data_ptr<T>() : nullptr,
                       bias ? bias->data_ptr<T>() : nullptr,
                       task ? task->data_ptr<int64_t>() : nullptr,
                       xv.data_ptr<float>(),
                       y.data_ptr<T>(),
                       static_cast<int>(x2.size(0)),
                       K,
                       static_cast<int>(at::ceil_div(K, kVec<T>) * kVec<T>),
                       x2.size(1),
                       U.size(0),
                       S.dim() == 2 ? S.size(0) : 1};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.rows <= kFusedFewRows) {
    launch_fused<T, kFusedFewRows>(a, stream);
  } else {
    launch_fused<T, kFusedMaxRows>(a, stream);
  }
}

bool fused_fits(const at::Tensor& x, int64_t rows, int64_t K) {
  const auto dtype = x.scalar_type();
  return rows <= kFusedMaxRows && K >= 1 && K <= kFusedMaxRank &&
         (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && supports_cooperative_launch() &&
         // Phase 1 sums the blocks' partial x V with atomics, in an order that varies run to run;
         // cuBLAS gives the same bits every run.
         !at::globalContext().deterministicAlgorithms();
}

at::Tensor fused_lowrank_matmul(const at::Tensor& x2, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& task) {
  // Zeroed by a memset on the kernel's stream rather than at::zeros, whose fill kernel costs
  // several host microseconds more of dispatch (DESIGN.md §4 L1).
  const at::Tensor xv = at::empty({x2.size(0), U.size(1)}, x2.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cudaMemsetAsync(xv.data_ptr(), 0, xv.nbytes(), c10::cuda::getCurrentCUDAStream()));
  const at::Tensor y = at::empty({x2.size(0), U.size(0)}, x2.options());
  if (x2.scalar_type() == at::kFloat) {
    run_fused<float>(x2, U, S, V, base, bias, task, xv, y);
  } else if (x2.scalar_type() == at::kHalf) {
    run_fused<at::Half>(x2, U, S, V, base, bias, task, xv, y);
  } else {
    run_fused<at::BFloat16>(x2, U, S, V, base, bias, task, xv, y);
  }
  return y;
}

// t (rows, K) *= σ of each row, in place; the product is formed in the op-math dtype (fp32 for
// bf16/fp16) and rounded once.
template <typename T>
__global__ void scale_by_sigma_kernel(T* t, const T* S, const int64_t* task, int64_t num_tasks, int64_t rows,
                                      int64_t K) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = rows * K;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    t[e] = static_cast<T>(static_cast<acc_t>(t[e]) * sigma_of<acc_t>(S, task, num_tasks, e / K, e % K, K));
  }
}

void scale_by_sigma(const at::Tensor& t, const at::Tensor& S, const std::optional<at::Tensor>& task) {
  const int64_t total = t.numel();
  if (total == 0) {
    return;
  }
  // Grid-stride: a few blocks per SM cover any size.
  const int64_t blocks = std::min<int64_t>(at::ceil_div(total, static_cast<int64_t>(kThreads)),
                                           8 * static_cast<int64_t>(sm_count()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lowrank_matmul_scale_by_sigma", [&] {
    scale_by_sigma_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(), task ? task->data_ptr<int64_t>() : nullptr,
        S.dim() == 2 ? S.size(0) : 1, t.size(0), t.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// cuBLAS in the storage dtype: fp32 accumulation inside (bf16/fp16; torch's reduced-precision
// reduction setting applies to fp16, as for plain torch matmuls), bias fused into the GEMM as addmm's
// input, the dense term accumulated onto y by a second addmm.
at::Tensor gemm_lowrank_matmul(const at::Tensor& x2, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& task) {
  const at::Tensor t = at::mm(x2, V);
  scale_by_sigma(t, S, task);
  at::Tensor y = bias ? at::addmm(*bias, t, U.t()) : at::mm(t, U.t());
  if (base) {
    y.addmm_(x2, base->t());
  }
  return y;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

at::Tensor lowrank_matmul_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& task) {
  check_lowrank_matmul(x, U, S, V, base, bias, task);
  // Allocations, streams and cuBLAS handles follow x's GPU, not whichever GPU happens to be current.
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = rows_of(x), m = U.size(0), K = U.size(1);
  if (rows == 0 || m == 0) {
    return at::empty(output_shape(x, m), x.options());
  }
  // The kernels index plain row-major arrays.
  const at::Tensor x2 = x.reshape({rows, V.size(0)}).contiguous();
  const std::optional<at::Tensor> task2 = task ? std::optional<at::Tensor>(task->reshape({rows}).contiguous())
                                               : std::nullopt;
  const auto run = fused_fits(x, rows, K) ? fused_lowrank_matmul : gemm_lowrank_matmul;
  return run(x2, U.contiguous(), S.contiguous(), V.contiguous(), contiguous(base), contiguous(bias), task2)
      .reshape(output_shape(x, m));
}

}  // namespace

}  // namespace svdfuse

TORCH_LIBRARY_IMPL(svdfuse, CUDA, m) {
  m.impl("lowrank_matmul", &svdfuse::lowrank_matmul_cuda);
}
