// preprocess.cu - fused, batched image preprocessing: Pillow-exact antialiased resize,
// center crop / pad, gray -> RGB, normalise, NCHW float32 / float16 / bfloat16 output.
//
// Build: part of libclipfast_kernels.so (top-level CMakeLists.txt). This file is compiled with
// --fmad=false: the coefficient arithmetic must round like Pillow's C code (no fused
// multiply-add), or the fixed-point weights can differ by one unit.
// Reference: clipfast/kernels/preprocess.py::preprocess_reference (numpy, same algorithm,
// itself checked against PIL.Image.resize in tests/test_kernels.py).
//
// Algorithm (Pillow's ImagingResample, libImaging/Resample.c, 8 bits per channel):
//   per axis, scale = in / out, filterscale = max(scale, 1), support = filter_support *
//   filterscale, ksize = 2 * ceil(support) + 1; output index i has center (i + 0.5) * scale,
//   taps xmin = int(center - support + 0.5) (clamped to 0) .. int(center + support + 0.5)
//   (clamped to in), weights filter((x - center + 0.5) / filterscale) normalised to sum 1,
//   then quantised to int32 with 22 fractional bits. Horizontal pass first (rounded and
//   clamped to uint8), then the vertical pass on those uint8 values, or the other way round
//   for images flagged CLIPFAST_VERTICAL_FIRST (Pillow >= 13's rule, decided in Python); a
//   pass whose size does not change is skipped. Integer accumulation is exact, so this kernel
//   reproduces Pillow bit for bit wherever the double-precision weights round the same way
//   (all of bilinear, bicubic, box; hamming / lanczos use the GPU's sin / cos, within 2 ulp of
//   glibc's).
//
// Launches, both on the caller's stream, over the whole batch:
//   1. coeff_kernel: one thread per (image, visible output column or row): bounds + weights
//      into a workspace (cudaMallocAsync), only for the columns / rows the crop keeps.
//   2. resample_kernel: one block per (image, 32 x 32 output tile). The block walks the
//      source rows its tile needs in chunks of kChunkRows: the horizontal pass writes a
//      chunk of uint8 values to shared memory, then each thread adds the chunk's rows to the
//      vertical sums of its 4 output pixels (vertical-first images: source columns, mirror
//      image). Shared memory stays at 32 * 32 * 3 bytes whatever the downscaling factor;
//      padded pixels get the fill value.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "preprocess_kernels.cuh"

namespace clipfast {
namespace {

using namespace preprocess_detail;

template <typename OutT>
void launch_resample(const uint8_t* src, const ImagePlan* plans, const int32_t* coefs,
                     const clipfast_preprocess_params& prm, int n, void* out,
                     cudaStream_t stream) {
  const int tiles_x = (prm.out_w + kTile - 1) / kTile;
  const int tiles_y = (prm.out_h + kTile - 1) / kTile;
  const dim3 grid(tiles_x * tiles_y, n);
  resample_kernel<OutT><<<grid, kThreads, 0, stream>>>(src, plans, coefs, prm, tiles_x,
                                                       static_cast<OutT*>(out));
}

bool pools_supported() {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return value != 0;
}

}  // namespace
}  // namespace clipfast

extern "C" int clipfast_preprocess(const uint8_t* src, int64_t src_bytes,
                                   const clipfast_image_desc* images, int32_t n,
                                   const clipfast_preprocess_params* params, void* out,
                                   void* stream_ptr) {
  using namespace clipfast;
  using namespace clipfast::preprocess_detail;
  clear_error();
  if (int rc = check_params(params)) return rc;
  if (n < 1 || n > 65535) return fail(CLIPFAST_EINVAL, "n must be in 1..65535, got %d", n);
  if (images == nullptr) return fail(CLIPFAST_EINVAL, "images must not be NULL");
  if (src == nullptr || out == nullptr)
    return fail(CLIPFAST_EINVAL, "src and out must be device pointers, got NULL");
  if (src_bytes < 1) return fail(CLIPFAST_EINVAL, "src_bytes must be >= 1, got %lld",
                                 (long long)src_bytes);
  const clipfast_preprocess_params& prm = *params;

  // Plans and workspace layout: [plans | coefficient entries (int32)].
  std::vector<ImagePlan> plans;
  int64_t coef_words = 0;
  int max_entries = 1;
  if (int rc = build_plans(images, n, src_bytes, prm, &plans, &coef_words, &max_entries))
    return rc;

  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t plan_bytes = sizeof(ImagePlan) * (size_t)n;
  const size_t ws_bytes = plan_bytes + sizeof(int32_t) * (size_t)std::max<int64_t>(coef_words, 1);
  const bool async_alloc = pools_supported();
  void* ws = nullptr;
  if (async_alloc) {
    CLIPFAST_CUDA_CHECK(cudaMallocAsync(&ws, ws_bytes, stream));
  } else {
    CLIPFAST_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
  }
  ImagePlan* d_plans = static_cast<ImagePlan*>(ws);
  int32_t* d_coefs = reinterpret_cast<int32_t*>(static_cast<char*>(ws) + plan_bytes);

  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `plans` may die.
  cudaError_t err = cudaMemcpyAsync(d_plans, plans.data(), plan_bytes, cudaMemcpyHostToDevice,
                                    stream);
  if (err == cudaSuccess) {
    const dim3 cgrid((max_entries + 127) / 128, n);
    coeff_kernel<<<cgrid, 128, 0, stream>>>(d_plans, prm.filter, d_coefs);
    switch (prm.out_dtype) {
      case CLIPFAST_DTYPE_FLOAT16:
        launch_resample<__half>(src, d_plans, d_coefs, prm, n, out, stream);
        break;
      case CLIPFAST_DTYPE_BFLOAT16:
        launch_resample<__nv_bfloat16>(src, d_plans, d_coefs, prm, n, out, stream);
        break;
      default:
        launch_resample<float>(src, d_plans, d_coefs, prm, n, out, stream);
    }
    err = cudaGetLastError();
  }
  // Freed in stream order after the kernels; the synchronous fallback waits for them first.
  cudaError_t free_err;
  if (async_alloc) {
    free_err = cudaFreeAsync(ws, stream);
  } else {
    free_err = cudaStreamSynchronize(stream);
    cudaFree(ws);
  }
  if (err != cudaSuccess) return cuda_fail(err, "preprocess kernel launch");
  if (free_err != cudaSuccess) return cuda_fail(free_err, "preprocess workspace release");
  return CLIPFAST_OK;
}
