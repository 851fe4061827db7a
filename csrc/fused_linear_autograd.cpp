// Autograd for partlab::fused_linear, in C++ so that a call costs what an ATen op costs: the
// forward runs the device kernel below autograd and keeps what the backward needs (the output
// as ReLU's mask, since out > 0 exactly where pre > 0; GELU's pre-activation); the backward is
// the op fused_linear_backward, which never recomputes the GEMM. No double backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "fused_linear.h"

namespace partlab {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                c10::string_view activation, bool save_pre) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("partlab::fused_linear", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           c10::string_view, bool)>();
  return op.call(x, weight, bias, activation, save_pre);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("partlab::fused_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_out, x, weight, saved, activation, mask);
}

class FusedLinear : public torch::autograd::Function<FusedLinear> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               c10::string_view activation, bool save_pre) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, pre] = call_forward(x, weight, bias, activation, save_pre);
    const bool gelu = parse_activation(activation) == Activation::Gelu;
    ctx->save_for_backward({x, weight, gelu ? pre : out});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({pre});
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges follow the tensor arguments that were given: x, weight, then bias if any.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    auto [gx, gw, gb] = call_backward(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                      ctx->saved_data["activation"].toStringRef(), mask);
    const at::Tensor none;
    return {mask[0] ? gx : none, mask[1] ? gw : none, mask[2] ? gb : none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor> fused_linear_autograd(const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         c10::string_view activation,
                                                         bool save_pre) {
  auto outputs = FusedLinear::apply(x, weight, bias, activation, save_pre);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(partlab, Autograd, m) {
  m.impl("fused_linear", &fused_linear_autograd);
}

}  // namespace partlab
