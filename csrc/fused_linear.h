// partlab fused linear: shared declarations and input checks for the CPU and CUDA kernels.
//
//   fused_linear(x[M,K], weight[N,K], bias[N]?, activation) -> (out[M,N], saved)
//     out = act(x @ weight^T + bias); saved = the pre-activation for "gelu" when save_pre (what
//     its backward needs), an empty tensor otherwise (ReLU's backward reads the mask from `out`
//     itself: out > 0 <=> pre > 0; inference passes save_pre=false and skips a write).
//   fused_linear_backward(grad_out[M,N], x, weight, saved, activation, output_mask[3])
//     -> (grad_input[M,K], grad_weight[N,K], grad_bias[N]); `saved` is what the forward kept
//     (out for relu/none, the pre-activation for gelu); masked-out gradients are empty tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace partlab {

enum class Activation { None, Relu, Gelu };

// Which CUDA forward ran: the cuBLASLt epilogue, or a GEMM then bias_act_kernel (ops.cpp counts
// them for partlab.ops.forward_paths; the reason is why the epilogue was not used).
enum class ForwardPath { CublasLt = 0, Fallback = 1 };
void record_forward_path(ForwardPath path, const std::string& reason);

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "none") return Activation::None;
  TORCH_CHECK_VALUE(false, "partlab::fused_linear: unknown activation '", std::string(name),
                    "' (expected 'relu', 'gelu' (tanh approximation) or 'none')");
  return Activation::None;  // unreachable
}

inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "partlab::fused_linear: ", a_name, " is on ", a.device(),
              " but ", b_name, " is on ", b.device(), "; move them to one device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "partlab::fused_linear: ", a_name, " is ",
              a.scalar_type(), " but ", b_name, " is ", b.scalar_type(),
              "; cast them to one dtype");
}

inline void check_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 2, "partlab::fused_linear: x must be 2-D [M, K], got ", x.dim(),
              "-D ", x.sizes(), " (partlab.ops.fused_linear flattens leading dims)");
  TORCH_CHECK(weight.dim() == 2, "partlab::fused_linear: weight must be 2-D [N, K], got ",
              weight.dim(), "-D ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "partlab::fused_linear: x is ", x.sizes(),
              " and weight is ", weight.sizes(), ": in_features differ (", x.size(1), " vs ",
              weight.size(1), ")");
  TORCH_CHECK(x.device().type() == device, "partlab::fused_linear: expected ", device,
              " tensors, got x on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "partlab::fused_linear: expected a floating dtype, got ", x.scalar_type());
  check_same(x, "x", weight, "weight");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(),
              "partlab::fused_linear: x and weight must be contiguous (call .contiguous())");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0),
                "partlab::fused_linear: bias must be 1-D of size out_features=", weight.size(0),
                ", got ", b.sizes());
    check_same(x, "x", b, "bias");
    TORCH_CHECK(b.is_contiguous(), "partlab::fused_linear: bias must be contiguous");
  }
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight, const at::Tensor& saved, Activation act,
                           c10::DeviceType device) {
  check_forward(x, weight, c10::nullopt, device);
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == N,
              "partlab::fused_linear_backward: grad_out must be [", M, ", ", N, "], got ",
              grad_out.sizes());
  check_same(x, "x", grad_out, "grad_out");
  TORCH_CHECK(grad_out.is_contiguous(),
              "partlab::fused_linear_backward: grad_out must be contiguous");
  if (act != Activation::None) {
    TORCH_CHECK(saved.sizes() == grad_out.sizes(),
                "partlab::fused_linear_backward: saved activation tensor must be [", M, ", ", N,
                "], got ", saved.sizes(), " (GELU needs the forward's save_pre=True)");
    check_same(x, "x", saved, "saved");
    TORCH_CHECK(saved.is_contiguous(), "partlab::fused_linear_backward: saved must be contiguous");
  }
}

}  // namespace partlab
