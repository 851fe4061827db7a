#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc, using the flags torch's CUDAExtension would use.
#
# Runs on a machine with nvcc but no GPU and a CPU-only torch (CI): nothing is linked or run.
# cuBLASLt: csrc/cublaslt_epilogue.cu includes <cublasLt.h>. If a real header is found (the
# toolkit, $CUDA_HOME, or the nvidia-cublas pip wheel) it is used; otherwise the declaration
# shim csrc/compile_check/cublasLt.h is put on the include path (and said so), which still checks
# every cuBLASLt call's argument types. The other .cu files need no cuBLAS headers at all.
#
# Usage: scripts/check_cuda.sh [file.cu ...]     (default: every csrc/*.cu)
# Env:   PYTHON (default .venv/bin/python, else python3), NVCC (default: nvcc on PATH, else
#        /usr/local/bin/nvcc), CUDA_ARCHS (default "80 90": one -gencode per entry).
# Exit:  0 all compiled; 1 a file failed; 2 no nvcc / no torch.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/bin/nvcc ]]; then nvcc=/usr/local/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
  echo "check_cuda: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi

if ! torch_includes="$("$python" -c \
    'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')"; then
  echo "check_cuda: cannot import torch with $python (set PYTHON)" >&2
  exit 2
fi
cxx11_abi="$("$python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

includes=(-I "$root/csrc")
while IFS= read -r dir; do
  [[ -n "$dir" ]] && includes+=(-I "$dir")
done <<< "$torch_includes"

# Where is a real cublasLt.h? nvcc's own toolkit, CUDA_HOME, or the pip wheel nvidia-cublas*.
toolkit="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"
cublas_dir=""
candidates=("$toolkit/include" "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include)
while IFS= read -r dir; do
  [[ -n "$dir" ]] && candidates+=("$dir")
done < <("$python" - <<'PY' 2>/dev/null || true
import glob, site, sys
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(base + "/nvidia/cu*/include") + glob.glob(base + "/nvidia/cublas/include"):
        print(d)
PY
)
for dir in "${candidates[@]}"; do
  if [[ -f "$dir/cublasLt.h" ]]; then cublas_dir="$dir"; break; fi
done
if [[ -n "$cublas_dir" ]]; then
  echo "check_cuda: using the real cublasLt.h from $cublas_dir"
  includes+=(-I "$cublas_dir")
else
  echo "check_cuda: NOTE no cublasLt.h on this machine; cuBLASLt calls are checked against the" \
       "declaration shim csrc/compile_check/cublasLt.h"
  includes+=(-I "$root/csrc/compile_check")
fi

read -r -a archs <<< "${CUDA_ARCHS:-80 90}"
gencode=()
for a in "${archs[@]}"; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done

flags=(
  -std=c++20 --expt-relaxed-constexpr -O2 -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_API_INCLUDE_EXTENSION_H
  -DTORCH_EXTENSION_NAME=_C "-D_GLIBCXX_USE_CXX11_ABI=$cxx11_abi" -DPARTLAB_WITH_CUDA
)

if [[ $# -gt 0 ]]; then sources=("$@"); else sources=(csrc/*.cu); fi
if [[ ! -e "${sources[0]}" ]]; then
  echo "check_cuda: no .cu files to check" >&2
  exit 1
fi

objdir="$(mktemp -d)"
trap 'rm -rf "$objdir"' EXIT
# Compile the files in parallel (one job per file; CI has 2 cores), then report each.
pids=()
for i in "${!sources[@]}"; do
  src="${sources[$i]}"
  (
    start=$SECONDS
    if "$nvcc" "${flags[@]}" "${gencode[@]}" "${includes[@]}" -c "$src" -o "$objdir/$i.o" \
        > "$objdir/$i.log" 2>&1; then rc=0; else rc=$?; fi
    echo "$((SECONDS - start))" > "$objdir/$i.secs"
    exit "$rc"
  ) &
  pids+=("$!")
done
status=0
for i in "${!sources[@]}"; do
  if wait "${pids[$i]}"; then
    echo "check_cuda: OK   ${sources[$i]} ($(cat "$objdir/$i.secs") s)"
  else
    grep -v -e "warning #3306-D" -e "bit-field" "$objdir/$i.log" >&2 || true
    echo "check_cuda: FAIL ${sources[$i]}" >&2
    status=1
  fi
done
exit "$status"
