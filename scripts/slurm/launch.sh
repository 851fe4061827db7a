#!/usr/bin/env bash
# One node's share of a partlab Slurm job (run.sbatch starts it once per node with srun):
# run the command it is given -- torchrun ... or partlab lab ... -- either inside the Apptainer
# image PARTLAB_SIF or in the virtual environment PARTLAB_VENV / <repo>/.venv.
#
#   launch.sh COMMAND [ARGS...]   run it (working directory: the job's results directory)
#   launch.sh --check             only check that the environment is usable (one-line error)
#
# Container mode: `apptainer exec [--nv] --cleanenv --env-file F --bind RESULTS --pwd RESULTS
# $PARTLAB_SIF COMMAND...`. --cleanenv drops the host environment, so the variables the run needs
# (SLURM_*, MASTER_ADDR/PORT, NCCL_*, TORCH_*, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, PARTLAB_*)
# are written to F (results/<jobid>/apptainer-node<N>.env, kept for debugging) and passed
# explicitly. PARTLAB_APPTAINER_ARGS adds options (e.g. "--bind /scratch");
# PARTLAB_APPTAINER_CLEANENV=0 keeps the host environment instead.
set -euo pipefail

die() { echo "partlab-slurm: error: $*" >&2; exit 2; }

check_only=0
if [[ "${1:-}" == --check ]]; then
  check_only=1
  shift
fi
[[ $check_only == 1 || $# -ge 1 ]] || die "usage: launch.sh --check | launch.sh COMMAND [ARGS...] (started by run.sbatch)"
root="${PARTLAB_ROOT:?PARTLAB_ROOT is not set (launch.sh is started by run.sbatch)}"
results="${PARTLAB_RESULTS_DIR:?PARTLAB_RESULTS_DIR is not set (launch.sh is started by run.sbatch)}"

if [[ -n "${PARTLAB_SIF:-}" ]]; then
  command -v apptainer > /dev/null \
    || die "PARTLAB_SIF is set but apptainer is not on PATH (try: module load apptainer)"
  [[ -f "$PARTLAB_SIF" ]] || die "PARTLAB_SIF=$PARTLAB_SIF: no such image file"
  [[ $check_only == 0 ]] || exit 0
  envfile="$results/apptainer-node${SLURM_NODEID:-0}.env"
  : > "$envfile"
  while IFS= read -r name; do
    if [[ "$name" =~ ^(SLURM_.*|SLURMD_NODENAME|MASTER_ADDR|MASTER_PORT|NCCL_.*|TORCH_.*|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|PARTLAB_.*)$ ]]; then
      printf '%s=%q\n' "$name" "${!name}" >> "$envfile"
    fi
  done < <(compgen -e)
  opts=(exec)
  [[ "${PARTLAB_DEVICE:-cpu}" == cuda ]] && opts+=(--nv)
  [[ "${PARTLAB_APPTAINER_CLEANENV:-1}" == 0 ]] || opts+=(--cleanenv)
  opts+=(--env-file "$envfile" --bind "$results" --pwd "$results")
  read -r -a extra <<< "${PARTLAB_APPTAINER_ARGS:-}"
  exec apptainer "${opts[@]}" ${extra[@]+"${extra[@]}"} "$PARTLAB_SIF" "$@"
fi

venv="${PARTLAB_VENV:-}"
if [[ -n "$venv" ]]; then
  [[ -f "$venv/bin/activate" ]] \
    || die "PARTLAB_VENV=$venv is not a virtual environment (no bin/activate): run scripts/_setup.sh, or unset PARTLAB_VENV"
elif [[ -f "$root/.venv/bin/activate" ]]; then
  venv="$root/.venv"
fi
if [[ -n "$venv" ]]; then
  # shellcheck source=/dev/null
  source "$venv/bin/activate"
fi
if [[ $check_only == 1 ]]; then
  python3 -c 'import partlab' 2> /dev/null \
    || die "no usable partlab environment (${venv:-no $root/.venv, PARTLAB_VENV unset}): run scripts/_setup.sh to create $root/.venv, or set PARTLAB_VENV or PARTLAB_SIF"
  exit 0
fi
command -v "$1" > /dev/null || die "$1 not found in ${venv:-the current environment}: run scripts/_setup.sh, or set PARTLAB_VENV or PARTLAB_SIF"
cd "$results"
exec "$@"
