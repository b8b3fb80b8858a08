// What every family's autograd node shares (the nodes themselves close each family header, in
// its CNNEXT_AUTOGRAD block; csrc/cnnext.cpp defines CNNEXT_AUTOGRAD, includes the headers and
// registers each node's forward for its op's Autograd key, in this build's namespace: cnnext in
// _C, cnnext_emu in _C_emu).
//
// A node is a hand-written torch::autograd::Node, as torch's generated VariableType code makes
// them: edges to the differentiable inputs, the outputs' history, saved tensors as SavedVariables
// and the rest as plain members. torch::autograd::Function does the same through a generic
// context (a string-keyed IValue map, per-input bookkeeping), which cost ~5 us per call on a tiny
// layer. Forward runs the op below autograd; backward calls the family's registered backward op,
// so each backend's backward kernel serves as it is. Without a gradient to record (grad mode off,
// or no input requiring one) the op runs directly, with no node.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/node.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/library.h"

namespace cnnext::autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// The typed handle of `name` in this build's namespace. The signature must be the kernels'
// exactly (the dispatcher checks it).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  const std::string qualified = std::string(CNNEXT_NS_NAME "::") + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Sig>();
}

// Calls `op` below autograd (from an autograd kernel, calling it normally would come back here).
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// Calls a backward op. Under create_graph the op goes through the dispatcher's autograd fallback
// (no double backward), as any op without a derivative; otherwise straight to its kernel.
template <typename Sig, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (c10::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

// ---- the node base: eager and compiled autograd ---------------------------------------------

// A node's backward is `Self::run(grads, needs)` (needs: c10::ArrayRef<bool>): needs[i] says
// whether input i's gradient is wanted. Eager autograd calls apply (needs from
// task_should_compute_output). Compiled autograd (torch._dynamo.compiled_autograd) calls
// apply_with_saved: the node's fields go into the captured graph as a call of `functional`, which
// rebuilds the fields and runs the same `run` (Dynamo traces through it: the backward op is
// recorded, its fake kernel gives the shapes), as torch's own C++ autograd functions are lifted. A
// node lists every member its backward reads in `Self::visit(self, f)`: they key the captured graph
// (compiled_args), are swapped for the capture's proxies (saved tensors) and packed, in that order;
// the saved tensors among them are also what release_variables frees.
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;

namespace detail {
// Calls f on each leaf of a member: the elements of arrays and tuples, the member otherwise.
template <typename T, typename F>
void leaves(T& v, F&& f) {
  f(v);
}
template <typename T, size_t N, typename F>
void leaves(std::array<T, N>& v, F&& f) {
  for (T& x : v) leaves(x, f);
}
template <typename T, size_t N, typename F>
void leaves(const std::array<T, N>& v, F&& f) {
  for (const T& x : v) leaves(x, f);
}
template <typename... T, typename F>
void leaves(std::tuple<T...>& v, F&& f) {
  std::apply([&](auto&... x) { (leaves(x, f), ...); }, v);
}
template <typename... T, typename F>
void leaves(const std::tuple<T...>& v, F&& f) {
  std::apply([&](const auto&... x) { (leaves(x, f), ...); }, v);
}

inline void collect(CompiledNodeArgs& args, const SavedVariable& v) {
  args.collect(v, /*is_output=*/false);  // as `save` below stores them
}
template <typename T>
void collect(CompiledNodeArgs& args, const T& v) {
  args.collect(v);
}

// Only saved tensors are swapped; plain values keep theirs (they key the graph).
inline void swap(SwapSavedVariables& saved, SavedVariable& v, bool before) {
  before ? saved.before(v) : saved.after(v);
}
template <typename T>
void swap(SwapSavedVariables& /*saved*/, const T& /*v*/, bool /*before*/) {}

inline void release(SavedVariable& v) { v.reset_data(); }
template <typename T>
void release(const T& /*v*/) {}

using Packed = std::vector<c10::IValue>;
inline void pack(Packed& out, const SavedVariable& v) { out.emplace_back(v.unpack()); }
template <typename T>
void pack(Packed& out, const T& v) {
  out.emplace_back(v);
}

struct Unpacker {
  const Packed& args;
  size_t next = 0;
  const c10::IValue& take() { return args.at(next++); }
  void operator()(SavedVariable& v) {
    const c10::IValue& x = take();
    v = SavedVariable(x.isTensor() ? x.toTensor() : at::Tensor(), /*is_output=*/false);
  }
  void operator()(std::vector<int64_t>& v) { v = take().toIntVector(); }
  void operator()(int64_t& v) { v = take().toInt(); }
  void operator()(bool& v) { v = take().toBool(); }
  void operator()(std::string& v) { v = take().toStringRef(); }
  void operator()(std::optional<int64_t>& v) {
    const c10::IValue& x = take();
    v = x.isNone() ? std::nullopt : std::optional<int64_t>(x.toInt());
  }
};
}  // namespace detail

template <typename Self>
struct CompiledNode : Node {
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<const Self&>(*this).run(std::move(grads), needs());
  }
  // Frees the saved tensors once backward has run (unless the graph is retained).
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    each(static_cast<Self&>(*this), [](auto& f) { detail::release(f); });
  }
  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(name());
    each(static_cast<const Self&>(*this), [&](const auto& f) { detail::collect(args, f); });
  }
  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    auto& self = static_cast<Self&>(*this);
    each(self, [&](auto& f) { detail::swap(saved, f, /*before=*/true); });
    detail::Packed args;
    each(static_cast<const Self&>(self), [&](const auto& f) { detail::pack(args, f); });
    c10::List<bool> wanted;
    for (const bool b : needs()) wanted.push_back(b);
    args.emplace_back(std::move(wanted));
    std::vector<at::TypePtr> schema;
    for (const c10::IValue& a : args)
      schema.push_back(a.isTensor() ? at::TensorType::get() : a.type());
    namespace ca = torch::dynamo::autograd;
    const auto& py = ca::getPyCompilerInterface();
    const std::string fn = py->bind_function(saved.get_py_compiler(), name(), &functional, schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    const c10::IValue metadata =
        ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            ca::get_input_metadata(next_edges()));
    variable_list result =
        py->call_function(saved.get_py_compiler(), "apply_functional", fn, grads, args, metadata);
    each(self, [&](auto& f) { detail::swap(saved, f, /*before=*/false); });
    return result;
  }

 private:
  // Every leaf of every member `visit` lists, in order.
  template <typename S, typename F>
  static void each(S& self, F&& f) {
    Self::visit(self, [&](auto& member) { detail::leaves(member, f); });
  }
  // On the stack: eager backward calls this once per node (a heap vector showed in host cost).
  c10::SmallVector<bool, 8> needs() const {
    c10::SmallVector<bool, 8> out(num_outputs());
    for (size_t i = 0; i < out.size(); ++i) out[i] = task_should_compute_output(i);
    return out;
  }
  static variable_list functional(const variable_list& grads, const detail::Packed& args) {
    Self node;
    detail::Unpacker unpack{args};
    each(node, unpack);
    const c10::List<bool> wanted = unpack.take().toBoolList();
    c10::SmallVector<bool, 8> needs(wanted.begin(), wanted.end());
    return node.run(variable_list(grads), needs);
  }
};

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptionalTensor& t) { return t && requires_grad(*t); }
inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }
inline bool has_tangent(const OptionalTensor& t) { return t && has_tangent(*t); }

// Whether a call must record a node. Forward-mode AD has no formula here: a tangent is refused
// rather than dropped.
template <typename... Ts>
bool wants_grad(const char* op, const Ts&... tensors) {
  CNNEXT_CHECK(!(has_tangent(tensors) || ...), op,
               "forward-mode AD (a dual tensor argument) is not supported");
  return c10::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// A new node of type N with edges to `inputs` (an absent or undefined one: an empty edge, so
// edge i is always argument i).
template <typename N, typename... Ts>
c10::intrusive_ptr<N> make_node(const Ts&... inputs) {
  auto node = c10::make_intrusive<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Attaches `output` to `node` (its first and only differentiable output) and announces the node
// (torch.autograd.graph's creation hooks), once everything it saves is stored.
inline void finish_node(const c10::intrusive_ptr<Node>& node, const at::Tensor& output) {
  torch::autograd::set_history(output, node);
  torch::autograd::fire_node_creation_hooks(node);
}

inline SavedVariable save(const at::Tensor& t) { return SavedVariable(t, /*is_output=*/false); }
inline SavedVariable save(const OptionalTensor& t) {
  return t && t->defined() ? save(*t) : SavedVariable();
}

using Pair = std::array<int64_t, 2>;
inline std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// `grad` with the forward output's strides. The backward ops give the gradient the layout of
// grad_output, which autograd may hand over contiguous; the forward output's strides carry the
// input's layout, so the gradient takes it, as torch's does. (Strides, not memory formats:
// .contiguous(format) keeps ambiguous strides such as those of an [N, C, 1, 1] gradient.)
inline at::Tensor like_output(const at::Tensor& grad, at::IntArrayRef output_stride) {
  if (grad.strides() == output_stride) return grad;
  return at::empty_strided(grad.sizes(), output_stride, grad.options()).copy_(grad);
}

// A stand-in for a tensor that was not saved: the backward ops read only its metadata.
inline at::Tensor placeholder(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::zeros({}, like.options()).expand(sizes);
}

// ---- convolution (csrc/conv2d_direct, csrc/conv2d_im2col) ---------------------------------------

// The two convolution families differ only in their op names and in the arguments after groups
// (Family::Extras, a std::tuple of their types; the node keeps each as StoredAs<T>): the direct
// kernels' variant and column-buffer bound (its CPU backward's non-finite fallback runs im2col),
// im2col's bound. Each family header names its own (its CNNEXT_AUTOGRAD block).
template <typename T>
struct StoredAs {
  using type = T;
};
template <>
struct StoredAs<c10::string_view> {
  using type = std::string;
};

template <typename Family, typename Extras = typename Family::Extras>
struct ConvAutograd;

// Saves the input only if the weight needs a gradient and the weight only if the input does; a
// tensor not saved reaches the backward op as a placeholder of the right shape (the ops read
// `input` only for output_mask[1] and `weight` only for output_mask[0]). The mask is what this
// backward pass asks for (torch.autograd.grad(out, x) computes no weight gradient). Edges:
// input, weight, bias (empty without one).
template <typename Family, typename... Extra>
struct ConvAutograd<Family, std::tuple<Extra...>> {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, Extra...);
  using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
      at::IntArrayRef, int64_t, std::array<bool, 3>, Extra...);

  struct Backward : CompiledNode<Backward> {
    SavedVariable input, weight;
    std::vector<int64_t> input_size, weight_size, stride, padding, dilation;
    int64_t groups = 1;
    bool has_bias = false;
    std::tuple<typename StoredAs<Extra>::type...> extra{};

    template <typename Self, typename F>
    static void visit(Self& s, F&& f) {
      f(s.input), f(s.weight), f(s.input_size), f(s.weight_size), f(s.stride), f(s.padding);
      f(s.dilation), f(s.groups), f(s.has_bias), f(s.extra);
    }

    std::string name() const override { return Family::kNode; }
    variable_list run(variable_list&& grads, c10::ArrayRef<bool> needs) const {
      if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
      static const auto op = find_op<BackwardSig>(Family::kBackward);
      const at::Tensor& grad = grads[0];
      const std::array<bool, 3> mask = {needs[0], needs[1], has_bias && needs[2]};
      at::Tensor x = input.unpack(), w = weight.unpack();
      if (!x.defined()) x = placeholder(grad, input_size);
      if (!w.defined()) w = placeholder(grad, weight_size);
      auto [grad_input, grad_weight, grad_bias] = std::apply(
          [&](const auto&... e) {
            return call_backward(op, grad, x, w, stride, padding, dilation, groups, mask,
                                 Extra(e)...);
          },
          extra);
      return {mask[0] ? grad_input : at::Tensor(), mask[1] ? grad_weight : at::Tensor(),
              mask[2] ? grad_bias : at::Tensor()};
    }
  };

  // The forward's Autograd kernel.
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& weight,
                            const OptionalTensor& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            Extra... extra) {
    static const auto op = find_op<Sig>(Family::kForward);
    if (!wants_grad(Family::kForward, input, weight, bias)) {
      return call_below_autograd(op, input, weight, bias, stride, padding, dilation, groups,
                                 extra...);
    }
    auto node = make_node<Backward>(input, weight, bias);
    at::Tensor output =
        call_below_autograd(op, input, weight, bias, stride, padding, dilation, groups, extra...);
    if (weight.requires_grad()) node->input = save(input);
    if (input.requires_grad()) node->weight = save(weight);
    node->input_size = input.sizes().vec();
    node->weight_size = weight.sizes().vec();
    node->stride = stride.vec();
    node->padding = padding.vec();
    node->dilation = dilation.vec();
    node->groups = groups;
    node->has_bias = bias.has_value() && bias->defined();
    node->extra = std::make_tuple(typename StoredAs<Extra>::type(extra)...);
    finish_node(node, output);
    return output;
  }
};

}  // namespace cnnext::autograd
