// A lean Python binding of cnnext's ops, in cnnext._C only. `cnnext._C.FastOp("avg_pool2d")` is
// a callable that converts its positional arguments by the op's schema and calls the op through
// the dispatcher: `cnnext::` normally, `cnnext_emu::` for CPU tensors while emulating (set by
// `_set_emulating`). Below the Python binding everything is as a call through torch.ops: the
// autograd kernel, autocast, functorch, FakeTensor and torch_dispatch modes, the profiler and
// the JIT tracer are dispatch keys. torch.ops' own binding (schema matching over *args/**kwargs,
// pybind conversion) costs several microseconds a call, more than a small layer's kernel.
// The ops listed in kTyped are called unboxed (arguments converted straight to the kernels' C++
// types, int pairs on the stack: ~0.4 us less a call than the boxed IValue stack); any other op
// works boxed, by its schema alone.
//
// It accepts only plain arguments: exact torch.Tensor / nn.Parameter objects, Python ints and
// floats, bools, str, None for optionals, and for `int[2]` an int or a sequence of one or two
// ints. For anything else, or while a torch function mode is active, it returns NotImplemented
// and the caller (cnnext.ops) goes through torch.ops, which handles __torch_function__,
// subclasses, SymInts and the argument forms torch.nn.functional accepts. The callers never use
// it while Dynamo traces (opaque to it); other tracers' fake tensors are declined.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace cnnext {
namespace {

enum class Kind { kTensor, kOptionalTensor, kInt, kOptionalInt, kIntPair, kBool, kFloat, kStr };

std::atomic<bool> emulating{false};

struct FastOpImpl;
// A typed (unboxed) call of one op: converts the Python arguments straight to the kernel's C++
// types and calls TypedOperatorHandle::call, so no IValue stack is built (the boxed call's int
// lists cost a heap allocation each, on both sides of the dispatcher). nullptr: the op has no
// entry in kTyped and takes the boxed call.
using Invoker = PyObject* (*)(FastOpImpl&, PyObject* const*);

struct FastOpImpl {
  std::string name;
  Invoker typed = nullptr;
  std::vector<Kind> kinds;
  size_t returns = 0;  // how many of the op's returns a call gives back (the first ones)
  // A first tensor of fewer dimensions is declined: the caller's checked path raises the error
  // torch raises for it (avg_pool2d: an IndexError), cheaper here than a Python rank check.
  int64_t min_dim = 0;
  // Per namespace (cnnext, cnnext_emu), looked up on first use: the emulator's module is
  // imported after this one, and may be absent.
  std::array<std::optional<c10::OperatorHandle>, 2> handles;
  std::array<bool, 2> looked_up{};
};

struct FastOp {
  PyObject_HEAD vectorcallfunc vectorcall;
  FastOpImpl* impl;
};

Kind kind_of(const c10::Argument& arg, const std::string& op) {
  const c10::TypePtr& type = arg.type();
  switch (type->kind()) {
    case c10::TypeKind::TensorType:
      return Kind::kTensor;
    case c10::TypeKind::IntType:
      return Kind::kInt;
    case c10::TypeKind::BoolType:
      return Kind::kBool;
    case c10::TypeKind::FloatType:
      return Kind::kFloat;
    case c10::TypeKind::StringType:
      return Kind::kStr;
    case c10::TypeKind::OptionalType: {
      const auto inner = type->expectRef<c10::OptionalType>().getElementType()->kind();
      if (inner == c10::TypeKind::TensorType) return Kind::kOptionalTensor;
      if (inner == c10::TypeKind::IntType) return Kind::kOptionalInt;
      break;
    }
    case c10::TypeKind::ListType:
      if (type->expectRef<c10::ListType>().getElementType()->kind() == c10::TypeKind::IntType &&
          arg.N() == 2) {
        return Kind::kIntPair;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "cnnext._C.FastOp: ", op, ": argument ", arg.name(), " of type ",
                   type->str(), " is not supported");
}

// An exact Python int (never a bool, a numpy int or a SymInt) that fits int64.
bool to_int(PyObject* obj, int64_t* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0 && !(*out == -1 && PyErr_Occurred());
}

// torch.nn.functional's rule for a 2D argument: an int, or a sequence of one or two ints.
bool to_pair(PyObject* obj, std::array<int64_t, 2>* out) {
  int64_t a = 0, b = 0;
  if (to_int(obj, &a)) {
    *out = {a, a};
    return true;
  }
  const bool tuple = PyTuple_CheckExact(obj);
  if (!tuple && !PyList_CheckExact(obj)) return false;
  const Py_ssize_t n = tuple ? PyTuple_GET_SIZE(obj) : PyList_GET_SIZE(obj);
  if (n != 1 && n != 2) return false;
  auto item = [&](Py_ssize_t i) {
    return tuple ? PyTuple_GET_ITEM(obj, i) : PyList_GET_ITEM(obj, i);
  };
  if (!to_int(item(0), &a) || !to_int(item(n - 1), &b)) return false;
  *out = {a, b};
  return true;
}

// Arg<T> converts one plain Python argument to the kernels' C++ type T (false: not a plain form)
// and holds it for the call; the boxed call converts through the same Arg<T> (convert below).
template <typename T>
struct Arg;

template <>
struct Arg<const at::Tensor&> {
  const at::Tensor* tensor = nullptr;  // the Python object's own (the caller keeps it alive)
  bool convert(PyObject* obj) {
    if (!THPVariable_CheckExact(obj)) return false;
    tensor = &THPVariable_Unpack(obj);
    return true;
  }
  const at::Tensor& get() const { return *tensor; }
};
template <>
struct Arg<const std::optional<at::Tensor>&> {
  std::optional<at::Tensor> tensor;
  bool convert(PyObject* obj) {
    if (obj == Py_None) return true;
    if (!THPVariable_CheckExact(obj)) return false;
    tensor = THPVariable_Unpack(obj);
    return true;
  }
  const std::optional<at::Tensor>& get() const { return tensor; }
};
template <>
struct Arg<at::IntArrayRef> {
  std::array<int64_t, 2> pair{};
  bool convert(PyObject* obj) { return to_pair(obj, &pair); }
  at::IntArrayRef get() const { return pair; }
};
template <>
struct Arg<int64_t> {
  int64_t value = 0;
  bool convert(PyObject* obj) { return to_int(obj, &value); }
  int64_t get() const { return value; }
};
template <>
struct Arg<std::optional<int64_t>> {
  std::optional<int64_t> value;
  bool convert(PyObject* obj) {
    if (obj == Py_None) return true;
    int64_t v = 0;
    if (!to_int(obj, &v)) return false;
    value = v;
    return true;
  }
  std::optional<int64_t> get() const { return value; }
};
template <>
struct Arg<bool> {
  bool value = false;
  bool convert(PyObject* obj) {
    if (obj != Py_True && obj != Py_False) return false;
    value = obj == Py_True;
    return true;
  }
  bool get() const { return value; }
};
template <>
struct Arg<double> {
  double value = 0;
  bool convert(PyObject* obj) {
    if (PyFloat_CheckExact(obj)) {
      value = PyFloat_AS_DOUBLE(obj);
      return true;
    }
    int64_t v = 0;
    if (!to_int(obj, &v)) return false;
    value = static_cast<double>(v);
    return true;
  }
  double get() const { return value; }
};
template <>
struct Arg<c10::string_view> {
  c10::string_view value;  // UTF-8 kept by the str object (the caller keeps it alive)
  bool convert(PyObject* obj) {
    if (!PyUnicode_CheckExact(obj)) return false;
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
    if (data == nullptr) return false;
    value = c10::string_view(data, static_cast<size_t>(size));
    return true;
  }
  c10::string_view get() const { return value; }
};

// Converts one argument onto the boxed stack; false: not a plain form (the caller goes through
// torch.ops).
template <typename T>
bool push(PyObject* obj, torch::jit::Stack& stack) {
  Arg<T> arg;
  if (!arg.convert(obj)) return false;
  stack.emplace_back(arg.get());
  return true;
}

bool convert(Kind kind, PyObject* obj, torch::jit::Stack& stack) {
  switch (kind) {
    case Kind::kTensor:
      return push<const at::Tensor&>(obj, stack);
    case Kind::kOptionalTensor:
      return push<const std::optional<at::Tensor>&>(obj, stack);
    case Kind::kInt:
      return push<int64_t>(obj, stack);
    case Kind::kOptionalInt:
      return push<std::optional<int64_t>>(obj, stack);
    case Kind::kIntPair:
      return push<at::IntArrayRef>(obj, stack);
    case Kind::kBool:
      return push<bool>(obj, stack);
    case Kind::kFloat:
      return push<double>(obj, stack);
    case Kind::kStr:
      return push<c10::string_view>(obj, stack);
  }
  return false;
}

const c10::OperatorHandle* handle(FastOpImpl& impl, bool emulated) {
  const int i = emulated ? 1 : 0;
  if (!impl.looked_up[i]) {  // under the GIL
    const std::string qualified = std::string(emulated ? "cnnext_emu::" : "cnnext::") + impl.name;
    impl.handles[i] = c10::Dispatcher::singleton().findSchema({qualified, ""});
    impl.looked_up[i] = true;
  }
  return impl.handles[i] ? &*impl.handles[i] : nullptr;
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// Releases the GIL while the op runs, as torch's bindings do; reacquired on the way out, also
// when the op throws.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// ---- typed calls --------------------------------------------------------------------------------

// The first `count` tensors of an op's result, as the boxed path returns them.
PyObject* wrap(at::Tensor&& t, size_t /*count*/) { return THPVariable_Wrap(std::move(t)); }
template <typename... Ts>
PyObject* wrap(std::tuple<Ts...>&& result, size_t count) {
  std::array<at::Tensor*, sizeof...(Ts)> items{};
  std::apply([&](auto&... t) { items = {&t...}; }, result);
  if (count == 1) return THPVariable_Wrap(std::move(*items[0]));
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(count));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < count; ++i) {
    PyObject* item = THPVariable_Wrap(std::move(*items[i]));
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
}

template <typename Sig>
struct Typed;
template <typename R, typename... A>
struct Typed<R(A...)> {
  static PyObject* call(FastOpImpl& impl, PyObject* const* args) {
    return call(impl, args, std::index_sequence_for<A...>{});
  }

  template <size_t... I>
  static PyObject* call(FastOpImpl& impl, PyObject* const* args, std::index_sequence<I...>) {
    std::tuple<Arg<A>...> slots;
    if (!(std::get<I>(slots).convert(args[I]) && ...)) {
      if (PyErr_Occurred()) PyErr_Clear();
      return not_implemented();
    }
    if (std::get<0>(slots).get().dim() < impl.min_dim) return not_implemented();
    const bool emulated =
        emulating.load(std::memory_order_relaxed) && std::get<0>(slots).get().device().is_cpu();
    const c10::OperatorHandle* op = handle(impl, emulated);
    if (op == nullptr) return not_implemented();
    const auto typed = op->typed<R(A...)>();  // checks the signature against the kernels'
    R result;
    {
      ReleaseGil release;
      result = typed.call(std::get<I>(slots).get()...);
    }
    return wrap(std::move(result), impl.returns);
  }
};

// The ops cnnext.ops calls through FastOp, with their kernels' C++ signatures (a wrong one fails
// the first call with the dispatcher's signature error). Others take the boxed call.
using OptTensor = const std::optional<at::Tensor>&;
using Tensor = const at::Tensor&;
using Ints = at::IntArrayRef;
using Fused = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
const std::pair<const char*, Invoker> kTyped[] = {
    {"max_pool2d_with_argmax",
     &Typed<std::tuple<at::Tensor, at::Tensor>(Tensor, Ints, Ints, Ints, Ints, bool)>::call},
    {"avg_pool2d",
     &Typed<at::Tensor(Tensor, Ints, Ints, Ints, bool, bool, std::optional<int64_t>)>::call},
    {"conv2d_direct", &Typed<at::Tensor(Tensor, Tensor, OptTensor, Ints, Ints, Ints, int64_t,
                                        c10::string_view, int64_t)>::call},
    {"conv2d_im2col",
     &Typed<at::Tensor(Tensor, Tensor, OptTensor, Ints, Ints, Ints, int64_t, int64_t)>::call},
    {"conv_bn_relu",
     &Typed<Fused(Tensor, Tensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, bool,
                  double, double, Ints, Ints, Ints, int64_t, c10::string_view, int64_t)>::call},
};

PyObject* fast_op_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  FastOpImpl& impl = *reinterpret_cast<FastOp*>(self)->impl;
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  TORCH_CHECK_TYPE(kwnames == nullptr && nargs == static_cast<Py_ssize_t>(impl.kinds.size()),
                   "cnnext._C.FastOp: ", impl.name, " takes ", impl.kinds.size(),
                   " positional arguments, got ", nargs,
                   kwnames == nullptr ? "" : " and keyword arguments");
  if (at::impl::torch_function_mode_enabled()) return not_implemented();
  if (impl.typed != nullptr) return impl.typed(impl, args);
  torch::jit::Stack stack;
  stack.reserve(impl.kinds.size());
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!convert(impl.kinds[i], args[i], stack)) {
      if (PyErr_Occurred()) PyErr_Clear();
      return not_implemented();
    }
  }
  if (stack[0].toTensor().dim() < impl.min_dim) return not_implemented();
  const bool emulated =
      emulating.load(std::memory_order_relaxed) && stack[0].toTensor().device().is_cpu();
  const c10::OperatorHandle* op = handle(impl, emulated);
  if (op == nullptr) return not_implemented();
  {
    ReleaseGil release;
    op->callBoxed(stack);
  }
  if (impl.returns == 1) return THPVariable_Wrap(std::move(stack[0]).toTensor());
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(impl.returns));
  if (result == nullptr) return nullptr;
  for (size_t i = 0; i < impl.returns; ++i) {
    PyObject* item = THPVariable_Wrap(std::move(stack[i]).toTensor());
    if (item == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), item);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* fast_op_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  Py_ssize_t outputs = -1;
  Py_ssize_t min_dim = 0;
  static const char* keywords[] = {"name", "outputs", "min_dim", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "s|nn", const_cast<char**>(keywords), &name,
                                   &outputs, &min_dim)) {
    return nullptr;
  }
  auto impl = std::make_unique<FastOpImpl>();
  impl->name = name;
  impl->min_dim = min_dim;
  const auto op = c10::Dispatcher::singleton().findSchema({"cnnext::" + impl->name, ""});
  TORCH_CHECK_VALUE(op.has_value(), "cnnext._C.FastOp: no op cnnext::", impl->name);
  const c10::FunctionSchema& schema = op->schema();
  for (const c10::Argument& arg : schema.arguments()) {
    impl->kinds.push_back(kind_of(arg, impl->name));
  }
  TORCH_CHECK_VALUE(!impl->kinds.empty() && impl->kinds[0] == Kind::kTensor,
                    "cnnext._C.FastOp: ", impl->name, ": the first argument must be a tensor");
  for (const c10::Argument& ret : schema.returns()) {
    TORCH_CHECK_VALUE(ret.type()->kind() == c10::TypeKind::TensorType,
                      "cnnext._C.FastOp: ", impl->name, ": every return must be a tensor");
  }
  impl->returns = schema.returns().size();
  for (const auto& [op_name, invoker] : kTyped) {
    if (impl->name == op_name) impl->typed = invoker;
  }
  TORCH_CHECK_VALUE(impl->returns > 0, "cnnext._C.FastOp: ", impl->name, " returns nothing");
  // outputs=k: only the first k returns (the others are dropped in C++, never wrapped).
  if (outputs != -1) {
    TORCH_CHECK_VALUE(outputs >= 1 && static_cast<size_t>(outputs) <= impl->returns,
                      "cnnext._C.FastOp: ", impl->name, " has ", impl->returns,
                      " returns, asked for ", outputs);
    impl->returns = static_cast<size_t>(outputs);
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  auto* fast = reinterpret_cast<FastOp*>(self);
  fast->vectorcall = fast_op_call;
  fast->impl = impl.release();
  return self;
  END_HANDLE_TH_ERRORS
}

void fast_op_dealloc(PyObject* self) {
  delete reinterpret_cast<FastOp*>(self)->impl;
  Py_TYPE(self)->tp_free(self);
}

PyObject* fast_op_repr(PyObject* self) {
  const FastOpImpl& impl = *reinterpret_cast<FastOp*>(self)->impl;
  return PyUnicode_FromFormat("<cnnext._C.FastOp %s%s>", impl.name.c_str(),
                              impl.typed != nullptr ? " (typed)" : "");
}

PyObject* set_emulating(PyObject* /*module*/, PyObject* flag) {
  const int on = PyObject_IsTrue(flag);
  if (on < 0) return nullptr;
  emulating.store(on != 0, std::memory_order_relaxed);
  Py_RETURN_NONE;
}

PyTypeObject fast_op_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyMethodDef methods[] = {
    {"_set_emulating", set_emulating, METH_O,
     "Whether FastOp calls on CPU tensors go to cnnext_emu (mirrors cnnext.emulate_cuda)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace cnnext

// Called by PyInit__C (csrc/cnnext.cpp): adds FastOp and _set_emulating to the module.
bool cnnext_add_fast_call(PyObject* module) {
  using namespace cnnext;
  fast_op_type.tp_name = "cnnext._C.FastOp";
  fast_op_type.tp_basicsize = sizeof(FastOp);
  fast_op_type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  fast_op_type.tp_doc =
      "FastOp(name, outputs=all, min_dim=0): a lean binding of cnnext::name (see "
      "csrc/fast_call.cpp)";
  fast_op_type.tp_new = fast_op_new;
  fast_op_type.tp_dealloc = fast_op_dealloc;
  fast_op_type.tp_repr = fast_op_repr;
  fast_op_type.tp_call = PyVectorcall_Call;
  fast_op_type.tp_vectorcall_offset = offsetof(FastOp, vectorcall);
  if (PyType_Ready(&fast_op_type) < 0) return false;
  Py_INCREF(&fast_op_type);
  if (PyModule_AddObject(module, "FastOp", reinterpret_cast<PyObject*>(&fast_op_type)) < 0) {
    return false;
  }
  return PyModule_AddFunctions(module, methods) == 0;
}
