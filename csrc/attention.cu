// attention.cu - fused short-sequence attention for CLIP towers:
//   out = softmax(scale * q k^T [+ causal mask]) v
// q, k, v, out: contiguous (batch, heads, tokens, head_dim), fp16 or bf16; head_dim 64, 80, 128;
// fp32 scores, running max subtraction, fp32 row sums and output accumulation.
//
// Build: part of libclipfast_kernels.so (top-level CMakeLists.txt), sm_80+ (WMMA bf16).
// Reference: clipfast/kernels/attention.py::attention_reference (numpy, float64) and
// attention_torch_reference; tolerance in tests/test_kernels.py (flash-attention's rule: error
// against the fp32 reference at most 2x that of PyTorch's own fp16 / bf16 SDPA).
//
// Work split: one block of 4 warps per (query tile of 64 rows, head, batch); each warp owns 16
// query rows. Per 64-column K/V tile: S = Q K^T on tensor cores (WMMA 16x16x16, fp32
// accumulate) into shared memory; each lane pair takes one row: scale, mask, online softmax
// (running max m, running sum l, rescale factor alpha = exp(m_old - m_new)); P is rounded to
// the input dtype (as flash-attention does) and O (fp32, shared memory) = alpha * O + P V.
//
// Two paths, chosen on the host from the device's opt-in shared memory (see smem_bytes()):
//   RESIDENT: all of K and V of the (batch, head) are copied to shared memory once, then the
//     warps sweep them without further block barriers.
//   TILED: K / V stream through one 64-row shared-memory tile (barrier per tile); any length.
// Shared memory = max(Q tile, S/P) + 2 * kv_rows * (D + 8) * 2 + O, with kv_rows = tokens
// rounded up to 64 (RESIDENT) or 64 (TILED). 577 tokens x 128 x 2 bytes x 2 (K and V) is 295 KB,
// more than any GPU's 227 KB, so long sequences at large head_dim always tile. Resident when:
//   head_dim   H100/H200 (227 KB)   A100 (163 KB)   RTX 30xx/40xx, L4, L40 (99 KB)
//   64         tokens <= 640        <= 448          <= 192
//   80         tokens <= 512        <= 320          <= 128
//   128        tokens <= 320        <= 192          <= 64
// so on H100 ViT-L/14@336 (577 tokens, D 64) is resident, ViT-H/14 (257, D 80) resident,
// and 577 tokens at D 80 / 128 tile. clipfast_attention_path() reports the choice.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention_kernels.cuh"
#include "common.h"

namespace clipfast {
namespace {

using namespace attention_detail;

// Path for (tokens, head_dim) on the current device (see pick_path).
int choose_path(int tokens, int head_dim, int* path, size_t* smem) {
  *path = 0;
  int optin = 0;
  if (head_dim == 64 || head_dim == 80 || head_dim == 128) {
    if (int rc = max_smem_optin(&optin)) return rc;
  }
  return pick_path(tokens, head_dim, optin, path, smem);
}

template <typename T, int D, bool RESIDENT>
int launch(const void* q, const void* k, const void* v, void* out, int batch, int heads,
           int tokens, float scale_log2, int causal, size_t smem, cudaStream_t stream) {
  auto kernel = attention_kernel<T, D, RESIDENT>;
  CLIPFAST_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid((tokens + kBr - 1) / kBr, heads, batch);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<T*>(out),
                                           heads, tokens, scale_log2, causal);
  CLIPFAST_CUDA_CHECK(cudaGetLastError());
  return CLIPFAST_OK;
}

template <typename T>
int dispatch(int path, int head_dim, const void* q, const void* k, const void* v, void* out,
             int batch, int heads, int tokens, float scale_log2, int causal, size_t smem,
             cudaStream_t stream) {
#define CLIPFAST_ATTN_CASE(D)                                                                  \
  case D:                                                                                      \
    return path == 1 ? launch<T, D, true>(q, k, v, out, batch, heads, tokens, scale_log2,     \
                                          causal, smem, stream)                               \
                     : launch<T, D, false>(q, k, v, out, batch, heads, tokens, scale_log2,    \
                                           causal, smem, stream);
  switch (head_dim) {
    CLIPFAST_ATTN_CASE(64)
    CLIPFAST_ATTN_CASE(80)
    CLIPFAST_ATTN_CASE(128)
    default:
      return fail(CLIPFAST_EINVAL, "head_dim must be one of 64, 80, 128, got %d", head_dim);
  }
#undef CLIPFAST_ATTN_CASE
}

bool overlaps(const void* a, const void* b, size_t bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a);
  const auto y = reinterpret_cast<uintptr_t>(b);
  return x < y + bytes && y < x + bytes;
}

}  // namespace
}  // namespace clipfast

extern "C" int clipfast_attention_path(int32_t tokens, int32_t head_dim) {
  clipfast::clear_error();
  size_t smem = 0;
  int path = 0;
  clipfast::choose_path(tokens, head_dim, &path, &smem);
  return path;
}

extern "C" int clipfast_attention(const void* q, const void* k, const void* v, void* out,
                                  int32_t batch, int32_t heads, int32_t tokens,
                                  int32_t head_dim, int32_t dtype, float scale, int32_t causal,
                                  void* stream) {
  using namespace clipfast;
  clear_error();
  if (!q || !k || !v || !out)
    return fail(CLIPFAST_EINVAL, "q, k, v and out must be device pointers, got NULL");
  if (dtype != CLIPFAST_DTYPE_FLOAT16 && dtype != CLIPFAST_DTYPE_BFLOAT16)
    return fail(CLIPFAST_EINVAL, "dtype must be FLOAT16=1 or BFLOAT16=2, got %d", dtype);
  if (batch < 1 || batch > 65535 || heads < 1 || heads > 65535)
    return fail(CLIPFAST_EINVAL, "batch and heads must be in 1..65535, got %d and %d", batch,
                heads);
  if (!std::isfinite(scale))
    return fail(CLIPFAST_EINVAL, "scale must be finite, got %g", scale);
  const void* ptrs[4] = {q, k, v, out};
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i) {
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0)
      return fail(CLIPFAST_EINVAL,
                  "%s must be 16-byte aligned (a contiguous tensor's storage), got %p", names[i],
                  ptrs[i]);
  }
  size_t smem = 0;
  int path = 0;
  if (int rc = choose_path(tokens, head_dim, &path, &smem)) return rc;
  const size_t bytes = (size_t)batch * heads * tokens * head_dim * 2;
  if (overlaps(out, q, bytes) || overlaps(out, k, bytes) || overlaps(out, v, bytes))
    return fail(CLIPFAST_EINVAL, "out must not overlap q, k or v (inputs are __restrict__)");
  // Scores are computed in log2 units so the softmax uses exp2f.
  const float scale_log2 = (float)((double)scale * 1.4426950408889634);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == CLIPFAST_DTYPE_FLOAT16)
    return dispatch<__half>(path, head_dim, q, k, v, out, batch, heads, tokens, scale_log2,
                            causal != 0, smem, s);
  return dispatch<__nv_bfloat16>(path, head_dim, q, k, v, out, batch, heads, tokens,
                                 scale_log2, causal != 0, smem, s);
}
