// preprocess_kernels.cuh - device code of the fused preprocessing (see preprocess.cu for the
// algorithm and the launch sequence). Kept in a header so that csrc/emu/ can compile the very
// same kernels for a CPU emulation test (tests/test_kernels.py, marked `build`).
#ifndef CLIPFAST_PREPROCESS_KERNELS_CUH_
#define CLIPFAST_PREPROCESS_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace clipfast {
namespace preprocess_detail {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS
constexpr int kTile = 32;                   // output tile is kTile x kTile
constexpr int kThreads = 256;               // 32 columns x 8 row groups
constexpr int kRowsPerThread = kTile / (kThreads / kTile);  // 4
constexpr int kChunkRows = 32;  // source rows (or columns) per shared-memory chunk
static_assert(kChunkRows == kTile, "the vertical-first path indexes chunk[tile row][column]");

// Per-image plan, built on the host, read by both kernels.
struct ImagePlan {
  int64_t src_offset;  // bytes
  int64_t coef_h;      // int32 index of the first horizontal entry in the workspace
  int64_t coef_v;      // int32 index of the first vertical entry
  int32_t h, w, c;     // source
  int32_t rh, rw;      // resized
  int32_t top, left;   // output (0, 0) is resized (top, left)
  int32_t y0, y1;      // visible resized rows [y0, y1) (empty when y1 <= y0)
  int32_t x0, x1;      // visible resized cols
  int32_t ksize_h, ksize_v;
  int32_t need_h, need_v;  // Pillow skips a pass whose size is unchanged
  int32_t vfirst;          // both passes, vertical first (CLIPFAST_VERTICAL_FIRST)
  int32_t pad_;
};

__host__ __device__ inline double filter_support(int filter) {
  switch (filter) {
    case CLIPFAST_FILTER_BOX: return 0.5;
    case CLIPFAST_FILTER_BILINEAR: return 1.0;
    case CLIPFAST_FILTER_HAMMING: return 1.0;
    case CLIPFAST_FILTER_BICUBIC: return 2.0;
    case CLIPFAST_FILTER_LANCZOS: return 3.0;
    default: return 0.0;
  }
}

__device__ inline double sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return sin(x) / x;
}

// Pillow's filters, same expressions in the same order (double precision).
__device__ inline double filter_weight(int filter, double x) {
  switch (filter) {
    case CLIPFAST_FILTER_BOX:
      return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
    case CLIPFAST_FILTER_BILINEAR:
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    case CLIPFAST_FILTER_HAMMING:
      if (x < 0.0) x = -x;
      if (x == 0.0) return 1.0;
      if (x >= 1.0) return 0.0;
      x = x * M_PI;
      return sin(x) / x * (0.54f + 0.46f * cos(x));
    case CLIPFAST_FILTER_BICUBIC: {
      const double a = -0.5;
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    }
    case CLIPFAST_FILTER_LANCZOS:
      return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
    default:
      return 0.0;
  }
}

__host__ __device__ inline int pillow_ksize(int in_size, int out_size, int filter) {
  double filterscale = (double)(float)in_size / out_size;
  if (filterscale < 1.0) filterscale = 1.0;
  const double support = filter_support(filter) * filterscale;
  return (int)ceil(support) * 2 + 1;
}

// Bounds and fixed-point weights of output index `i` along one axis (Pillow's
// precompute_coeffs + normalize_coeffs_8bpc). entry = [xmin, count, k_0 .. k_{ksize-1}].
__device__ inline void compute_entry(int in_size, int out_size, int i, int filter, int ksize,
                              int32_t* entry) {
  // in0 = 0, in1 = in_size: Pillow takes the box as float, so (in1 - in0) is a float.
  const double scale = (double)(float)in_size / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter_support(filter) * filterscale;
  const double center = 0.0 + (i + 0.5) * scale;
  const double ss = 1.0 / filterscale;
  int xmin = (int)(center - support + 0.5);
  if (xmin < 0) xmin = 0;
  int xmax = (int)(center + support + 0.5);
  if (xmax > in_size) xmax = in_size;
  xmax -= xmin;
  double ww = 0.0;
  for (int x = 0; x < xmax; ++x) ww += filter_weight(filter, (x + xmin - center + 0.5) * ss);
  for (int x = 0; x < ksize; ++x) {
    int32_t q = 0;
    if (x < xmax) {
      double w = filter_weight(filter, (x + xmin - center + 0.5) * ss);
      if (ww != 0.0) w /= ww;
      const double scaled = w * (1 << kPrecisionBits);
      q = (int32_t)(w < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    entry[2 + x] = q;
  }
  entry[0] = xmin;
  entry[1] = xmax;
}

__global__ void coeff_kernel(const ImagePlan* __restrict__ plans, int filter,
                             int32_t* __restrict__ coefs) {
  const ImagePlan p = plans[blockIdx.y];
  const int ncols = p.need_h ? max(p.x1 - p.x0, 0) : 0;
  const int nrows = p.need_v ? max(p.y1 - p.y0, 0) : 0;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < ncols) {
    compute_entry(p.w, p.rw, p.x0 + j, filter, p.ksize_h,
                  coefs + p.coef_h + (int64_t)j * (2 + p.ksize_h));
  } else if (j < ncols + nrows) {
    const int r = j - ncols;
    compute_entry(p.h, p.rh, p.y0 + r, filter, p.ksize_v,
                  coefs + p.coef_v + (int64_t)r * (2 + p.ksize_v));
  }
}

// Pillow's clip8: arithmetic shift (floor) then clamp to 0..255.
__device__ inline int clip8(int v) {
  const int s = v >> kPrecisionBits;
  return s < 0 ? 0 : (s > 255 ? 255 : s);
}

template <typename T>
__device__ inline T to_out(float x);
template <>
__device__ inline float to_out<float>(float x) { return x; }
template <>
__device__ inline __half to_out<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
resample_kernel(const uint8_t* __restrict__ src, const ImagePlan* __restrict__ plans,
                const int32_t* __restrict__ coefs, clipfast_preprocess_params prm,
                int tiles_x, OutT* __restrict__ out) {
  __shared__ float lut[3][256];
  __shared__ uint8_t chunk[kChunkRows][kTile][3];

  const ImagePlan p = plans[blockIdx.y];
  const int tid = threadIdx.x;
  const int tx = tid % kTile;
  const int ty = tid / kTile;
  const int ox0 = (blockIdx.x % tiles_x) * kTile;
  const int oy0 = (blockIdx.x / tiles_x) * kTile;

  // Normalisation table, same float32 steps as clipfast.preprocess._lut:
  // float32(double(x) * rescale), + offset, - mean, / std (no FMA: --fmad=false).
  for (int i = tid; i < 256; i += kThreads) {
    float x = (float)((double)i * prm.rescale);
    if (prm.offset != 0.0f) x = x + prm.offset;
    for (int c = 0; c < 3; ++c) lut[c][i] = (x - prm.mean[c]) / prm.std[c];
  }

  // Resized column of this thread and resized rows of its kRowsPerThread outputs.
  const int ox = ox0 + tx;
  const int rx = ox + p.left;
  const bool col_in = ox < prm.out_w && rx >= p.x0 && rx < p.x1;

  // Rows of the tile inside the visible window, in resized coordinates.
  const int ry_first = max(oy0 + p.top, p.y0);
  const int ry_last = min(min(oy0 + kTile, prm.out_h) + p.top, p.y1) - 1;
  const int rx_first = max(ox0 + p.left, p.x0);
  const int rx_last = min(min(ox0 + kTile, prm.out_w) + p.left, p.x1) - 1;
  const bool tile_has_pixels = ry_first <= ry_last && rx_first <= rx_last;

  const int32_t* vent[kRowsPerThread];
  int acc[kRowsPerThread][3];
  int direct[kRowsPerThread][3];  // need_v == false: the horizontal result itself
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    vent[r] = nullptr;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      acc[r][c] = 1 << (kPrecisionBits - 1);
      direct[r][c] = 0;
    }
  }
  const int ventry = 2 + p.ksize_v;
  const int hentry = 2 + p.ksize_h;

  const uint8_t* img = src + p.src_offset;
  const int row_stride = p.w * p.c;
  if (tile_has_pixels && !p.vfirst) {
    // Horizontal pass first. Source rows the tile needs: the union of the vertical windows (monotone in the row).
    int src_first, src_end;
    if (p.need_v) {
      const int32_t* e_first = coefs + p.coef_v + (int64_t)(ry_first - p.y0) * ventry;
      const int32_t* e_last = coefs + p.coef_v + (int64_t)(ry_last - p.y0) * ventry;
      src_first = e_first[0];
      src_end = e_last[0] + e_last[1];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int ry = oy0 + ty + r * (kThreads / kTile) + p.top;
        if (col_in && ry >= ry_first && ry <= ry_last)
          vent[r] = coefs + p.coef_v + (int64_t)(ry - p.y0) * ventry;
      }
    } else {
      src_first = ry_first;
      src_end = ry_last + 1;
    }

    for (int base = src_first; base < src_end; base += kChunkRows) {
      __syncthreads();  // previous chunk fully consumed
      // Horizontal pass for chunk rows x tile columns.
      for (int item = tid; item < kChunkRows * kTile; item += kThreads) {
        const int cr = item / kTile;
        const int cc = item % kTile;
        const int sy = base + cr;
        const int crx = ox0 + cc + p.left;
        if (sy >= src_end || crx < rx_first || crx > rx_last) continue;
        const uint8_t* row = img + (int64_t)sy * row_stride;
        if (p.need_h) {
          const int32_t* e = coefs + p.coef_h + (int64_t)(crx - p.x0) * hentry;
          const int xmin = e[0];
          const int cnt = e[1];
          const int32_t* k = e + 2;
          int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
          if (p.c == 3) {
            const uint8_t* px = row + xmin * 3;
            for (int t = 0; t < cnt; ++t) {
              const int kt = k[t];
              s0 += px[3 * t + 0] * kt;
              s1 += px[3 * t + 1] * kt;
              s2 += px[3 * t + 2] * kt;
            }
            chunk[cr][cc][0] = (uint8_t)clip8(s0);
            chunk[cr][cc][1] = (uint8_t)clip8(s1);
            chunk[cr][cc][2] = (uint8_t)clip8(s2);
          } else {
            const uint8_t* px = row + xmin;
            for (int t = 0; t < cnt; ++t) s0 += px[t] * k[t];
            chunk[cr][cc][0] = (uint8_t)clip8(s0);
          }
        } else {
          for (int c = 0; c < p.c; ++c) chunk[cr][cc][c] = row[crx * p.c + c];
        }
      }
      __syncthreads();
      // Vertical pass: add this chunk's rows to each output pixel's window.
      if (col_in) {
        const int chunk_end = min(base + kChunkRows, src_end);
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          if (p.need_v) {
            if (vent[r] == nullptr) continue;
            const int ymin = vent[r][0];
            const int lo = max(ymin, base);
            const int hi = min(ymin + vent[r][1], chunk_end);
            const int32_t* k = vent[r] + 2;
            // Gray images leave channels 1 and 2 of the chunk unused; summing them anyway
            // keeps acc in registers (no runtime-indexed local array).
            for (int y = lo; y < hi; ++y) {
              const int kt = k[y - ymin];
              acc[r][0] += chunk[y - base][tx][0] * kt;
              acc[r][1] += chunk[y - base][tx][1] * kt;
              acc[r][2] += chunk[y - base][tx][2] * kt;
            }
          } else {
            const int ry = oy0 + ty + r * (kThreads / kTile) + p.top;
            if (ry >= base && ry < chunk_end && ry >= ry_first && ry <= ry_last) {
              direct[r][0] = chunk[ry - base][tx][0];
              direct[r][1] = chunk[ry - base][tx][1];
              direct[r][2] = chunk[ry - base][tx][2];
            }
          }
        }
      }
    }
  } else if (tile_has_pixels) {
    // Vertical pass first (Pillow >= 13 when the height shrinks more than twice as much as
    // the width): chunks of source columns; chunk[lr][cc] is the vertical pass at the tile's
    // output row lr and source column base + cc, then each thread sums its horizontal window.
    const int32_t* e_first = coefs + p.coef_h + (int64_t)(rx_first - p.x0) * hentry;
    const int32_t* e_last = coefs + p.coef_h + (int64_t)(rx_last - p.x0) * hentry;
    const int src_first = e_first[0];
    const int src_end = e_last[0] + e_last[1];
    const int32_t* hent = col_in ? coefs + p.coef_h + (int64_t)(rx - p.x0) * hentry : nullptr;
    for (int base = src_first; base < src_end; base += kChunkRows) {
      __syncthreads();  // previous chunk fully consumed
      for (int item = tid; item < kTile * kChunkRows; item += kThreads) {
        const int lr = item / kChunkRows;
        const int cc = item % kChunkRows;
        const int sx = base + cc;
        const int ry = oy0 + lr + p.top;
        if (sx >= src_end || ry < ry_first || ry > ry_last) continue;
        const int32_t* e = coefs + p.coef_v + (int64_t)(ry - p.y0) * ventry;
        const int cnt = e[1];
        const int32_t* k = e + 2;
        const uint8_t* px = img + (int64_t)e[0] * row_stride + sx * p.c;
        int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        if (p.c == 3) {
          for (int t = 0; t < cnt; ++t) {
            const int kt = k[t];
            const uint8_t* q = px + (int64_t)t * row_stride;
            s0 += q[0] * kt;
            s1 += q[1] * kt;
            s2 += q[2] * kt;
          }
          chunk[lr][cc][0] = (uint8_t)clip8(s0);
          chunk[lr][cc][1] = (uint8_t)clip8(s1);
          chunk[lr][cc][2] = (uint8_t)clip8(s2);
        } else {
          for (int t = 0; t < cnt; ++t) s0 += px[(int64_t)t * row_stride] * k[t];
          chunk[lr][cc][0] = (uint8_t)clip8(s0);
        }
      }
      __syncthreads();
      if (hent != nullptr) {
        const int xmin = hent[0];
        const int lo = max(xmin, base);
        const int hi = min(xmin + hent[1], min(base + kChunkRows, src_end));
        const int32_t* k = hent + 2;
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int lr = ty + r * (kThreads / kTile);
          const int ry = oy0 + lr + p.top;
          if (ry < ry_first || ry > ry_last) continue;
          for (int x = lo; x < hi; ++x) {
            const int kt = k[x - xmin];
            acc[r][0] += chunk[lr][x - base][0] * kt;
            acc[r][1] += chunk[lr][x - base][1] * kt;
            acc[r][2] += chunk[lr][x - base][2] * kt;
          }
        }
      }
    }
  }
  __syncthreads();  // lut ready even when the tile has no pixels

  if (ox >= prm.out_w) return;
  const int plane = prm.out_h * prm.out_w;
  OutT* out_img = out + (int64_t)blockIdx.y * 3 * plane;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int oy = oy0 + ty + r * (kThreads / kTile);
    if (oy >= prm.out_h) continue;
    const int ry = oy + p.top;
    const bool inside = col_in && ry >= p.y0 && ry < p.y1;
    int v0 = prm.fill, v1 = prm.fill, v2 = prm.fill;
    if (inside) {
      v0 = p.need_v ? clip8(acc[r][0]) : direct[r][0];
      v1 = p.need_v ? clip8(acc[r][1]) : direct[r][1];
      v2 = p.need_v ? clip8(acc[r][2]) : direct[r][2];
      if (p.c == 1) v1 = v2 = v0;  // gray -> RGB: replicate the one channel
    }
    const int64_t pix = (int64_t)oy * prm.out_w + ox;
    out_img[pix] = to_out<OutT>(lut[0][v0]);
    out_img[plane + pix] = to_out<OutT>(lut[1][v1]);
    out_img[2 * plane + pix] = to_out<OutT>(lut[2][v2]);
  }
}

inline int check_params(const clipfast_preprocess_params* prm) {
  if (prm == nullptr) return fail(CLIPFAST_EINVAL, "params must not be NULL");
  if (prm->out_h < 1 || prm->out_w < 1 || prm->out_h > 16384 || prm->out_w > 16384)
    return fail(CLIPFAST_EINVAL, "params.out_h and params.out_w must be in 1..16384, got %d x %d",
                prm->out_h, prm->out_w);
  if (filter_support(prm->filter) == 0.0)
    return fail(CLIPFAST_EINVAL,
                "params.filter must be one of LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4, "
                "HAMMING=5 (Pillow numbering; NEAREST is not supported), got %d",
                prm->filter);
  if (prm->out_dtype != CLIPFAST_DTYPE_FLOAT32 && prm->out_dtype != CLIPFAST_DTYPE_FLOAT16 &&
      prm->out_dtype != CLIPFAST_DTYPE_BFLOAT16)
    return fail(CLIPFAST_EINVAL,
                "params.out_dtype must be FLOAT32=0, FLOAT16=1 or BFLOAT16=2, got %d",
                prm->out_dtype);
  if (prm->fill < 0 || prm->fill > 255)
    return fail(CLIPFAST_EINVAL, "params.fill must be in 0..255, got %d", prm->fill);
  for (int c = 0; c < 3; ++c) {
    if (!(prm->std[c] != 0.0f) || !std::isfinite(prm->std[c]) || !std::isfinite(prm->mean[c]))
      return fail(CLIPFAST_EINVAL, "params.std[%d] must be finite and non-zero and "
                  "params.mean[%d] finite, got std %g mean %g", c, c, prm->std[c], prm->mean[c]);
  }
  if (!std::isfinite(prm->rescale) || !std::isfinite(prm->offset))
    return fail(CLIPFAST_EINVAL, "params.rescale and params.offset must be finite");
  if (prm->reserved != 0 || prm->reserved2 != 0.0f)
    return fail(CLIPFAST_EINVAL, "params.reserved fields must be 0 (ABI mismatch?)");
  return CLIPFAST_OK;
}

inline int check_image(const clipfast_image_desc& d, int i, int64_t src_bytes) {
  if (d.height < 1 || d.width < 1)
    return fail(CLIPFAST_EINVAL, "images[%d]: height and width must be >= 1, got %d x %d", i,
                d.height, d.width);
  if (d.channels != 1 && d.channels != 3)
    return fail(CLIPFAST_EINVAL,
                "images[%d].channels must be 1 (gray) or 3 (RGB), got %d; convert RGBA and "
                "other modes on the CPU first", i, d.channels);
  if (d.resized_h < 1 || d.resized_w < 1 || d.resized_h > (1 << 24) || d.resized_w > (1 << 24))
    return fail(CLIPFAST_EINVAL, "images[%d]: resized_h and resized_w must be in 1..2^24, got "
                "%d x %d", i, d.resized_h, d.resized_w);
  if (d.height > (1 << 24) || d.width > (1 << 24))
    return fail(CLIPFAST_EINVAL, "images[%d]: height and width must be <= 2^24 (Pillow's box "
                "is float32), got %d x %d", i, d.height, d.width);
  const int64_t bytes = (int64_t)d.height * d.width * d.channels;
  if (d.offset < 0 || d.offset > src_bytes || bytes > src_bytes - d.offset)
    return fail(CLIPFAST_EINVAL,
                "images[%d]: offset %lld + height*width*channels %lld exceeds src_bytes %lld", i,
                (long long)d.offset, (long long)bytes, (long long)src_bytes);
  if ((int64_t)d.width * d.channels > INT32_MAX / 2)
    return fail(CLIPFAST_EINVAL, "images[%d]: row of %lld bytes is too long", i,
                (long long)d.width * d.channels);
  if ((d.flags & ~CLIPFAST_VERTICAL_FIRST) != 0)
    return fail(CLIPFAST_EINVAL, "images[%d].flags must be 0 or CLIPFAST_VERTICAL_FIRST (1), "
                "got %d", i, d.flags);
  return CLIPFAST_OK;
}


// Validates the descs and builds the per-image plans and the workspace layout (int32 words
// of coefficient entries); shared by clipfast_preprocess and the CPU emulator (csrc/emu/).
inline int build_plans(const clipfast_image_desc* images, int n, int64_t src_bytes,
                       const clipfast_preprocess_params& prm, std::vector<ImagePlan>* plans,
                       int64_t* coef_words, int* max_entries) {
  plans->assign(n, ImagePlan{});
  *coef_words = 0;
  *max_entries = 1;
  for (int i = 0; i < n; ++i) {
    const clipfast_image_desc& d = images[i];
    if (int rc = check_image(d, i, src_bytes)) return rc;
    ImagePlan& p = (*plans)[i];
    p.src_offset = d.offset;
    p.h = d.height;
    p.w = d.width;
    p.c = d.channels;
    p.rh = d.resized_h;
    p.rw = d.resized_w;
    p.top = d.top;
    p.left = d.left;
    p.y0 = std::max(d.top, 0);
    p.y1 = std::min(d.top + prm.out_h, d.resized_h);
    p.x0 = std::max(d.left, 0);
    p.x1 = std::min(d.left + prm.out_w, d.resized_w);
    p.need_h = d.resized_w != d.width;
    p.need_v = d.resized_h != d.height;
    p.vfirst = (d.flags & CLIPFAST_VERTICAL_FIRST) && p.need_h && p.need_v;
    p.ksize_h = pillow_ksize(d.width, d.resized_w, prm.filter);
    p.ksize_v = pillow_ksize(d.height, d.resized_h, prm.filter);
    const int ncols = p.need_h ? std::max(p.x1 - p.x0, 0) : 0;
    const int nrows = p.need_v ? std::max(p.y1 - p.y0, 0) : 0;
    p.coef_h = *coef_words;
    *coef_words += (int64_t)ncols * (2 + p.ksize_h);
    p.coef_v = *coef_words;
    *coef_words += (int64_t)nrows * (2 + p.ksize_v);
    *max_entries = std::max(*max_entries, ncols + nrows);
  }
  if (*coef_words > ((int64_t)1 << 31) - 1)
    return fail(CLIPFAST_EINVAL, "resampling tables would need %lld int32 words; split the batch",
                (long long)*coef_words);
  return CLIPFAST_OK;
}

}  // namespace preprocess_detail
}  // namespace clipfast

#endif  // CLIPFAST_PREPROCESS_KERNELS_CUH_
