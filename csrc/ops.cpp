// partlab._C: the op schemas. Kernels live in fused_linear_cpu.cpp and fused_linear_cuda.cu;
// the fake (meta) kernels and autograd are registered from Python (partlab/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing partlab._C runs the static TORCH_LIBRARY registrations below; the module itself is
// empty, so it needs only the stable (limited) Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(partlab, m) {
  m.def(
      "fused_linear(Tensor x, Tensor weight, Tensor? bias, str activation, "
      "bool save_pre=True) "
      "-> (Tensor out, Tensor saved)");
  m.def(
      "fused_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor saved, "
      "str activation, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
}
