// attention_kernels.cuh - device code of the fused attention (see attention.cu for the design
// and the path table). Kept in a header so that csrc/emu/ can compile the same kernel for a
// CPU emulation test (tests/test_kernels.py, marked `build`).
#ifndef CLIPFAST_ATTENTION_KERNELS_CUH_
#define CLIPFAST_ATTENTION_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef CLIPFAST_CPU_EMULATION
#include <mma.h>
// The CPU emulator (csrc/emu/cuda_emu.h) defines its own.
#define CLIPFAST_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cmath>
#include <cstdint>

#include "common.h"

namespace clipfast {
namespace attention_detail {

using namespace nvcuda;

constexpr int kBr = 64;       // query rows per block
constexpr int kBc = 64;       // K / V rows per tile
constexpr int kWarps = 4;     // 16 query rows each
constexpr int kThreads = kWarps * 32;
constexpr int kLds = kBc + 4;  // fp32 S row stride (floats), padded against bank conflicts
constexpr int kLdp = kBc + 8;  // P row stride (elements); P aliases S
constexpr int kMaxTokens = 4096;

__host__ __device__ constexpr int ld_half(int d) { return d + 8; }  // Q / K / V row stride
__host__ __device__ constexpr int ld_out(int d) { return d + 4; }   // fp32 O row stride

// Dynamic shared memory of one block; every region size is a multiple of 32 bytes, as WMMA
// needs 256-bit aligned fragment pointers.
__host__ __device__ constexpr size_t region0_bytes(int d) {
  // Q tile first (copied into registers), then reused for S (fp32) and P (aliasing S).
  return (size_t)kBr * ld_half(d) * 2 > (size_t)kWarps * 16 * kLds * 4
             ? (size_t)kBr * ld_half(d) * 2
             : (size_t)kWarps * 16 * kLds * 4;
}
__host__ __device__ constexpr size_t smem_bytes(int d, int kv_rows) {
  return region0_bytes(d) + 2 * (size_t)kv_rows * ld_half(d) * 2 +
         (size_t)kWarps * 16 * ld_out(d) * 4;
}

template <typename T>
struct Vec2;
template <>
struct Vec2<__half> {
  using type = __half2;
  static __device__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Vec2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// rows [row0, row0 + nrows) of a (tokens, D) matrix into shared memory with row stride
// ld_half(D); rows at or past `tokens` become zeros (masked later; zeros keep P V finite).
template <typename T, int D>
__device__ inline void load_rows(T* __restrict__ dst, const T* __restrict__ src, int row0,
                                 int nrows, int tokens) {
  constexpr int kVecs = D / 8;  // 16-byte vectors per row
  for (int i = threadIdx.x; i < nrows * kVecs; i += kThreads) {
    const int r = i / kVecs;
    const int c = (i % kVecs) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < tokens)
      val = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + (size_t)r * ld_half(D) + c) = val;
  }
}

template <typename T, int D, bool RESIDENT>
__global__ void __launch_bounds__(kThreads)
attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 T* __restrict__ out, int heads, int tokens, float scale_log2, int causal) {
  constexpr int kLdh = ld_half(D);
  constexpr int kLdo = ld_out(D);
  constexpr int kKSteps = D / 16;  // WMMA k-steps over head_dim for S, n-tiles for O
  CLIPFAST_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem);
  float* ss = reinterpret_cast<float*>(smem);  // after Q is in registers
  T* ks = reinterpret_cast<T*>(smem + region0_bytes(D));
  const int kv_rows = RESIDENT ? (tokens + kBc - 1) / kBc * kBc : kBc;
  T* vs = ks + (size_t)kv_rows * kLdh;
  float* os = reinterpret_cast<float*>(vs + (size_t)kv_rows * kLdh);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * kBr;
  const size_t head_off = ((size_t)blockIdx.z * heads + blockIdx.y) * tokens * D;
  const T* qg = q + head_off;
  const T* kg = k + head_off;
  const T* vg = v + head_off;

  // Causal: K/V tiles past this query tile's last row are fully masked; skip them.
  const int all_tiles = (tokens + kBc - 1) / kBc;
  const int n_tiles = causal ? min(all_tiles, (int)blockIdx.x + 1) : all_tiles;

  load_rows<T, D>(qs, qg, q0, kBr, tokens);
  if (RESIDENT) {
    load_rows<T, D>(ks, kg, 0, n_tiles * kBc, tokens);
    load_rows<T, D>(vs, vg, 0, n_tiles * kBc, tokens);
  }
  for (int i = threadIdx.x; i < kWarps * 16 * kLdo; i += kThreads) os[i] = 0.0f;
  __syncthreads();

  const bool warp_active = q0 + warp * 16 < tokens;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kKSteps];
  if (warp_active) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      wmma::load_matrix_sync(qf[kk], qs + (size_t)warp * 16 * kLdh + kk * 16, kLdh);
  }
  __syncthreads();  // region 0 becomes S / P

  float* sw = ss + (size_t)warp * 16 * kLds;
  T* pw = reinterpret_cast<T*>(sw);
  float* ow = os + (size_t)warp * 16 * kLdo;
  const int row = lane >> 1;   // row of this warp's 16 handled by the lane pair
  const int half = lane & 1;   // which half of the columns
  const int qrow = q0 + warp * 16 + row;
  float m_i = -INFINITY;       // running max of scaled scores (log2 units), same in both lanes
  float l_i = 0.0f;            // running sum of exp2(s - m_i)

  for (int j = 0; j < n_tiles; ++j) {
    const T* kt;
    const T* vt;
    if (RESIDENT) {
      kt = ks + (size_t)j * kBc * kLdh;
      vt = vs + (size_t)j * kBc * kLdh;
    } else {
      __syncthreads();  // every warp is done with the previous tile
      load_rows<T, D>(ks, kg, j * kBc, kBc, tokens);
      load_rows<T, D>(vs, vg, j * kBc, kBc, tokens);
      __syncthreads();
      kt = ks;
      vt = vs;
    }
    if (!warp_active) continue;

    // S = Q K^T for 16 rows x 64 columns. K row-major (tokens, D) is K^T column-major.
#pragma unroll
    for (int n = 0; n < kBc / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, kt + (size_t)n * 16 * kLdh + kk * 16, kLdh);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(sw + n * 16, sf, kLds, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on (row, 32 columns); the lane pair combines through one shuffle.
    float s[32];
    float tile_max = -INFINITY;
    const int col0 = j * kBc + half * 32;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = col0 + c;
      float x = sw[row * kLds + half * 32 + c] * scale_log2;
      if (col >= tokens || (causal && col > qrow)) x = -INFINITY;
      s[c] = x;
      tile_max = fmaxf(tile_max, x);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_i, tile_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // fully masked row: keep finite
    const float alpha = exp2f(m_i - m_use);
    __syncwarp();  // all of S read: P may overwrite it
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 32; c += 2) {
      const float p0 = exp2f(s[c] - m_use);
      const float p1 = exp2f(s[c + 1] - m_use);
      sum += p0 + p1;
      *reinterpret_cast<typename Vec2<T>::type*>(pw + row * kLdp + half * 32 + c) =
          Vec2<T>::make(p0, p1);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
#pragma unroll
    for (int c = 0; c < D / 2; ++c) ow[row * kLdo + half * (D / 2) + c] *= alpha;
    __syncwarp();

    // O += P V: (16 x 64) x (64 x D), accumulating into the fp32 O kept in shared memory.
#pragma unroll
    for (int n = 0; n < kKSteps; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(of, ow + n * 16, kLdo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, pw + kk * 16, kLdp);
        wmma::load_matrix_sync(vf, vt + (size_t)kk * 16 * kLdh + n * 16, kLdh);
        wmma::mma_sync(of, pf, vf, of);
      }
      wmma::store_matrix_sync(ow + n * 16, of, kLdo, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (!warp_active || qrow >= tokens) return;
  const float inv_l = 1.0f / l_i;  // l_i >= 1: the row max contributes exp2(0)
  T* og = out + head_off + (size_t)qrow * D + half * (D / 2);
  const float* orow = ow + row * kLdo + half * (D / 2);
#pragma unroll
  for (int c = 0; c < D / 2; c += 2) {
    *reinterpret_cast<typename Vec2<T>::type*>(og + c) =
        Vec2<T>::make(orow[c] * inv_l, orow[c + 1] * inv_l);
  }
}

// Pure path choice for (tokens, head_dim) given the opt-in shared memory per block:
// *path = 1 (resident) or 2 (tiled), *smem = dynamic shared memory bytes to request.
inline int pick_path(int tokens, int head_dim, int optin, int* path, size_t* smem) {
  *path = 0;
  if (head_dim != 64 && head_dim != 80 && head_dim != 128)
    return fail(CLIPFAST_EINVAL, "head_dim must be one of 64, 80, 128, got %d", head_dim);
  if (tokens < 1 || tokens > kMaxTokens)
    return fail(CLIPFAST_EINVAL, "tokens must be in 1..%d (short-sequence kernel), got %d",
                kMaxTokens, tokens);
  const int kv_rows = (tokens + kBc - 1) / kBc * kBc;
  const size_t resident = smem_bytes(head_dim, kv_rows);
  const size_t tiled = smem_bytes(head_dim, kBc);
  if (resident <= (size_t)optin) {
    *path = 1;
    *smem = resident;
  } else if (tiled <= (size_t)optin) {
    *path = 2;
    *smem = tiled;
  } else {
    return fail(CLIPFAST_EUNSUPPORTED,
                "this GPU allows %d bytes of shared memory per block; head_dim %d needs %zu",
                optin, head_dim, tiled);
  }
  return CLIPFAST_OK;
}

}  // namespace attention_detail
}  // namespace clipfast

#endif  // CLIPFAST_ATTENTION_KERNELS_CUH_
