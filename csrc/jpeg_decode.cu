// jpeg_decode.cu - batched JPEG decode with nvJPEG into the packed uint8 HWC buffer that
// clipfast_preprocess reads. Host code only.
//
// nvJPEG is opened with dlopen("libnvjpeg.so.<major>") on first use rather than linked: the
// kernels library then loads (and preprocessing / attention work) on machines without nvJPEG,
// and pip's nvidia-nvjpeg wheel works once clipfast/kernels/_lib.py has preloaded it.
// Needs nvjpeg.h at build time only (CUDA toolkit or the nvidia-nvjpeg wheel); without it the
// entry points return CLIPFAST_EUNSUPPORTED.
//
// Backends: nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE) on GPUs with a JPEG engine (A100, H100,
// ...); otherwise, and for streams the engine cannot take (progressive, some subsamplings,
// checked per image with nvjpegDecodeBatchedSupported), NVJPEG_BACKEND_DEFAULT.
// Output format NVJPEG_OUTPUT_RGBI: interleaved RGB, grayscale replicated by nvJPEG.
// Reference: decode on the CPU with Pillow; nvJPEG's IDCT and chroma upsampling differ from
// libjpeg-turbo by a few levels (tests/test_kernels.py allows mean <= 1, max <= 3 after resize).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "common.h"

#ifdef CLIPFAST_HAVE_NVJPEG
#include <nvjpeg.h>

namespace clipfast {
namespace {

struct NvjpegApi {
  decltype(&nvjpegCreateEx) CreateEx = nullptr;
  decltype(&nvjpegDestroy) Destroy = nullptr;
  decltype(&nvjpegJpegStateCreate) JpegStateCreate = nullptr;
  decltype(&nvjpegJpegStateDestroy) JpegStateDestroy = nullptr;
  decltype(&nvjpegGetImageInfo) GetImageInfo = nullptr;
  decltype(&nvjpegDecodeBatchedInitialize) DecodeBatchedInitialize = nullptr;
  decltype(&nvjpegDecodeBatched) DecodeBatched = nullptr;
  decltype(&nvjpegJpegStreamCreate) JpegStreamCreate = nullptr;
  decltype(&nvjpegJpegStreamDestroy) JpegStreamDestroy = nullptr;
  decltype(&nvjpegJpegStreamParseHeader) JpegStreamParseHeader = nullptr;
  decltype(&nvjpegDecodeBatchedSupported) DecodeBatchedSupported = nullptr;
  bool loaded = false;
  char error[512] = "";
};

#define CLIPFAST_STR2(x) #x
#define CLIPFAST_STR(x) CLIPFAST_STR2(x)

// Loaded once; later calls return the first outcome (C++11 static init is thread-safe).
const NvjpegApi& api() {
  static NvjpegApi a = [] {
    NvjpegApi r;
    const char* names[] = {"libnvjpeg.so." CLIPFAST_STR(NVJPEG_VER_MAJOR), "libnvjpeg.so"};
    void* lib = nullptr;
    for (const char* name : names) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      snprintf(r.error, sizeof(r.error),
               "cannot load libnvjpeg.so.%d (%s); install the CUDA toolkit's nvJPEG or "
               "`pip install nvidia-nvjpeg`, or decode on the CPU",
               NVJPEG_VER_MAJOR, dlerror());
      return r;
    }
#define CLIPFAST_SYM(field, name)                                                      \
  r.field = reinterpret_cast<decltype(r.field)>(dlsym(lib, #name));                    \
  if (r.field == nullptr) {                                                            \
    snprintf(r.error, sizeof(r.error), "libnvjpeg lacks symbol %s", #name);            \
    return r;                                                                          \
  }
    CLIPFAST_SYM(CreateEx, nvjpegCreateEx)
    CLIPFAST_SYM(Destroy, nvjpegDestroy)
    CLIPFAST_SYM(JpegStateCreate, nvjpegJpegStateCreate)
    CLIPFAST_SYM(JpegStateDestroy, nvjpegJpegStateDestroy)
    CLIPFAST_SYM(GetImageInfo, nvjpegGetImageInfo)
    CLIPFAST_SYM(DecodeBatchedInitialize, nvjpegDecodeBatchedInitialize)
    CLIPFAST_SYM(DecodeBatched, nvjpegDecodeBatched)
    CLIPFAST_SYM(JpegStreamCreate, nvjpegJpegStreamCreate)
    CLIPFAST_SYM(JpegStreamDestroy, nvjpegJpegStreamDestroy)
    CLIPFAST_SYM(JpegStreamParseHeader, nvjpegJpegStreamParseHeader)
    CLIPFAST_SYM(DecodeBatchedSupported, nvjpegDecodeBatchedSupported)
#undef CLIPFAST_SYM
    r.loaded = true;
    return r;
  }();
  return a;
}

const char* status_name(nvjpegStatus_t s) {
  switch (s) {
    case NVJPEG_STATUS_SUCCESS: return "NVJPEG_STATUS_SUCCESS";
    case NVJPEG_STATUS_NOT_INITIALIZED: return "NVJPEG_STATUS_NOT_INITIALIZED";
    case NVJPEG_STATUS_INVALID_PARAMETER: return "NVJPEG_STATUS_INVALID_PARAMETER";
    case NVJPEG_STATUS_BAD_JPEG: return "NVJPEG_STATUS_BAD_JPEG";
    case NVJPEG_STATUS_JPEG_NOT_SUPPORTED: return "NVJPEG_STATUS_JPEG_NOT_SUPPORTED";
    case NVJPEG_STATUS_ALLOCATOR_FAILURE: return "NVJPEG_STATUS_ALLOCATOR_FAILURE";
    case NVJPEG_STATUS_EXECUTION_FAILED: return "NVJPEG_STATUS_EXECUTION_FAILED";
    case NVJPEG_STATUS_ARCH_MISMATCH: return "NVJPEG_STATUS_ARCH_MISMATCH";
    case NVJPEG_STATUS_INTERNAL_ERROR: return "NVJPEG_STATUS_INTERNAL_ERROR";
    case NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED:
      return "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED";
    case NVJPEG_STATUS_INCOMPLETE_BITSTREAM: return "NVJPEG_STATUS_INCOMPLETE_BITSTREAM";
    default: return "NVJPEG_STATUS_<unknown>";
  }
}

int nvjpeg_fail(nvjpegStatus_t s, const char* what) {
  return fail(CLIPFAST_ENVJPEG, "%s failed: %s (%d)", what, status_name(s), (int)s);
}

#define CLIPFAST_NVJPEG_CHECK(expr)                               \
  do {                                                            \
    nvjpegStatus_t st_ = (expr);                                  \
    if (st_ != NVJPEG_STATUS_SUCCESS) return nvjpeg_fail(st_, #expr); \
  } while (0)

struct Decoder {
  nvjpegHandle_t hw = nullptr;
  nvjpegJpegState_t hw_state = nullptr;
  nvjpegJpegStream_t hw_stream = nullptr;  // header parse for the hardware-support check
  nvjpegHandle_t sw = nullptr;
  nvjpegJpegState_t sw_state = nullptr;
};

void destroy(Decoder* d) {
  const NvjpegApi& a = api();
  if (d == nullptr || !a.loaded) return;
  if (d->hw_stream) a.JpegStreamDestroy(d->hw_stream);
  if (d->hw_state) a.JpegStateDestroy(d->hw_state);
  if (d->hw) a.Destroy(d->hw);
  if (d->sw_state) a.JpegStateDestroy(d->sw_state);
  if (d->sw) a.Destroy(d->sw);
  delete d;
}

int decode_group(const NvjpegApi& a, nvjpegHandle_t h, nvjpegJpegState_t st,
                 const std::vector<int>& idx, const uint8_t* const* data, const size_t* lengths,
                 uint8_t* dst, const int64_t* offsets, const int32_t* widths,
                 cudaStream_t stream) {
  if (idx.empty()) return CLIPFAST_OK;
  std::vector<const unsigned char*> ptrs;
  std::vector<size_t> lens;
  std::vector<nvjpegImage_t> dests(idx.size());
  for (size_t j = 0; j < idx.size(); ++j) {
    const int i = idx[j];
    ptrs.push_back(data[i]);
    lens.push_back(lengths[i]);
    for (int c = 0; c < NVJPEG_MAX_COMPONENT; ++c) {
      dests[j].channel[c] = nullptr;
      dests[j].pitch[c] = 0;
    }
    dests[j].channel[0] = dst + offsets[i];
    dests[j].pitch[0] = (size_t)widths[i] * 3;
  }
  CLIPFAST_NVJPEG_CHECK(a.DecodeBatchedInitialize(h, st, (int)idx.size(), 1, NVJPEG_OUTPUT_RGBI));
  CLIPFAST_NVJPEG_CHECK(a.DecodeBatched(h, st, ptrs.data(), lens.data(), dests.data(), stream));
  return CLIPFAST_OK;
}

}  // namespace
}  // namespace clipfast

extern "C" {

int clipfast_jpeg_decoder_create(int prefer_hardware, void** out) {
  using namespace clipfast;
  clear_error();
  if (out == nullptr) return fail(CLIPFAST_EINVAL, "decoder must not be NULL");
  *out = nullptr;
  const NvjpegApi& a = api();
  if (!a.loaded) return fail(CLIPFAST_ENVJPEG, "%s", a.error);
  Decoder* d = new Decoder();
  if (prefer_hardware) {
    // ARCH_MISMATCH / NOT_SUPPORTED on GPUs without the engine: fall back silently.
    if (a.CreateEx(NVJPEG_BACKEND_HARDWARE, nullptr, nullptr, 0, &d->hw) ==
        NVJPEG_STATUS_SUCCESS) {
      if (a.JpegStateCreate(d->hw, &d->hw_state) != NVJPEG_STATUS_SUCCESS ||
          a.JpegStreamCreate(d->hw, &d->hw_stream) != NVJPEG_STATUS_SUCCESS) {
        if (d->hw_stream) a.JpegStreamDestroy(d->hw_stream);
        if (d->hw_state) a.JpegStateDestroy(d->hw_state);
        a.Destroy(d->hw);
        d->hw = nullptr;
        d->hw_state = nullptr;
        d->hw_stream = nullptr;
      }
    } else {
      d->hw = nullptr;
    }
  }
  nvjpegStatus_t s = a.CreateEx(NVJPEG_BACKEND_DEFAULT, nullptr, nullptr, 0, &d->sw);
  if (s == NVJPEG_STATUS_SUCCESS) s = a.JpegStateCreate(d->sw, &d->sw_state);
  if (s != NVJPEG_STATUS_SUCCESS) {
    destroy(d);
    return nvjpeg_fail(s, "nvjpegCreateEx(NVJPEG_BACKEND_DEFAULT)");
  }
  *out = d;
  return CLIPFAST_OK;
}

int clipfast_jpeg_decoder_destroy(void* decoder) {
  clipfast::clear_error();
  clipfast::destroy(static_cast<clipfast::Decoder*>(decoder));
  return CLIPFAST_OK;
}

int clipfast_jpeg_decoder_backend(void* decoder) {
  const auto* d = static_cast<const clipfast::Decoder*>(decoder);
  return (d != nullptr && d->hw != nullptr) ? 1 : 0;
}

int clipfast_jpeg_info(void* decoder, const uint8_t* const* data, const size_t* lengths,
                       int32_t n, int32_t* heights, int32_t* widths, int32_t* channels) {
  using namespace clipfast;
  clear_error();
  auto* d = static_cast<Decoder*>(decoder);
  if (d == nullptr) return fail(CLIPFAST_EINVAL, "decoder must not be NULL");
  if (n < 1) return fail(CLIPFAST_EINVAL, "n must be >= 1, got %d", n);
  if (!data || !lengths || !heights || !widths || !channels)
    return fail(CLIPFAST_EINVAL, "data, lengths, heights, widths, channels must not be NULL");
  const NvjpegApi& a = api();
  for (int i = 0; i < n; ++i) {
    if (data[i] == nullptr || lengths[i] == 0)
      return fail(CLIPFAST_EINVAL, "data[%d] is empty", i);
    int ncomp = 0;
    nvjpegChromaSubsampling_t sub;
    int w[NVJPEG_MAX_COMPONENT] = {0};
    int h[NVJPEG_MAX_COMPONENT] = {0};
    nvjpegStatus_t s = a.GetImageInfo(d->sw, data[i], lengths[i], &ncomp, &sub, w, h);
    if (s != NVJPEG_STATUS_SUCCESS)
      return fail(CLIPFAST_ENVJPEG,
                  "data[%d]: not a JPEG nvJPEG can read (%s); decode it on the CPU", i,
                  status_name(s));
    if (ncomp != 1 && ncomp != 3)
      return fail(CLIPFAST_ENVJPEG,
                  "data[%d]: JPEG with %d components (CMYK?) is not supported on the GPU; "
                  "decode it on the CPU", i, ncomp);
    if (w[0] < 1 || h[0] < 1)
      return fail(CLIPFAST_ENVJPEG, "data[%d]: JPEG reports size %d x %d", i, w[0], h[0]);
    heights[i] = h[0];
    widths[i] = w[0];
    channels[i] = ncomp;
  }
  return CLIPFAST_OK;
}

int clipfast_jpeg_decode(void* decoder, const uint8_t* const* data, const size_t* lengths,
                         int32_t n, uint8_t* dst, int64_t dst_bytes, const int64_t* offsets,
                         const int32_t* heights, const int32_t* widths, void* stream_ptr) {
  using namespace clipfast;
  clear_error();
  auto* d = static_cast<Decoder*>(decoder);
  if (d == nullptr) return fail(CLIPFAST_EINVAL, "decoder must not be NULL");
  if (n < 1) return fail(CLIPFAST_EINVAL, "n must be >= 1, got %d", n);
  if (!data || !lengths || !dst || !offsets || !heights || !widths)
    return fail(CLIPFAST_EINVAL, "data, lengths, dst, offsets, heights, widths must not be NULL");
  for (int i = 0; i < n; ++i) {
    if (data[i] == nullptr || lengths[i] == 0)
      return fail(CLIPFAST_EINVAL, "data[%d] is empty", i);
    const int64_t bytes = (int64_t)heights[i] * widths[i] * 3;
    if (heights[i] < 1 || widths[i] < 1 || offsets[i] < 0 || offsets[i] > dst_bytes ||
        bytes > dst_bytes - offsets[i])
      return fail(CLIPFAST_EINVAL,
                  "image %d: offset %lld + %d*%d*3 bytes exceeds dst_bytes %lld", i,
                  (long long)offsets[i], heights[i], widths[i], (long long)dst_bytes);
  }
  const NvjpegApi& a = api();
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  std::vector<int> on_hw, on_sw;
  for (int i = 0; i < n; ++i) {
    int unsupported = 1;
    if (d->hw != nullptr &&
        a.JpegStreamParseHeader(d->hw, data[i], lengths[i], d->hw_stream) ==
            NVJPEG_STATUS_SUCCESS &&
        a.DecodeBatchedSupported(d->hw, d->hw_stream, &unsupported) == NVJPEG_STATUS_SUCCESS &&
        unsupported == 0) {
      on_hw.push_back(i);
    } else {
      on_sw.push_back(i);
    }
  }
  if (int rc = decode_group(a, d->hw, d->hw_state, on_hw, data, lengths, dst, offsets, widths,
                            stream))
    return rc;
  if (int rc = decode_group(a, d->sw, d->sw_state, on_sw, data, lengths, dst, offsets, widths,
                            stream))
    return rc;
  // The bitstreams live in caller memory (Python bytes): wait so they may be freed on return.
  CLIPFAST_CUDA_CHECK(cudaStreamSynchronize(stream));
  return CLIPFAST_OK;
}

}  // extern "C"

#else  // !CLIPFAST_HAVE_NVJPEG

namespace {
int no_nvjpeg() {
  return clipfast::fail(CLIPFAST_EUNSUPPORTED,
                        "libclipfast_kernels was built without nvjpeg.h; rebuild with the CUDA "
                        "toolkit's nvJPEG or `pip install nvidia-nvjpeg` present, or decode on "
                        "the CPU");
}
}  // namespace

extern "C" {
int clipfast_jpeg_decoder_create(int, void** out) {
  if (out) *out = nullptr;
  return no_nvjpeg();
}
int clipfast_jpeg_decoder_destroy(void*) { return CLIPFAST_OK; }
int clipfast_jpeg_decoder_backend(void*) { return 0; }
int clipfast_jpeg_info(void*, const uint8_t* const*, const size_t*, int32_t, int32_t*, int32_t*,
                       int32_t*) {
  return no_nvjpeg();
}
int clipfast_jpeg_decode(void*, const uint8_t* const*, const size_t*, int32_t, uint8_t*, int64_t,
                         const int64_t*, const int32_t*, const int32_t*, void*) {
  return no_nvjpeg();
}
}  // extern "C"

#endif  // CLIPFAST_HAVE_NVJPEG
