#!/usr/bin/env bash
# Shared set-up for scripts/lab.sh and scripts/test.sh (source it; idempotent).
# Makes .venv, puts a suitable torch in it, installs partlab and builds its extension.
# A torch that is already importable and new enough (a GPU machine, the container) is reused via
# --system-site-packages; otherwise the torch of constraints.txt is installed, in the build that
# this machine's NVIDIA driver and GPUs run (scripts/torch_variant.sh). Every pip install here
# takes its versions from constraints.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
min=$(sed -n 's/^MIN_TORCH = (\([0-9]*\), \([0-9]*\))/\1.\2/p' partlab/__init__.py)
suitable="import sys, torch; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); \
sys.exit(v < tuple(map(int, '$min'.split('.'))))"

if ! command -v "$PYTHON" >/dev/null; then
  echo "partlab: error: $PYTHON not found: install Python 3.11+ or set PYTHON=/path/to/python" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "$suitable" 2>/dev/null; then
    echo "partlab: reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
if ! .venv/bin/python -c "$suitable" 2>/dev/null; then
  # The build of torch that this machine's driver and GPUs run (scripts/torch_variant.sh says
  # which and why); without an NVIDIA GPU, torch from pip's default index, as on CI. A variant's
  # index is added to pip's, not put in its place: it holds that torch, but maybe not the versions
  # constraints.txt pins for what torch pulls in.
  choice=$(bash scripts/torch_variant.sh)
  read -r variant index <<< "$choice"
  torch=$(grep '^torch==' constraints.txt)
  if [[ -z $index ]]; then
    echo "partlab: installing $torch into .venv"
    "${pip[@]}" torch
  else
    echo "partlab: installing $torch+$variant from $index into .venv"
    "${pip[@]}" --extra-index-url "$index" "$torch+$variant"
  fi
fi
# What the install below depends on; when it has not changed since the last install and the
# extension imports, the install (~30 s even with nothing to compile) is skipped.
inputs=$(cat constraints.txt pyproject.toml setup.py csrc/* | sha256sum | cut -d' ' -f1)
stamp=.venv/.partlab-installed
if [[ -f $stamp && $(cat "$stamp") == "$inputs" ]] && .venv/bin/python -c "import partlab._C" 2>/dev/null; then
  echo "partlab: .venv is up to date (delete $stamp to reinstall)"
else
  "${pip[@]}" setuptools wheel ninja
  echo "partlab: installing partlab and building its extension (pip install --no-build-isolation -e .)"
  "${pip[@]}" --no-build-isolation -e ".[test]"
  echo "$inputs" > "$stamp"
  # A CUDA torch but an extension without CUDA kernels: setup.py's own line says why (no nvcc, or
  # its CUDA major is not torch's; pip hid it), asked for again by evaluating setup.py.
  cpu_only="import sys, torch; from partlab import ops; \
sys.exit(0 if torch.version.cuda and not ops.extension_info()['cuda'] else 1)"
  if .venv/bin/python -c "$cpu_only" 2>/dev/null; then
    why=$(.venv/bin/python setup.py --name 2>&1 >/dev/null | grep -m 1 '^partlab:' || true)
    echo "${why:-partlab: torch has CUDA but partlab._C has CPU kernels only (PARTLAB_BUILD=\
${PARTLAB_BUILD:-auto}): PARTLAB_BUILD=cuda .venv/bin/pip install --no-build-isolation -e .}" >&2
  fi
fi
