// The cuBLASLt fast path for the forward: one GEMM whose epilogue adds the bias and applies the
// activation (and writes GELU's pre-activation as the aux output). The only code that includes
// <cublasLt.h>.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "fused_linear.h"

namespace partlab {

// Why the epilogue path cannot take these tensors, or "" when it can: fp32/fp16/bf16 only, a
// 16-byte aligned bias (a TP shard at an odd offset is not), GELU's aux with ld % 8 == 0.
std::string cublaslt_ineligible(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& aux, Activation act);

// out = act(x @ weight^T + bias) on the current stream; for GELU with a non-empty aux, also
// aux = the pre-activation. Returns "" on success, else why cuBLASLt refused (no algorithm for
// these alignments, or an error status), with nothing written, so the caller can fall back.
std::string cublaslt_fused_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::Tensor& out,
                                  at::Tensor& aux, Activation act);

}  // namespace partlab
