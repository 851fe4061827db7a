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

#include <cstdint>
#include <mutex>

namespace partlab {
namespace {

constexpr size_t kWorkspaceBytes = 8u << 20;  // 8 MiB, from the caching allocator per call

cublasLtHandle_t lt_handle(int device) {
  // One handle per device, created on first use and kept for the life of the process.
  static std::mutex mu;
  static cublasLtHandle_t handles[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "partlab: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (handles[device] == nullptr) {
    TORCH_CHECK(cublasLtCreate(&handles[device]) == CUBLAS_STATUS_SUCCESS,
                "partlab: cublasLtCreate failed");
  }
  return handles[device];
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
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

#define LT_OK(expr)                                              \
  do {                                                           \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return false;           \
  } while (0)

}  // namespace

bool cublaslt_supported(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                        const at::Tensor& aux, Activation act) {
  const auto t = x.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) return false;
  if (x.numel() == 0 || out.numel() == 0) return false;
  const int64_t esize = x.element_size();
  const int64_t K = x.size(1), N = weight.size(0);
  if ((K * esize) % 16 != 0 || (N * esize) % 16 != 0) return false;  // leading dims
  if (!aligned16(x) || !aligned16(weight) || !aligned16(out)) return false;
  if (bias.has_value() && !aligned16(*bias)) return false;  // e.g. a TP shard at an odd offset
  if (act == Activation::Gelu && aux.numel() > 0 && (!aligned16(aux) || N % 8 != 0)) {
    return false;  // aux pointer / leading dimension
  }
  return true;
}

bool cublaslt_fused_linear(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::Tensor& out,
                           at::Tensor& aux, Activation act) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const cudaDataType_t dt = lt_dtype(x.scalar_type());
  const bool fp32 = x.scalar_type() == at::kFloat;
  const cublasComputeType_t compute =
      fp32 && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                    : CUBLAS_COMPUTE_32F;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const bool has_bias = bias.has_value();
  const bool with_aux = act == Activation::Gelu && aux.numel() > 0;
  switch (act) {
    case Activation::Relu:
      epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
      break;
    case Activation::Gelu:
      if (with_aux) {
        epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      } else {
        epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
      break;
    case Activation::None:
      epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      break;
  }

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

  const size_t ws_bytes = kWorkspaceBytes;
  LT_OK(cublasLtMatmulPreferenceCreate(&desc.pref));
  LT_OK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &ws_bytes, sizeof(ws_bytes)));
  const int device = x.get_device();
  cublasLtHandle_t handle = lt_handle(device);
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  LT_OK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                       desc.pref, 1, &heuristic, &found));
  if (found == 0) return false;

  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  LT_OK(cublasLtMatmul(handle, desc.op, &alpha, weight.data_ptr(), desc.a, x.data_ptr(), desc.b,
                       &beta, out.data_ptr(), desc.d, out.data_ptr(), desc.d, &heuristic.algo,
                       workspace.data_ptr(), ws_bytes, stream));
  return true;
}

}  // namespace partlab
