// clipfast_kernels.h - the C ABI of libclipfast_kernels.so (no libtorch, no C++ types).
//
// Built by the top-level CMakeLists.txt:
//   cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
// Loaded from Python by clipfast/kernels/_lib.py (ctypes). Every entry point takes raw device
// pointers plus a cudaStream_t passed as void*, enqueues its work on that stream and returns
// without synchronising. A non-zero return is one of CLIPFAST_E*; the message (naming the
// argument and the rule it broke) is then in clipfast_last_error() for the calling thread.
//
// Python references checked against these kernels:
//   clipfast_preprocess       -> clipfast.kernels.preprocess.preprocess_reference
//   clipfast_attention        -> clipfast.kernels.attention.attention_reference
#ifndef CLIPFAST_KERNELS_H_
#define CLIPFAST_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CLIPFAST_API __attribute__((visibility("default")))

// Bumped whenever a signature or a struct below changes; _lib.py refuses other versions.
#define CLIPFAST_ABI_VERSION 1

enum {
  CLIPFAST_OK = 0,
  CLIPFAST_EINVAL = 1,        // an argument broke a documented rule
  CLIPFAST_ECUDA = 2,         // a CUDA runtime call failed (message has cudaGetErrorString)
  CLIPFAST_ENVJPEG = 3,       // nvJPEG failed or could not be loaded
  CLIPFAST_EUNSUPPORTED = 4,  // feature compiled out (e.g. built without nvjpeg.h)
};

CLIPFAST_API int clipfast_abi_version(void);
// Message of the last failed call on this thread ("" if none). Valid until the next call.
CLIPFAST_API const char* clipfast_last_error(void);
// One line: CUDA version built against, architectures, nvJPEG support.
CLIPFAST_API const char* clipfast_build_info(void);

// ---------------------------------------------------------------- fused preprocessing
// Resampling filters, numbered as Pillow's Image.Resampling (NEAREST=0 is not supported).
enum {
  CLIPFAST_FILTER_LANCZOS = 1,
  CLIPFAST_FILTER_BILINEAR = 2,
  CLIPFAST_FILTER_BICUBIC = 3,
  CLIPFAST_FILTER_BOX = 4,
  CLIPFAST_FILTER_HAMMING = 5,
};
enum { CLIPFAST_DTYPE_FLOAT32 = 0, CLIPFAST_DTYPE_FLOAT16 = 1, CLIPFAST_DTYPE_BFLOAT16 = 2 };

// One source image inside the packed uint8 buffer, and where it goes. The geometry
// (resized size, window offset) is computed in Python by clipfast.preprocess so that the
// kernel and the CPU path share one definition of "shortest" / "squash" / "longest".
typedef struct {
  int64_t offset;     // byte offset of pixel (0, 0) in the packed buffer; rows are dense HWC
  int32_t height;     // source height, >= 1
  int32_t width;      // source width, >= 1
  int32_t channels;   // 1 (gray, replicated to RGB) or 3 (RGB)
  int32_t resized_h;  // size after the resize step (before crop / pad), >= 1
  int32_t resized_w;
  int32_t top;        // output row 0 is resized row `top` (negative: that many rows of fill)
  int32_t left;       // output col 0 is resized col `left`
  int32_t flags;      // 0 or CLIPFAST_VERTICAL_FIRST
} clipfast_image_desc;  // 40 bytes

// Run the vertical pass before the horizontal one (used only when both sizes change).
// Pillow >= 13 does so when the height shrinks more than twice as much as the width
// ((h - rh) > 0 and (h - rh) > 2 * (w - rw)); older Pillow always goes horizontal first.
// The order changes the uint8 rounding between passes, so it follows the installed Pillow.
#define CLIPFAST_VERTICAL_FIRST 1

typedef struct {
  int32_t out_h, out_w;  // output canvas (N, 3, out_h, out_w)
  int32_t filter;        // CLIPFAST_FILTER_*
  int32_t out_dtype;     // CLIPFAST_DTYPE_*
  int32_t fill;          // 0..255, value of padded pixels in every channel (before normalising)
  int32_t reserved;      // must be 0
  double rescale;        // out = ((float(x * rescale) + offset) - mean[c]) / std[c], float32
  float offset;
  float mean[3];
  float std[3];
  float reserved2;       // must be 0
} clipfast_preprocess_params;  // 64 bytes

// src: device, packed uint8 images of total size src_bytes. images: HOST array of n descs.
// out: device, n * 3 * out_h * out_w elements of out_dtype, NCHW. stream: cudaStream_t or NULL.
CLIPFAST_API int clipfast_preprocess(const uint8_t* src, int64_t src_bytes,
                                     const clipfast_image_desc* images, int32_t n,
                                     const clipfast_preprocess_params* params, void* out,
                                     void* stream);

// ---------------------------------------------------------------- nvJPEG batched decode
// nvJPEG is loaded with dlopen on first use (libnvjpeg.so.<CUDA major>), so the library
// itself loads on machines without it. A decoder owns nvJPEG handles; not thread-safe.
CLIPFAST_API int clipfast_jpeg_decoder_create(int prefer_hardware, void** decoder);
CLIPFAST_API int clipfast_jpeg_decoder_destroy(void* decoder);
// 1 if the decoder uses the hardware JPEG engine (A100 / H100 ...), 0 for the CUDA backend.
CLIPFAST_API int clipfast_jpeg_decoder_backend(void* decoder);
// Host-side header parse: heights / widths / channels (1 or 3) of n encoded JPEGs.
// Fails naming the first index that is not a JPEG nvJPEG can decode (decode it on CPU).
CLIPFAST_API int clipfast_jpeg_info(void* decoder, const uint8_t* const* data,
                                    const size_t* lengths, int32_t n, int32_t* heights,
                                    int32_t* widths, int32_t* channels);
// Decode n JPEGs (host memory) to interleaved RGB uint8 into the device buffer dst at the
// byte offsets `offsets` (each image height*width*3 bytes, dense rows), on `stream`.
// Grayscale JPEGs come out replicated to RGB. dst_bytes bounds every write.
CLIPFAST_API int clipfast_jpeg_decode(void* decoder, const uint8_t* const* data,
                                      const size_t* lengths, int32_t n, uint8_t* dst,
                                      int64_t dst_bytes, const int64_t* offsets,
                                      const int32_t* heights, const int32_t* widths,
                                      void* stream);

// ---------------------------------------------------------------- fused attention
// q, k, v, out: device, contiguous (batch, heads, tokens, head_dim), dtype fp16 or bf16
// (CLIPFAST_DTYPE_FLOAT16 / _BFLOAT16), 16-byte aligned. head_dim in {64, 80, 128},
// 1 <= tokens <= 4096. out = softmax(scale * q k^T [+ causal mask]) v, fp32 accumulation.
CLIPFAST_API int clipfast_attention(const void* q, const void* k, const void* v, void* out,
                                    int32_t batch, int32_t heads, int32_t tokens,
                                    int32_t head_dim, int32_t dtype, float scale, int32_t causal,
                                    void* stream);
// Which path clipfast_attention takes on the current device for this shape:
// 1 = K/V of one (batch, head) resident in shared memory, 2 = K/V tiled over the sequence
// (online softmax), 0 = invalid shape (see clipfast_last_error). Host-only query.
CLIPFAST_API int clipfast_attention_path(int32_t tokens, int32_t head_dim);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // CLIPFAST_KERNELS_H_
