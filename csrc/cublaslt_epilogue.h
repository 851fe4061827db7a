// The cuBLASLt fast path for the forward: one GEMM whose epilogue adds the bias and applies the
// activation (and writes GELU's pre-activation as the aux output). Kept in its own .cu so the
// rest of the CUDA code compiles without cuBLAS headers (see scripts/check_cuda.sh).
#pragma once

#include <ATen/core/Tensor.h>

#include "fused_linear.h"

namespace partlab {

// Whether the epilogue path can run these tensors: fp32/fp16/bf16, 16-byte aligned pointers and
// leading dimensions (a TP bias shard at an odd offset is not), non-empty.
bool cublaslt_supported(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                        const at::Tensor& aux, Activation act);

// out = act(x @ weight^T + bias) on the current stream; for GELU with a non-empty aux, also
// aux = the pre-activation.
// Returns false (nothing written) when cuBLASLt finds no algorithm or reports an error, so the
// caller can fall back to GEMM + the hand-written epilogue kernel.
bool cublaslt_fused_linear(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::Tensor& out,
                           at::Tensor& aux, Activation act);

}  // namespace partlab
