// emulate.cpp - runs the csrc/ kernels on the CPU through cuda_emu.h, with the same host-side
// checks and plans as the real entry points. Used by tests/test_kernels.py (marked `build`):
//
//   g++ -std=c++20 -O2 -pthread -I csrc -I <cuda>/include csrc/emu/emulate.cpp -o emulate
//   emulate preprocess IN OUT   IN: int32 n | params (64 B) | n descs (40 B) | int64 bytes | src
//   emulate attention IN OUT    IN: int32 batch, heads, tokens, head_dim, dtype, causal,
//                                   smem_optin | float scale | q | k | v
// OUT receives the raw output; stdout one line ("path 1" for attention); errors on stderr
// with clipfast_last_error()'s message and exit status = the CLIPFAST_E* code.
#include "cuda_emu.h"  // must come first: it defines the CUDA keywords the kernels use

#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "../attention_kernels.cuh"
#include "../preprocess_kernels.cuh"

#include "../last_error.cu"  // fail() / clipfast_last_error(), as in the library

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

template <typename T>
T take(const std::vector<char>& buf, size_t* pos) {
  T v;
  std::memcpy(&v, buf.data() + *pos, sizeof(T));
  *pos += sizeof(T);
  return v;
}

int report(int rc) {
  if (rc != 0) std::fprintf(stderr, "error %d: %s\n", rc, clipfast_last_error());
  return rc;
}

template <typename OutT>
void run_resample(const uint8_t* src, const clipfast::preprocess_detail::ImagePlan* plans,
                  const int32_t* coefs, const clipfast_preprocess_params& prm, int n,
                  std::vector<char>* out) {
  using namespace clipfast::preprocess_detail;
  const int tiles_x = (prm.out_w + kTile - 1) / kTile;
  const int tiles_y = (prm.out_h + kTile - 1) / kTile;
  out->assign((size_t)n * 3 * prm.out_h * prm.out_w * sizeof(OutT), 0);
  OutT* o = reinterpret_cast<OutT*>(out->data());
  emu::launch({(unsigned)(tiles_x * tiles_y), (unsigned)n, 1}, {kThreads, 1, 1}, 0,
              [&] { resample_kernel<OutT>(src, plans, coefs, prm, tiles_x, o); });
}

int preprocess(const std::vector<char>& in, std::vector<char>* out) {
  using namespace clipfast::preprocess_detail;
  size_t pos = 0;
  const int n = take<int32_t>(in, &pos);
  const auto prm = take<clipfast_preprocess_params>(in, &pos);
  std::vector<clipfast_image_desc> descs(n);
  for (int i = 0; i < n; ++i) descs[i] = take<clipfast_image_desc>(in, &pos);
  const int64_t src_bytes = take<int64_t>(in, &pos);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(in.data() + pos);
  if (int rc = check_params(&prm)) return rc;
  std::vector<ImagePlan> plans;
  int64_t coef_words = 0;
  int max_entries = 1;
  if (int rc = build_plans(descs.data(), n, src_bytes, prm, &plans, &coef_words, &max_entries))
    return rc;
  std::vector<int32_t> coefs((size_t)std::max<int64_t>(coef_words, 1), 0x7eadbeef);
  emu::launch({(unsigned)((max_entries + 127) / 128), (unsigned)n, 1}, {128, 1, 1}, 0,
              [&] { coeff_kernel(plans.data(), prm.filter, coefs.data()); });
  switch (prm.out_dtype) {
    case CLIPFAST_DTYPE_FLOAT16:
      run_resample<__half>(src, plans.data(), coefs.data(), prm, n, out);
      break;
    case CLIPFAST_DTYPE_BFLOAT16:
      run_resample<__nv_bfloat16>(src, plans.data(), coefs.data(), prm, n, out);
      break;
    default:
      run_resample<float>(src, plans.data(), coefs.data(), prm, n, out);
  }
  return 0;
}

template <typename T, int D, bool RESIDENT>
void run_attention(const T* q, const T* k, const T* v, T* o, int batch, int heads, int tokens,
                   float scale_log2, int causal, size_t smem) {
  using namespace clipfast::attention_detail;
  emu::launch({(unsigned)((tokens + kBr - 1) / kBr), (unsigned)heads, (unsigned)batch},
              {kThreads, 1, 1}, smem, [&] {
                attention_kernel<T, D, RESIDENT>(q, k, v, o, heads, tokens, scale_log2, causal);
              });
}

template <typename T>
void dispatch_attention(int path, int d, const char* q, const char* k, const char* v, char* o,
                        int b, int h, int t, float sl2, int causal, size_t smem) {
  auto cq = reinterpret_cast<const T*>(q);
  auto ck = reinterpret_cast<const T*>(k);
  auto cv = reinterpret_cast<const T*>(v);
  auto co = reinterpret_cast<T*>(o);
#define CASE(D)                                                                  \
  if (d == D) {                                                                  \
    if (path == 1)                                                               \
      run_attention<T, D, true>(cq, ck, cv, co, b, h, t, sl2, causal, smem);     \
    else                                                                         \
      run_attention<T, D, false>(cq, ck, cv, co, b, h, t, sl2, causal, smem);    \
  }
  CASE(64)
  CASE(80)
  CASE(128)
#undef CASE
}

int attention(const std::vector<char>& in, std::vector<char>* out) {
  using namespace clipfast::attention_detail;
  size_t pos = 0;
  const int b = take<int32_t>(in, &pos), h = take<int32_t>(in, &pos);
  const int t = take<int32_t>(in, &pos), d = take<int32_t>(in, &pos);
  const int dtype = take<int32_t>(in, &pos), causal = take<int32_t>(in, &pos);
  const int optin = take<int32_t>(in, &pos);
  const float scale = take<float>(in, &pos);
  int path = 0;
  size_t smem = 0;
  if (int rc = pick_path(t, d, optin, &path, &smem)) return rc;
  const size_t bytes = (size_t)b * h * t * d * 2;
  const char* q = in.data() + pos;
  const char* k = q + bytes;
  const char* v = k + bytes;
  out->assign(bytes, 0);
  const float sl2 = (float)((double)scale * 1.4426950408889634);
  if (dtype == CLIPFAST_DTYPE_FLOAT16)
    dispatch_attention<__half>(path, d, q, k, v, out->data(), b, h, t, sl2, causal != 0, smem);
  else
    dispatch_attention<__nv_bfloat16>(path, d, q, k, v, out->data(), b, h, t, sl2, causal != 0,
                                      smem);
  std::printf("path %d smem %zu\n", path, smem);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s preprocess|attention IN OUT\n", argv[0]);
    return 64;
  }
  const std::string what = argv[1];
  const std::vector<char> in = read_file(argv[2]);
  std::vector<char> out;
  int rc = 64;
  if (what == "preprocess") rc = preprocess(in, &out);
  if (what == "attention") rc = attention(in, &out);
  if (rc != 0) return report(rc);
  std::ofstream f(argv[3], std::ios::binary);
  f.write(out.data(), (std::streamsize)out.size());
  return 0;
}
