// Op namespaces. The emulator build registers the same schemas under `cnnext_emu`.
#pragma once

#include <torch/library.h>

#ifdef CNNEXT_CUDA_EMULATION
#define CNNEXT_NS cnnext_emu
#else
#define CNNEXT_NS cnnext
#endif

// TORCH_LIBRARY pastes its namespace argument, so a macro namespace needs one expansion first.
#define CNNEXT_LIBRARY_EXPAND(ns, m) TORCH_LIBRARY(ns, m)
#define CNNEXT_LIBRARY_IMPL_EXPAND(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
