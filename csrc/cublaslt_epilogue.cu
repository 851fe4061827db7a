// cuBLASLt matmul with a bias + activation epilogue (see cublaslt_epilogue.h).
//
// Layout: PyTorch is row-major, cuBLASLt column-major. Row-major out[M, N] is column-major
// out^T[N, M] = weight[N, K] (column-major view of row-major weight is weight^T[K, N], so op T)
// times x^T[K, M] (column-major view of row-major x, op N). The epilogue's bias is indexed by the
// rows of D, i.e. by N = out_features, and broadcast over the M columns: exactly a linear bias.
#include "cublaslt_epilogue.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

namespace partlab {
namespace {

constexpr int kMaxDevices = 64;

cublasLtHandle_t lt_handle(int device) {
  // One handle per device, created on first use and kept for the life of the process.
  static std::mutex mu;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "partlab: device index ", device,
              " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (handles[device] == nullptr) {
    TORCH_CHECK(cublasLtCreate(&handles[device]) == CUBLAS_STATUS_SUCCESS,
                "partlab: cublasLtCreate failed");
  }
  return handles[device];
}

// Hopper (and newer) kernels want a 32 MiB workspace; 4 MiB is plenty before (PyTorch's sizes).
size_t workspace_bytes(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9 ? (32u << 20) : (4u << 20);
}

// The largest power of two (up to 256) dividing the address: what cuBLASLt may assume. Its
// default is 256, while a row view such as a pipeline microbatch guarantees far less.
uint32_t alignment(const void* ptr) {
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  uint32_t bytes = 1;
  while (bytes < 256 && address % (2 * bytes) == 0) bytes *= 2;
  return bytes;
}

cudaDataType_t lt_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    default: return CUDA_R_16BF;
  }
}

// RAII owners for the descriptors, so every early return releases them.
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Evaluate a cuBLASLt call; on failure return its status as the refusal reason.
#define LT_OK(expr)                                                                 \
  do {                                                                              \
    const cublasStatus_t status_ = (expr);                                          \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                         \
      return std::string("a cuBLASLt call (cublaslt_epilogue.cu:") +                \
             std::to_string(__LINE__) + ") returned " + cublasLtGetStatusString(status_); \
    }                                                                               \
  } while (0)

cublasLtEpilogue_t epilogue_for(Activation act, bool has_bias, bool with_aux) {
  switch (act) {
    case Activation::Relu:
      return has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    case Activation::Gelu:
      if (with_aux) return has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      return has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    case Activation::None:
      break;
  }
  return has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

std::string cublaslt_ineligible(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& aux, Activation act) {
  const auto t = x.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) {
    return std::string("no cuBLASLt epilogue for ") + c10::toString(t);
  }
  if (x.size(1) == 0) return "in_features is 0: nothing to multiply";
  if (bias.has_value() && alignment(bias->data_ptr()) < 16) {
    return "the bias is not 16-byte aligned (a slice at an offset)";
  }
  if (act == Activation::Gelu && aux.numel() > 0 &&
      (alignment(aux.data_ptr()) < 16 || aux.size(1) % 8 != 0)) {
    return "GELU's saved pre-activation needs 16-byte alignment and out_features % 8 == 0";
  }
  return "";
}

std::string cublaslt_fused_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::Tensor& out,
                                  at::Tensor& aux, Activation act) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const cudaDataType_t dt = lt_dtype(x.scalar_type());
  const bool fp32 = x.scalar_type() == at::kFloat;
  const cublasComputeType_t compute =
      fp32 && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                    : CUBLAS_COMPUTE_32F;
  const bool has_bias = bias.has_value();
  const bool with_aux = act == Activation::Gelu && aux.numel() > 0;
  const cublasLtEpilogue_t epilogue = epilogue_for(act, has_bias, with_aux);

  Desc desc;
  LT_OK(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F));
  const cublasOperation_t trans = CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans,
                                       sizeof(trans)));
  LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans,
                                       sizeof(no_trans)));
  LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                       sizeof(epilogue)));
  if (has_bias) {
    const void* bias_ptr = bias->data_ptr();
    LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                         sizeof(bias_ptr)));
    LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt,
                                         sizeof(dt)));
  }
  if (with_aux) {
    void* aux_ptr = aux.data_ptr();
    const int64_t aux_ld = N;  // aux is row-major [M, N] = column-major [N, M], like out
    LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                         &aux_ptr, sizeof(aux_ptr)));
    LT_OK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld,
                                         sizeof(aux_ld)));
  }
  // A = weight as column-major [K, N] (op T -> [N, K]); B = x as column-major [K, M]; D = [N, M].
  LT_OK(cublasLtMatrixLayoutCreate(&desc.a, dt, K, N, K));
  LT_OK(cublasLtMatrixLayoutCreate(&desc.b, dt, K, M, K));
  LT_OK(cublasLtMatrixLayoutCreate(&desc.d, dt, N, M, N));

  const int device = x.get_device();
  const size_t ws_bytes = workspace_bytes(device);
  const uint32_t align_a = alignment(weight.data_ptr()), align_b = alignment(x.data_ptr()),
                 align_d = alignment(out.data_ptr());
  LT_OK(cublasLtMatmulPreferenceCreate(&desc.pref));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &ws_bytes, sizeof(ws_bytes)));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
  cublasLtHandle_t handle = lt_handle(device);
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  LT_OK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                       desc.pref, 1, &heuristic, &found));
  if (found == 0) {
    return "cuBLASLt has no algorithm for this epilogue at these alignments (x " +
           std::to_string(align_b) + ", weight " + std::to_string(align_a) + ", out " +
           std::to_string(align_d) + " bytes)";
  }

  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  LT_OK(cublasLtMatmul(handle, desc.op, &alpha, weight.data_ptr(), desc.a, x.data_ptr(), desc.b,
                       &beta, out.data_ptr(), desc.d, out.data_ptr(), desc.d, &heuristic.algo,
                       workspace.data_ptr(), ws_bytes, stream));
  return "";
}

}  // namespace partlab
