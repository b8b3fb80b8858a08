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

// The namespace as a string ("cnnext" or "cnnext_emu"), to look ops up in the dispatcher.
#define CNNEXT_STRINGIFY_(x) #x
#define CNNEXT_STRINGIFY(x) CNNEXT_STRINGIFY_(x)
#define CNNEXT_NS_NAME CNNEXT_STRINGIFY(CNNEXT_NS)
