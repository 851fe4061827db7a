#!/usr/bin/env bash
# An interactive allocation for the lab: the handout's
#   srun -A <account> --time=... -p <partitions> --gres=gpu:N --mem=... --pty bash
# with every part an option. Nothing is cluster-specific unless you pass it.
#
#   scripts/slurm/interactive.sh [options] [-- COMMAND [ARGS...]]     (default COMMAND: bash)
#
#   -A, --account NAME      account to charge            (default: $PARTLAB_ACCOUNT, else none)
#   -p, --partition LIST    partition(s), comma-separated (default: $PARTLAB_PARTITION, else the
#                           cluster's default partition)
#   -g, --gpus N            GPUs (--gres=gpu:N); 0 = CPU only       (default: $PARTLAB_GPUS or 2)
#   -t, --time T            time limit, e.g. 0-01:00:00              (default: 01:00:00)
#   -m, --mem SIZE          memory, e.g. 64G                         (default: the cluster's)
#   -c, --cpus N            CPUs for the shell (--cpus-per-task)     (default: the cluster's)
#   -n, --dry-run           print the srun command instead of running it
#   -h, --help
#   extra srun options go after the known ones, before --: e.g. --constraint=a100
#
# Example (the handout's cluster): scripts/slurm/interactive.sh -A eecs -p gpu,dgx2 -g 2 -m 64G
set -euo pipefail

die() { echo "partlab-slurm: error: $*" >&2; exit 2; }

account="${PARTLAB_ACCOUNT:-}"
partition="${PARTLAB_PARTITION:-}"
gpus="${PARTLAB_GPUS:-2}"
time_limit="01:00:00"
mem=""
cpus=""
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -A|--account|-p|--partition|-g|--gpus|-t|--time|-m|--mem|-c|--cpus)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
      case "$1" in
        -A|--account) account=$2 ;;
        -p|--partition) partition=$2 ;;
        -g|--gpus) gpus=$2 ;;
        -t|--time) time_limit=$2 ;;
        -m|--mem) mem=$2 ;;
        -c|--cpus) cpus=$2 ;;
      esac
      shift 2 ;;
    -n|--dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    --*) extra+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help; a command goes after --)" ;;
  esac
done
[[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus must be a number (got '$gpus')"
[[ -z "$cpus" || "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive number (got '$cpus')"
[[ $# -gt 0 ]] || set -- bash

cmd=(srun)
[[ -n "$account" ]] && cmd+=(-A "$account")
cmd+=(--time="$time_limit")
[[ -n "$partition" ]] && cmd+=(-p "$partition")
[[ "$gpus" -gt 0 ]] && cmd+=(--gres=gpu:"$gpus")
[[ -n "$mem" ]] && cmd+=(--mem="$mem")
[[ -n "$cpus" ]] && cmd+=(--cpus-per-task="$cpus")
cmd+=(${extra[@]+"${extra[@]}"} --pty "$@")

if [[ $dry_run == 1 ]]; then
  echo "${cmd[*]}"
  exit 0
fi
command -v srun > /dev/null || die "srun not found: run this on a Slurm login/submit node"
exec "${cmd[@]}"
