"""Build partlab and its extension partlab._C.

Install torch first, then `pip install --no-build-isolation -e .` so the extension is compiled
against the torch that will import it. PARTLAB_BUILD picks the flavour:
  auto (default)  CUDAExtension when this torch has CUDA and nvcc is found, else CppExtension
  cpu             CppExtension only (CPU kernels), even on a CUDA machine
  cuda            CUDAExtension, failing in one line when torch, nvcc or cuBLASLt is missing
The C++ standard is left to torch's BuildExtension, which passes the one its headers need
(-std=c++17 from torch 2.11, -std=c++20 from 2.13 and 2.14, whose ATen refuses anything older).
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import setup


def _use_real_toolkit():
    """An `nvcc` on PATH may be a wrapper script outside its toolkit (torch then guesses
    CUDA_HOME=/usr/local, which has no CUDA headers): point CUDA_HOME at the toolkit instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or (Path(nvcc).resolve().parents[1] / "include/cuda_runtime.h").exists():
        return
    for home in (Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"))):
        if (home / "bin/nvcc").exists() and (home / "include/cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_use_real_toolkit()
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


def fail(message):
    raise SystemExit(f"partlab: error: {message}")


def nvcc_major():
    """The CUDA major version of the toolkit torch will compile with."""
    out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def cublaslt_dirs():
    """(include dir, lib dir, library file) of cuBLASLt: the toolkit's, else the one in torch's
    pip-installed NVIDIA packages (nvidia/cu13 for CUDA 13 wheels, nvidia/cublas for CUDA 12),
    which ships only the versioned libcublasLt.so.N."""
    major = torch.version.cuda.split(".")[0]
    site = Path(sysconfig.get_paths()["purelib"])
    candidates = [(Path(CUDA_HOME) / "include", Path(CUDA_HOME) / sub) for sub in ("lib64", "lib")]
    candidates += [(site / "nvidia" / pkg / "include", site / "nvidia" / pkg / "lib")
                   for pkg in (f"cu{major}", "cublas")]
    for include, lib in candidates:
        if not (include / "cublasLt.h").exists():
            continue
        for name in ("libcublasLt.so", f"libcublasLt.so.{major}"):
            if (lib / name).exists():
                return str(include), str(lib), name
    searched = ", ".join(sorted({str(inc) for inc, _ in candidates}))
    fail(f"cublasLt.h and libcublasLt.so.{major} not found (looked in {searched}): install the "
         f"CUDA toolkit's cuBLAS or `pip install nvidia-cublas`, or build with PARTLAB_BUILD=cpu")


def cuda_extension(sources, cxx):
    nvcc, torch_major = nvcc_major(), int(torch.version.cuda.split(".")[0])
    if nvcc is not None and nvcc != torch_major:
        fail(f"nvcc in {CUDA_HOME} is CUDA {nvcc} but torch {torch.__version__} was built with "
             f"CUDA {torch.version.cuda}: use a CUDA {torch_major}.x toolkit (export CUDA_HOME) "
             f"or a torch built for CUDA {nvcc}")
    include, lib, name = cublaslt_dirs()
    return CUDAExtension(
        "partlab._C", sources,
        include_dirs=[include], library_dirs=[lib], libraries=[f":{name}"],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        py_limited_api=True)


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return []
    mode = os.environ.get("PARTLAB_BUILD", "auto")
    if mode not in ("auto", "cpu", "cuda"):
        fail(f"PARTLAB_BUILD={mode!r}: use auto, cpu or cuda")
    if mode == "cuda" and torch.version.cuda is None:
        fail(f"PARTLAB_BUILD=cuda but torch {torch.__version__} has no CUDA: install a CUDA "
             "build of torch, or use PARTLAB_BUILD=cpu")
    if mode == "cuda" and CUDA_HOME is None:
        fail("PARTLAB_BUILD=cuda but no CUDA toolkit was found (no nvcc on PATH, no CUDA_HOME): "
             "install one or export CUDA_HOME, or use PARTLAB_BUILD=cpu")
    # The module only registers ops (TORCH_LIBRARY), so it needs just the stable Python ABI.
    cxx = ["-O3", "-DPy_LIMITED_API=0x030A0000"]
    if mode == "cuda" or (mode == "auto" and torch.version.cuda and CUDA_HOME):
        return [cuda_extension(cpp_sources + cuda_sources, cxx)]
    return [CppExtension("partlab._C", cpp_sources, extra_compile_args={"cxx": cxx},
                         py_limited_api=True)]


setup(
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
