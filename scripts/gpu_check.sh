#!/usr/bin/env bash
# One command for a GPU node: build the extension against the torch that is already there (with
# CUDA kernels whenever that torch has CUDA), then run partlab/gpu_check.py: the op tests (the
# `cuda` ones on a GPU), `partlab bench op` in bf16, a GEMM's TFLOP/s, every driver on CUDA,
# all_reduce bandwidth with >= 2 GPUs. Writes one record (JSON + markdown) under docs/gpu/.
#
# Installs nothing and needs no network (GPU nodes often have none): any python with torch >=
# partlab.MIN_TORCH, setuptools, ninja and pytest. The build happens in a copy of the tree, so
# the repository's own build (.venv, partlab/_C*.so) is left alone. Without a GPU it runs what it
# can (the real CUDA build, the CPU op tests), says which GPU steps it skipped, and exits 0.
#
# Usage: scripts/gpu_check.sh [--out DIR]    (default DIR: docs/gpu, or results/gpu-check
#                                            without a GPU)
# Env:   PYTHON (default .venv/bin/python when there is one, else python3), MAX_JOBS (parallel
#        compile jobs), TORCH_CUDA_ARCH_LIST (default setup.py's: each GPU family torch runs on),
#        KEEP=1 keeps the copy of the tree, PARTLAB_REVISION (the record's revision where the
#        tree has no .git).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
die() { echo "gpu_check: error: $*" >&2; exit 1; }

command -v "$python" >/dev/null || die "$python not found: set PYTHON=/path/to/python"
"$python" -c 'import torch, setuptools' 2>/dev/null \
  || die "$python cannot import torch and setuptools: set PYTHON to the python that has them"
for module in ninja pytest; do
  "$python" -c "import $module" 2>/dev/null || die "$python has no $module: pip install $module"
done
has_cuda=$("$python" -c 'import torch; print(int(torch.version.cuda is not None))')
mode=cpu
if [[ $has_cuda == 1 ]]; then mode=cuda; fi

work="$(mktemp -d)"
if [[ -z ${KEEP:-} ]]; then trap 'rm -rf "$work"' EXIT; fi
# The sources only: what git tracks (or, in a copy without .git, the tree less build outputs).
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$root" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$work" -xf -
else
  tar -C "$root" --exclude=./.venv --exclude=./build --exclude=./results --exclude='*.so' \
    -cf - . | tar -C "$work" -xf -
fi

echo "gpu_check: building partlab._C (PARTLAB_BUILD=$mode) with $("$python" -c \
  'import torch; print("torch", torch.__version__)') in $work"
start=$SECONDS
if ! (cd "$work" && PARTLAB_BUILD=$mode "$python" setup.py -q build_ext --inplace) \
    > "$work/build.log" 2>&1; then
  tail -n 25 "$work/build.log" >&2
  die "the build failed (log above)"
fi
build_s=$((SECONDS - start))
echo "gpu_check: built in ${build_s} s"
build="{\"status\": \"ok\", \"mode\": \"$mode\", \"seconds\": $build_s}"
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; args+=(--out "$(realpath -m "$2")"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
status=0
(cd "$work" && "$python" -m partlab.gpu_check --root "$root" --build "$build" "${args[@]}") \
  || status=$?
exit "$status"
