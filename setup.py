"""Build partlab and its extension partlab._C.

Install torch first, then `pip install --no-build-isolation -e .` so the extension is compiled
against the torch that will import it. PARTLAB_BUILD picks the flavour:
  auto (default)  CUDAExtension when this torch has CUDA and nvcc is found, else CppExtension
  cpu             CppExtension only (CPU kernels), even on a CUDA machine
  cuda            CUDAExtension, failing loudly when torch or the toolkit lacks CUDA
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only hit on a machine without torch
    raise SystemExit(
        "partlab: torch must be installed before building partlab "
        "(run scripts/lab.sh, or `pip install torch` then `pip install --no-build-isolation -e .`)"
    ) from e

# A build machine without a GPU cannot query the architecture: default to A100 and H100 (+PTX
# so newer GPUs JIT the kernels). Override by exporting TORCH_CUDA_ARCH_LIST.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return []
    mode = os.environ.get("PARTLAB_BUILD", "auto")
    if mode not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"partlab: PARTLAB_BUILD={mode!r}: use auto, cpu or cuda")
    torch_has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "cuda" and not torch_has_cuda:
        raise SystemExit(
            "partlab: PARTLAB_BUILD=cuda but this torch has no CUDA or nvcc was not found "
            f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME}); use PARTLAB_BUILD=cpu"
        )
    # The module only registers ops (TORCH_LIBRARY), so it needs just the stable Python ABI.
    limited = ["-DPy_LIMITED_API=0x030A0000"]
    cxx = ["-O3", "-std=c++17"] + limited
    if mode == "cuda" or (mode == "auto" and torch_has_cuda):
        return [
            CUDAExtension(
                "partlab._C",
                cpp_sources + cuda_sources,
                extra_compile_args={
                    "cxx": cxx + ["-DPARTLAB_WITH_CUDA"],
                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"] + limited,
                },
                libraries=["cublasLt"],
                py_limited_api=True,
            )
        ]
    return [
        CppExtension("partlab._C", cpp_sources, extra_compile_args={"cxx": cxx},
                     py_limited_api=True)
    ]


setup(
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
