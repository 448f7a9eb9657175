// common.cu - version / build info and the CUDA error helpers (clipfast_last_error and fail()
// are in last_error.cu).
#include <mutex>

#include "common.h"

namespace clipfast {

int cuda_fail(cudaError_t err, const char* what) {
  cudaGetLastError();  // clear a sticky-free error so the next call starts clean
  return fail(CLIPFAST_ECUDA, "%s failed: %s: %s", what, cudaGetErrorName(err),
              cudaGetErrorString(err));
}

int max_smem_optin(int* bytes) {
  // Up to 64 devices; 0 means "not queried yet". Races only repeat an idempotent query.
  static int cache[64] = {0};
  int dev = 0;
  CLIPFAST_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 && cache[dev] > 0) {
    *bytes = cache[dev];
    return CLIPFAST_OK;
  }
  int value = 0;
  CLIPFAST_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (dev >= 0 && dev < 64) cache[dev] = value;
  *bytes = value;
  return CLIPFAST_OK;
}

}  // namespace clipfast

#define CLIPFAST_STR2(x) #x
#define CLIPFAST_STR(x) CLIPFAST_STR2(x)

extern "C" {

int clipfast_abi_version(void) { return CLIPFAST_ABI_VERSION; }

const char* clipfast_build_info(void) {
  return "clipfast_kernels abi " CLIPFAST_STR(CLIPFAST_ABI_VERSION)
         " cuda " CLIPFAST_STR(CUDART_VERSION)
         " archs " CLIPFAST_ARCHS_STRING
#ifdef CLIPFAST_HAVE_NVJPEG
         " nvjpeg yes (dlopen)"
#else
         " nvjpeg no (nvjpeg.h not found at build time)"
#endif
      ;
}

}  // extern "C"
