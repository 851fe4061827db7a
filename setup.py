"""Build partlab and its extension partlab._C.

Install torch first, then `pip install --no-build-isolation -e .` so the extension is compiled
against the torch that will import it. PARTLAB_BUILD picks the flavour:
  auto (default)  CUDAExtension when this torch has CUDA and an nvcc of its CUDA major is found,
                  else CppExtension (saying in one line why, when torch has CUDA)
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
import sys
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


def fail(message):
    raise SystemExit(f"partlab: error: {message}")


def nvcc(*args):
    """The output of the nvcc that torch will compile with ("" where CUDA_HOME has none: a
    runtime-only CUDA install)."""
    try:
        return subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), *args],
                              capture_output=True, text=True).stdout
    except OSError:
        return ""


def nvcc_major():
    """The CUDA major version of the toolkit torch will compile with."""
    found = re.search(r"release (\d+)\.", nvcc("--version"))
    return int(found.group(1)) if found else None


def default_arch_list():
    """TORCH_CUDA_ARCH_LIST where the user set none: every GPU family this torch build runs on.

    torch.cuda.get_arch_list() (no GPU needed) names the SASS torch ships, e.g. cu126: 5.0 6.0 7.0
    7.5 8.0 8.6 9.0, cu130: 7.5 8.0 8.6 9.0 10.0 12.0. A cubin runs on every GPU of its major
    version with an equal or higher minor (8.0's on 8.6 and 8.9), so one entry per major at its
    lowest minor serves them all; +PTX on the newest lets later GPUs JIT the kernels. Entries this
    nvcc cannot target (a toolkit older than torch's CUDA) are left out. Build time, 2 cores: the
    C++ dominates, each entry adds ~10 s (torch 2.14.1+cu130: 73 s for 9.0 alone, 114 s for its
    five, 7.5;8.0;9.0;10.0;12.0+PTX); the library grows by ~0.3 MB an entry.
    """
    targets = set(re.findall(r"compute_(\d+)", nvcc("--list-gpu-arch")))
    lowest = {}
    for arch in torch.cuda.get_arch_list():
        found = re.fullmatch(r"sm_(\d+)(\d)[af]?", arch)
        if found and (not targets or found[1] + found[2] in targets):
            major, minor = int(found[1]), int(found[2])
            lowest[major] = min(minor, lowest.get(major, minor))
    archs = [f"{major}.{minor}" for major, minor in sorted(lowest.items())]
    return ";".join(archs) + "+PTX" if archs else None


def toolkit_problem():
    """(why, fix) where no CUDA kernels can be built here for this CUDA torch, else None."""
    need = torch.version.cuda.split(".")[0]
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        where = "(PATH, CUDA_HOME, /usr/local/cuda)" if CUDA_HOME is None else \
            f"in {CUDA_HOME} (a CUDA runtime without its compiler?)"
        return (f"torch {torch.__version__} has CUDA {torch.version.cuda} but no nvcc was found "
                f"{where}", f"install a CUDA {need}.x toolkit (or export CUDA_HOME to one)")
    found = nvcc_major()
    if found is not None and found != int(need):
        return (f"nvcc in {CUDA_HOME} is CUDA {found} but torch {torch.__version__} was built "
                f"with CUDA {torch.version.cuda}",
                f"use a CUDA {need}.x toolkit (export CUDA_HOME) or a torch built for CUDA {found}")
    return None


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
    archs = None if os.environ.get("TORCH_CUDA_ARCH_LIST") else default_arch_list()
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
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
    problem = toolkit_problem() if mode != "cpu" and torch.version.cuda else None
    if problem and mode == "cuda":
        fail(": ".join(problem))
    if problem:  # auto: say why, in one line, and build what can be built
        print(f"partlab: {problem[0]}: building partlab._C with CPU kernels only; for CUDA "
              f"kernels {problem[1]}, then `PARTLAB_BUILD=cuda pip install --no-build-isolation "
              "-e .`", file=sys.stderr)
    elif mode == "cuda" or (mode == "auto" and torch.version.cuda):
        return [cuda_extension(cpp_sources + cuda_sources, cxx)]
    return [CppExtension("partlab._C", cpp_sources, extra_compile_args={"cxx": cxx},
                         py_limited_api=True)]


setup(
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
