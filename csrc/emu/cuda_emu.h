// cuda_emu.h - just enough of CUDA to run clipfast's kernels on the CPU, for tests on machines
// without a GPU. Every CUDA thread is an OS thread; __syncthreads / __syncwarp are
// std::barrier; WMMA fragments hold the whole 16x16 tile in every lane and each *_sync call is
// warp-synchronous (barrier before and after, lane 0 writes). Blocks run one after another,
// so __shared__ variables can be function statics.
//
// It checks the kernels' indexing, masking, tiling and arithmetic, not their speed, memory
// model corner cases or the hardware's own rounding inside tensor-core accumulation.
// Compiled with g++ -std=c++20 by tests/test_kernels.py (marked `build`), never shipped.
#ifndef CLIPFAST_CUDA_EMU_H_
#define CLIPFAST_CUDA_EMU_H_

#define CLIPFAST_CPU_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// The toolkit headers define these as attributes for nvcc; plain C++ here.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define CLIPFAST_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct BlockState {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;  // one slot per thread
  std::vector<unsigned char> dynamic_smem;
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}
inline unsigned char* dynamic_smem() { return state()->dynamic_smem.data(); }

}  // namespace emu

inline thread_local emu::Dim3 threadIdx;
inline thread_local emu::Dim3 blockIdx;
inline thread_local emu::Dim3 blockDim;
inline thread_local emu::Dim3 gridDim;

inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void __syncthreads() { emu::state()->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::state()->warps[emu_tid() / 32]->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::BlockState* s = emu::state();
  const unsigned t = emu_tid();
  s->shuffle[t] = v;
  __syncwarp();
  const float r = s->shuffle[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)];
  __syncwarp();
  return r;
}

namespace emu {

// Runs kernel(args...) over grid x block, blocks sequentially, threads concurrently.
template <typename F>
void launch(Dim3 grid, Dim3 block, size_t smem, F&& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState st;
        st.block = std::make_unique<std::barrier<>>(nthreads);
        for (unsigned w = 0; w < (nthreads + 31) / 32; ++w)
          st.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, nthreads - 32 * w)));
        st.shuffle.assign(nthreads, 0.0f);
        st.dynamic_smem.assign(smem, 0xCD);  // garbage, like real shared memory
        state() = &st;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            body();
            // An exited thread no longer takes part in barriers.
            st.block->arrive_and_drop();
            st.warps[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        state() = nullptr;
      }
}

}  // namespace emu

// ------------------------------------------------------------------ WMMA (16x16x16 only)
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  T x[16][16];  // logical (row, col) of the tile, the same in every lane
};

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  __syncwarp();
  const bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = col ? p[c * ldm + r] : p[r * ldm + c];
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  __syncwarp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  __syncwarp();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  __syncwarp();
  if (emu_tid() % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c)
        (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r][c];
  __syncwarp();
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T v) {
  for (auto& row : f.x)
    for (auto& e : row) e = (float)v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r][n];
      for (int k = 0; k < 16; ++k) s += to_f(a.x[r][k]) * to_f(b.x[k][n]);
      out[r][n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
  __syncwarp();
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // CLIPFAST_CUDA_EMU_H_
