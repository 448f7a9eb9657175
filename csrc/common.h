// common.h - error reporting shared by the csrc/ translation units (internal, not the ABI).
#ifndef CLIPFAST_COMMON_H_
#define CLIPFAST_COMMON_H_

#include <cuda_runtime.h>

#include "clipfast_kernels.h"

namespace clipfast {

// Records a printf-style message for clipfast_last_error() and returns `code`, so host checks
// read `return fail(CLIPFAST_EINVAL, "head_dim must be one of 64, 80, 128, got %d", d);`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

// cudaError_t -> CLIPFAST_ECUDA with "<what>: <cuda error name>: <description>".
int cuda_fail(cudaError_t err, const char* what);

// Maximum dynamic shared memory per block (opt-in) of the current device, cached per device.
int max_smem_optin(int* bytes);

}  // namespace clipfast

#define CLIPFAST_CUDA_CHECK(expr)                                  \
  do {                                                             \
    cudaError_t err_ = (expr);                                     \
    if (err_ != cudaSuccess) return ::clipfast::cuda_fail(err_, #expr); \
  } while (0)

#endif  // CLIPFAST_COMMON_H_
