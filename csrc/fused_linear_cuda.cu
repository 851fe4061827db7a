// CUDA kernels for partlab::fused_linear and partlab::fused_linear_backward.
//
// Forward: cuBLASLt with a bias+activation epilogue when the tensors allow it (see
// cublaslt_epilogue.cu); otherwise (a bias slice at an unaligned offset, float64, no algorithm
// found) a plain GEMM into the output followed by bias_act_kernel: one pass that adds the bias,
// keeps GELU's pre-activation and applies the activation in place. Each forward records its
// path (partlab.ops.forward_paths); a refusal by cuBLASLt itself also warns, once.
// Backward: the epilogues cannot help (DRELU/DGELU_BGRAD apply to a matmul's output, but our
// activation gradient comes straight from grad_out), so act_grad_bias_kernel computes
// grad_pre = grad_out * act'(saved) and the bias-gradient column sums in one pass; the two
// GEMMs (grad_x = grad_pre @ W, grad_W = grad_pre^T @ x) go to cuBLAS through ATen.
// Everything runs on the current stream of the inputs' device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "cublaslt_epilogue.h"
#include "fused_linear.h"

namespace partlab {
namespace {

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in T = float or
// double (the op-math type: bf16/fp16 are computed in float).
template <typename T>
__device__ __forceinline__ T gelu_tanh(T v) {
  const T k0 = T(0.7978845608028654), k1 = T(0.044715);
  const T u = k0 * (v + k1 * v * v * v);
  return T(0.5) * v * (T(1) + tanh(u));
}

template <typename T>
__device__ __forceinline__ T gelu_tanh_grad(T v) {
  const T k0 = T(0.7978845608028654), k1 = T(0.044715);
  const T u = k0 * (v + k1 * v * v * v);
  const T t = tanh(u);
  const T du = k0 * (T(1) + T(3) * k1 * v * v);
  return T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * du;
}

template <typename T>
using opmath = std::conditional_t<std::is_same<T, double>::value, double, float>;

// y[m, n] += bias[n] (bias may be null or at any alignment), then the activation.
// GELU keeping its pre-activation: `pre` holds the GEMM output and gets pre + bias, `out` gets
// GELU of that. Otherwise pre == out (no __restrict__: they may alias), updated in place.
template <typename scalar_t, int kAct>
__global__ void bias_act_kernel(scalar_t* pre, scalar_t* out,
                                const scalar_t* __restrict__ bias, int64_t numel, int64_t N) {
  using acc_t = opmath<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    acc_t v = static_cast<acc_t>(pre[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[i % N]);
    if (kAct == static_cast<int>(Activation::Gelu)) {
      pre[i] = static_cast<scalar_t>(v);
      out[i] = static_cast<scalar_t>(gelu_tanh(v));
    } else if (kAct == static_cast<int>(Activation::Relu)) {
      out[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // NaN propagates
    } else {
      out[i] = static_cast<scalar_t>(v);
    }
  }
}

// grad_pre = grad_out * act'(saved), and partial[blockIdx.y, n] = sum of grad_pre over this
// block's rows. Threads: x along columns (coalesced), y along rows; a shared-memory tree over y.
// saved = out for ReLU (out > 0 <=> pre > 0), the pre-activation for GELU.
constexpr int kColThreads = 32;
constexpr int kRowThreads = 8;

template <typename scalar_t, int kAct>
__global__ void act_grad_bias_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ saved,
                                     scalar_t* __restrict__ grad_pre,
                                     opmath<scalar_t>* __restrict__ partial,
                                     int64_t M, int64_t N) {
  using acc_t = opmath<scalar_t>;
  __shared__ acc_t sums[kRowThreads][kColThreads + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  acc_t acc = 0;
  if (col < N) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowThreads + threadIdx.y; row < M;
         row += static_cast<int64_t>(gridDim.y) * kRowThreads) {
      const int64_t i = row * N + col;
      const acc_t g = static_cast<acc_t>(grad_out[i]);
      const acc_t s = static_cast<acc_t>(saved[i]);
      acc_t d;
      if (kAct == static_cast<int>(Activation::Relu)) {
        d = s > acc_t(0) ? g : acc_t(0);
      } else {
        d = g * gelu_tanh_grad(s);
      }
      grad_pre[i] = static_cast<scalar_t>(d);
      acc += static_cast<acc_t>(static_cast<scalar_t>(d));  // sum what the GEMMs will see
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) sums[threadIdx.y][threadIdx.x] += sums[threadIdx.y + half][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && col < N && partial != nullptr) {
    partial[static_cast<int64_t>(blockIdx.y) * N + col] = sums[0][threadIdx.x];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// PARTLAB_REQUIRE_CUBLASLT=1 turns every fallback into an error (tests and benchmarks that must
// time the epilogue path). Read on each call, so a test can set it for one block.
bool require_cublaslt() {
  const char* value = std::getenv("PARTLAB_REQUIRE_CUBLASLT");
  return value != nullptr && std::string(value) == "1";
}

std::tuple<at::Tensor, at::Tensor> fused_linear_cuda(const at::Tensor& x,
                                                     const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias,
                                                     c10::string_view activation,
                                                     bool save_pre) {
  const Activation act = parse_activation(activation);
  check_forward(x, weight, bias, c10::DeviceType::CUDA);
  const bool keep_pre = act == Activation::Gelu && save_pre;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor saved = keep_pre ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  if (out.numel() == 0) return {out, saved};

  std::string reason = cublaslt_ineligible(x, bias, saved, act);
  if (reason.empty()) {
    reason = cublaslt_fused_linear(x, weight, bias, out, saved, act);
    if (reason.empty()) {
      record_forward_path(ForwardPath::CublasLt, "");
      return {out, saved};
    }
    TORCH_WARN_ONCE("partlab::fused_linear: cuBLASLt refused the epilogue (", reason,
                    "); using a GEMM and the hand-written epilogue kernel instead");
  }
  record_forward_path(ForwardPath::Fallback, reason);
  TORCH_CHECK(!require_cublaslt(), "partlab::fused_linear: PARTLAB_REQUIRE_CUBLASLT=1 but the "
              "cuBLASLt epilogue was not used: ", reason);
  // Fallback: GEMM (cuBLAS via ATen, current stream) into pre, then one epilogue pass.
  at::Tensor pre = keep_pre ? saved : out;
  at::mm_out(pre, x, weight.t());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(out.numel(), threads), 65535);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_act", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* p = pre.mutable_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    switch (act) {
      case Activation::Relu:
        bias_act_kernel<scalar_t, static_cast<int>(Activation::Relu)>
            <<<blocks, threads, 0, stream>>>(p, o, b, out.numel(), N);
        break;
      case Activation::Gelu:
        bias_act_kernel<scalar_t, static_cast<int>(Activation::Gelu)>
            <<<blocks, threads, 0, stream>>>(p, o, b, out.numel(), N);
        break;
      case Activation::None:
        bias_act_kernel<scalar_t, static_cast<int>(Activation::None)>
            <<<blocks, threads, 0, stream>>>(p, o, b, out.numel(), N);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  check_backward(grad_out, x, weight, saved, act, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto opts = x.options();
  at::Tensor gx = output_mask[0] ? at::empty({M, K}, opts) : at::empty({0}, opts);
  at::Tensor gw = output_mask[1] ? at::empty({N, K}, opts) : at::empty({0}, opts);
  at::Tensor gb = output_mask[2] ? at::empty({N}, opts) : at::empty({0}, opts);
  at::Tensor grad_pre = grad_out;
  if (M == 0 || N == 0 || act == Activation::None) {
    if (output_mask[2]) at::sum_out(gb, grad_out, {0});
  } else {
    grad_pre = at::empty({M, N}, opts);
    const dim3 block(kColThreads, kRowThreads);
    const int64_t gx_blocks = ceil_div(N, kColThreads);
    // Enough row-blocks to fill the GPU, each thread summing at least ~32 rows.
    const int64_t gy = std::max<int64_t>(
        1, std::min<int64_t>({ceil_div(M, kRowThreads * 32), 1024, 65535}));
    const dim3 grid(static_cast<unsigned>(gx_blocks), static_cast<unsigned>(gy));
    at::Tensor partial;
    if (output_mask[2]) {
      partial = at::empty({gy, N}, opts.dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                               : at::kFloat));
    }
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "act_grad_bias",
                                    [&] {
      using acc_t = opmath<scalar_t>;
      acc_t* part = output_mask[2] ? partial.mutable_data_ptr<acc_t>() : nullptr;
      if (act == Activation::Relu) {
        act_grad_bias_kernel<scalar_t, static_cast<int>(Activation::Relu)>
            <<<grid, block, 0, stream>>>(grad_out.const_data_ptr<scalar_t>(),
                                         saved.const_data_ptr<scalar_t>(),
                                         grad_pre.mutable_data_ptr<scalar_t>(), part, M, N);
      } else {
        act_grad_bias_kernel<scalar_t, static_cast<int>(Activation::Gelu)>
            <<<grid, block, 0, stream>>>(grad_out.const_data_ptr<scalar_t>(),
                                         saved.const_data_ptr<scalar_t>(),
                                         grad_pre.mutable_data_ptr<scalar_t>(), part, M, N);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // Deterministic second stage: sum the [gy, N] partials (op-math dtype) and cast.
    if (output_mask[2]) gb.copy_(partial.sum(0));
  }
  if (output_mask[0]) at::mm_out(gx, grad_pre, weight);
  if (output_mask[1]) at::mm_out(gw, grad_pre.t(), x);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(partlab, CUDA, m) {
  m.impl("fused_linear", &fused_linear_cuda);
  m.impl("fused_linear_backward", &fused_linear_backward_cuda);
}

}  // namespace partlab
