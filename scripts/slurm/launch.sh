#!/usr/bin/env bash
# One node's share of a partlab Slurm job (run.sbatch starts it once per node with srun):
# run the command it is given -- torchrun ... or partlab lab ... -- either inside the Apptainer
# image PARTLAB_SIF or in the virtual environment PARTLAB_VENV / <repo>/.venv.
#
#   launch.sh COMMAND [ARGS...]   run it (working directory: the job's results directory)
#   launch.sh --check             only check that the environment is usable (one-line error)
#
# A torchrun command gets this node's own options first: --nproc-per-node (its GPUs),
# --local-addr (its address, where the workers' store listens when this node's agent is
# rendezvous rank 0) and --rdzv-conf is_host=true on the first node only (it hosts the
# rendezvous store, whatever its host name resolves to).
#
# Container mode: `apptainer exec [--nv] --cleanenv --env-file F --bind RESULTS,CACHE[,TMPDIR]
# --pwd RESULTS $PARTLAB_SIF COMMAND...`. --cleanenv drops the host environment, so the
# variables a run needs or a user sets on purpose are written to F
# (results/<jobid>/apptainer-node<N>.env, kept for debugging) and passed explicitly: see
# PASS_THROUGH below. Caches (XDG_CACHE_HOME, MPLCONFIGDIR, TRITON_CACHE_DIR,
# TORCHINDUCTOR_CACHE_DIR) go to CACHE, chosen here as writable: PARTLAB_CACHE_DIR, else
# $TMPDIR/partlab-cache-<uid> (else /tmp), else results/<jobid>/cache, since the image's HOME may
# be read-only. PARTLAB_APPTAINER_ARGS adds options (e.g. "--bind /scratch");
# PARTLAB_APPTAINER_CLEANENV=0 keeps the host environment instead.
set -euo pipefail

die() { echo "partlab-slurm: error: $*" >&2; exit 2; }
PASS_THROUGH='^(SLURM_.*|SLURMD_NODENAME|MASTER_ADDR|MASTER_PORT|PARTLAB_.*|NCCL_.*|GLOO_.*|TORCH.*|PYTORCH_.*|CUDA_(VISIBLE_DEVICES|DEVICE_ORDER|LAUNCH_BLOCKING|MODULE_LOADING|DEVICE_MAX_CONNECTIONS|CACHE_.*)|NVIDIA_.*|UCX_.*|FI_.*|OMP_.*|MKL_.*|TMPDIR|XDG_CACHE_HOME|MPLCONFIGDIR|TRITON_CACHE_DIR|PYTHONUNBUFFERED|PYTHONFAULTHANDLER)$'

check_only=0
if [[ "${1:-}" == --check ]]; then
  check_only=1
  shift
fi
[[ $check_only == 1 || $# -ge 1 ]] || die "usage: launch.sh --check | launch.sh COMMAND [ARGS...] (started by run.sbatch)"
root="${PARTLAB_ROOT:?PARTLAB_ROOT is not set (launch.sh is started by run.sbatch)}"
results="${PARTLAB_RESULTS_DIR:?PARTLAB_RESULTS_DIR is not set (launch.sh is started by run.sbatch)}"

# shellcheck source=scripts/slurm/node.sh
source "$root/scripts/slurm/node.sh"
if [[ $check_only == 0 && "$1" == torchrun ]]; then
  nproc=$(node_nproc)
  addr=$(node_addr)
  is_host=false
  [[ "${SLURM_NODEID:-0}" == 0 ]] && is_host=true
  echo "partlab-slurm: node ${SLURM_NODEID:-0} (${SLURMD_NODENAME:-$(hostname -s)}): $nproc process(es), address $addr$([[ $is_host == true ]] && echo ", rendezvous host")"
  set -- torchrun --nproc-per-node "$nproc" --local-addr "$addr" --rdzv-conf "is_host=$is_host" "${@:2}"
fi

writable_cache() {
  local dir
  for dir in "${PARTLAB_CACHE_DIR:-}" "${TMPDIR:-/tmp}/partlab-cache-$(id -u)" "$results/cache"; do
    [[ -n "$dir" ]] && mkdir -p "$dir" 2> /dev/null && [[ -w "$dir" ]] && { echo "$dir"; return; }
  done
  die "no writable cache directory (tried PARTLAB_CACHE_DIR, \$TMPDIR, $results/cache): set PARTLAB_CACHE_DIR"
}

if [[ -n "${PARTLAB_SIF:-}" ]]; then
  command -v apptainer > /dev/null \
    || die "PARTLAB_SIF is set but apptainer is not on PATH (try: module load apptainer)"
  [[ -f "$PARTLAB_SIF" ]] || die "PARTLAB_SIF=$PARTLAB_SIF: no such image file"
  [[ $check_only == 0 ]] || exit 0
  cache=$(writable_cache)
  export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$cache}" MPLCONFIGDIR="${MPLCONFIGDIR:-$cache/matplotlib}" \
         TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$cache/triton}" \
         TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}"
  envfile="$results/apptainer-node${SLURM_NODEID:-0}.env"
  : > "$envfile"
  while IFS= read -r name; do
    if [[ "$name" =~ $PASS_THROUGH ]]; then
      printf '%s=%q\n' "$name" "${!name}" >> "$envfile"
    fi
  done < <(compgen -e)
  binds="$results,$cache"
  [[ -n "${TMPDIR:-}" && -d "$TMPDIR" ]] && binds+=",$TMPDIR"
  opts=(exec)
  [[ "${PARTLAB_DEVICE:-cpu}" == cuda ]] && opts+=(--nv)
  [[ "${PARTLAB_APPTAINER_CLEANENV:-1}" == 0 ]] || opts+=(--cleanenv)
  opts+=(--env-file "$envfile" --bind "$binds" --pwd "$results")
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
