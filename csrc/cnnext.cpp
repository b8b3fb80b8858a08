// The one registry of cnnext ops: every schema is defined here, once. This file is compiled into
// both extensions: `cnnext._C` defines the namespace `cnnext` (CPU and CUDA kernels) and
// `cnnext._C_emu` defines `cnnext_emu` (the CUDA kernels run by the CPU emulator), so the two
// namespaces can never drift apart. Kernels register per backend in csrc/<op>/{cpu.cpp,cuda.cu};
// each differentiable op's autograd (the CNNEXT_AUTOGRAD block that closes its family header)
// registers here, on the line after its schema, for the op's Autograd key.
#include <Python.h>
#include <torch/library.h>

#define CNNEXT_AUTOGRAD  // the family headers' autograd blocks are compiled here, and only here
#include "common/library.h"
#include "conv2d_direct/conv2d_direct.h"
#include "conv2d_im2col/conv2d_im2col.h"
#include "conv_bn_relu/conv_bn_relu.h"
#include "pool2d/pool2d.h"

// `fn` as the op's Autograd kernel.
#define CNNEXT_AUTOGRAD_IMPL(m, op, fn) \
  m.impl(op, torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(fn)))

CNNEXT_LIBRARY_EXPAND(CNNEXT_NS, m) {
  // ---- pooling (csrc/pool2d) ----
  m.def(
      "max_pool2d_with_argmax(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  CNNEXT_AUTOGRAD_IMPL(m, "max_pool2d_with_argmax",
                       cnnext::pool2d::max_pool2d_with_argmax_autograd);
  // The window geometry lets the CUDA backward gather (each input element reads only the outputs
  // whose window covers it) instead of scattering with atomics.
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor argmax, int[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
      "-> Tensor");
  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  CNNEXT_AUTOGRAD_IMPL(m, "avg_pool2d", cnnext::pool2d::avg_pool2d_autograd);
  m.def(
      "avg_pool2d_backward(Tensor grad_output, int[] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
      "int? divisor_override) -> Tensor");

  // ---- direct convolution (csrc/conv2d_direct) ----
  m.def(
      "conv2d_direct(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str variant, int max_col_bytes=67108864) -> Tensor");
  CNNEXT_AUTOGRAD_IMPL(m, "conv2d_direct",
                       cnnext::autograd::ConvAutograd<cnnext::DirectConv>::forward);
  m.def(
      "conv2d_direct_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask, "
      "str variant=\"auto\", int max_col_bytes=67108864) -> (Tensor, Tensor, Tensor)");

  // ---- im2col + GEMM convolution (csrc/conv2d_im2col) ----
  m.def(
      "conv2d_im2col(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int max_col_bytes) -> Tensor");
  CNNEXT_AUTOGRAD_IMPL(m, "conv2d_im2col",
                       cnnext::autograd::ConvAutograd<cnnext::Im2colConv>::forward);
  m.def(
      "conv2d_im2col_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask, int max_col_bytes) "
      "-> (Tensor, Tensor, Tensor)");

  // ---- fused conv + batch norm + ReLU (csrc/conv_bn_relu) ----
  // training=True: normalises with the batch statistics and updates the given running ones in
  // place as nn.BatchNorm2d does (running = (1 - momentum) * running + momentum * batch, with the
  // unbiased variance; an empty batch leaves them as they are); save_mean and save_invstd =
  // 1 / sqrt(biased var + eps) of the batch, batch_var its unbiased variance, conv_output the
  // pre-normalisation activation kept for backward. training=False: BatchNorm folded into the
  // convolution (bias + ReLU epilogue), the running statistics only read; save_mean =
  // running_mean, save_invstd from running_var, batch_var and conv_output empty. The saved
  // statistics are float for half / bfloat16 input, else the input's dtype.
  m.def(
      "conv_bn_relu(Tensor input, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, "
      "float momentum, float eps, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "str algo=\"auto\", int max_col_bytes=67108864) -> (Tensor output, Tensor save_mean, "
      "Tensor save_invstd, Tensor batch_var, Tensor conv_output)");
  CNNEXT_AUTOGRAD_IMPL(m, "conv_bn_relu", cnnext::fused::conv_bn_relu_autograd);
  // output_mask: input, weight, conv_bias, bn_weight, bn_bias. Masked-off gradients are empty.
  // The ReLU mask never comes from the forward output itself (which callers may modify in place,
  // e.g. an inplace ReLU after it): training recomputes it from conv_output and the saved
  // statistics; eval reads it from conv_output when that holds a copy of the forward output
  // (its autograd saves one), else reruns the folded convolution (conv_output empty).
  m.def(
      "conv_bn_relu_backward(Tensor grad_output, Tensor conv_output, Tensor input, "
      "Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, str algo, int max_col_bytes, bool[5] output_mask) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_conv_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");

  // ---- test hooks (not part of the public API) ----
  // The GEMM wrapper of csrc/common/gemm.cuh, exposed so tests can hold it against torch.matmul
  // and check its cuBLAS argument validation. Returns alpha*op(A)op(B) + beta*C in a copy of c.
  m.def(
      "_gemm(Tensor a, Tensor b, Tensor c, str transa, str transb, int m, int n, int k, "
      "float alpha, float beta, int lda, int ldb, int ldc, int stride_a, int stride_b, "
      "int stride_c, int batch) -> Tensor");
}

// Importing the extension module registers the ops above (extension-cpp's pattern: no pybind).
#ifdef CNNEXT_CUDA_EMULATION
#define CNNEXT_MODULE_NAME "_C_emu"
#define CNNEXT_PYINIT PyInit__C_emu
#else
#define CNNEXT_MODULE_NAME "_C"
#define CNNEXT_PYINIT PyInit__C
#endif

#ifndef CNNEXT_CUDA_EMULATION
bool cnnext_add_fast_call(PyObject* module);  // csrc/fast_call.cpp: cnnext._C.FastOp
#endif

extern "C" PyMODINIT_FUNC CNNEXT_PYINIT(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, CNNEXT_MODULE_NAME, nullptr, -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifndef CNNEXT_CUDA_EMULATION
  if (module != nullptr && !cnnext_add_fast_call(module)) {
    Py_DECREF(module);
    return nullptr;
  }
#endif
  return module;
}
