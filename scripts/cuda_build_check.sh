#!/usr/bin/env bash
# The real CUDA build, on a machine without a GPU (what CI runs beside scripts/test.sh): a venv
# with the CUDA build of torch pinned in constraints.txt (its cuda-build-check line), then
# scripts/gpu_check.sh with it: the extension built as a CUDAExtension (nvcc, cuBLASLt from
# torch's nvidia packages), linked, imported, both ops' CUDA kernels registered, and the CPU op
# tests under that torch. The venv (~5.5 GB) is kept under PARTLAB_CACHE for the next run.
#
# Usage: scripts/cuda_build_check.sh [gpu_check.sh flags]
# Env:   PARTLAB_CACHE (default /var/cache/partlab as root, else ~/.cache/partlab), PYTHON
#        (the interpreter for the venv, default python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "cuda_build_check: error: $*" >&2; exit 1; }

command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] \
  || die "no nvcc (CUDA toolkit) on this machine: the CUDA build needs one"
torch=$(sed -n 's/^# cuda-build-check: torch==//p' "$root/constraints.txt")
[[ -n $torch ]] || die "constraints.txt has no '# cuda-build-check: torch==...' line"
if [[ $(id -u) == 0 ]]; then default_cache=/var/cache/partlab; else default_cache=~/.cache/partlab; fi
venv="${PARTLAB_CACHE:-$default_cache}/venv-cuda-torch-$torch"
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import torch, pytest, ninja' 2>/dev/null; then
  echo "cuda_build_check: making $venv (torch==$torch, its CUDA build: ~1 min, ~5.5 GB)"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  # The other pins of constraints.txt apply; its torch line is the CPU runs' torch, not this one.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c <(grep -v '^torch==' "$root/constraints.txt") "torch==$torch" setuptools wheel ninja pytest numpy
fi
"$venv/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' \
  || die "torch==$torch in $venv is a CPU build: the CUDA build needs torch with CUDA"
# Without a GPU nothing can be queried: compile for one architecture (the build is the check).
PYTHON="$venv/bin/python" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  exec "$root/scripts/gpu_check.sh" "$@"
