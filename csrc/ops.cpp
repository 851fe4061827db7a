// partlab._C: the op schemas and the record of which forward path the CUDA kernel took.
// Kernels live in fused_linear_cpu.cpp and fused_linear_cuda.cu, autograd in
// fused_linear_autograd.cpp; the fake (meta) kernels are registered from Python (partlab/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <tuple>

#include "fused_linear.h"

// Importing partlab._C runs the static TORCH_LIBRARY registrations below; the module itself is
// empty, so it needs only the stable (limited) Python API.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace partlab {
namespace {

std::mutex paths_mutex;
int64_t path_counts[2] = {0, 0};
std::string last_fallback_reason;

std::tuple<int64_t, int64_t, std::string> forward_paths(bool reset) {
  std::lock_guard<std::mutex> lock(paths_mutex);
  auto result = std::make_tuple(path_counts[0], path_counts[1], last_fallback_reason);
  if (reset) {
    path_counts[0] = path_counts[1] = 0;
    last_fallback_reason.clear();
  }
  return result;
}

}  // namespace

void record_forward_path(ForwardPath path, const std::string& reason) {
  std::lock_guard<std::mutex> lock(paths_mutex);
  ++path_counts[static_cast<int>(path)];
  if (path == ForwardPath::Fallback) last_fallback_reason = reason;
}

}  // namespace partlab

TORCH_LIBRARY(partlab, m) {
  m.def(
      "fused_linear(Tensor x, Tensor weight, Tensor? bias, str activation, "
      "bool save_pre=True) "
      "-> (Tensor out, Tensor saved)");
  m.def(
      "fused_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor saved, "
      "str activation, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
  // CUDA forwards since the last reset: (cuBLASLt epilogue, GEMM + hand-written epilogue,
  // the reason of the last fallback). CPU forwards are not counted.
  m.def("forward_paths(bool reset=False) -> (int cublaslt, int fallback, str last_reason)",
        &partlab::forward_paths);
}
