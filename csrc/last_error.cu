// last_error.cu - the message behind clipfast_last_error(): fail() records it, clear_error()
// empties it. Plain C++ with no CUDA call, so the CPU emulator (emu/emulate.cpp) includes this
// file too and reports errors through the same code as the library.
#include <cstdarg>
#include <cstdio>

#include "common.h"

namespace clipfast {

namespace {
thread_local char g_last_error[1024] = "";
}  // namespace

int fail(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return code;
}

void clear_error() { g_last_error[0] = '\0'; }

}  // namespace clipfast

extern "C" const char* clipfast_last_error(void) { return clipfast::g_last_error; }
