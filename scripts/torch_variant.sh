#!/usr/bin/env bash
# The build of torch this machine's NVIDIA driver and GPUs can run (scripts/_setup.sh installs it).
# Prints `VARIANT INDEX` on stdout and, on stderr, one line saying why:
#   cu130  driver >= 580 (CUDA 13) and every GPU Turing (compute capability 7.5) or newer
#   cu126  a GPU older than Turing (V100 7.0, Pascal, Maxwell 5.0: torch's cu128 and later builds
#          dropped them) or a driver from 525.60.13 (CUDA 12's minor-version compatibility) to 579
#   cpu    no nvidia-smi, or it lists no GPU: VARIANT alone, torch from pip's default index (CI)
# Every GPU must run the one torch, so the lowest compute capability decides. A driver older than
# 525.60.13, or a GPU newer than cu126 supports (9.0) on a driver older than 580, is an error.
# INDEX is https://download.pytorch.org/whl/VARIANT. The driver figures are partlab/nvidia.py's.
# env: PARTLAB_TORCH_VARIANT    skip the detection: cpu, cu126, cu130 (or another variant there)
#      PARTLAB_TORCH_INDEX_URL  INDEX for a CUDA or chosen variant (a mirror)
set -euo pipefail

die() { echo "partlab: error: $*" >&2; exit 1; }
pick() {  # VARIANT WHY
  echo "partlab: torch build $1: $2" >&2
  echo "$1 ${PARTLAB_TORCH_INDEX_URL:-https://download.pytorch.org/whl/$1}"
}
key() {  # a driver version as one comparable number: 525.60.13 -> 525060013
  local major minor patch
  IFS=. read -r major minor patch <<< "$1"
  echo $((10#$major * 1000000 + 10#${minor:-0} * 1000 + 10#${patch:-0}))
}

if [[ -n ${PARTLAB_TORCH_VARIANT:-} ]]; then
  [[ $PARTLAB_TORCH_VARIANT =~ ^(cpu|cu[0-9]+)$ ]] \
    || die "PARTLAB_TORCH_VARIANT=$PARTLAB_TORCH_VARIANT is no torch build: use cpu, cu126 or cu130"
  pick "$PARTLAB_TORCH_VARIANT" "PARTLAB_TORCH_VARIANT=$PARTLAB_TORCH_VARIANT"
  exit 0
fi
none() { echo "partlab: torch build cpu, from pip's default index ($1)" >&2; echo cpu; exit 0; }
smi() { nvidia-smi --format=csv,noheader --query-gpu="$1" 2>&1; }
command -v nvidia-smi > /dev/null || none "no nvidia-smi: no NVIDIA GPU to build for"
# nvidia-smi older than the compute_cap field (drivers before 510) still names its driver.
if ! gpus=$(smi driver_version,compute_cap) && ! gpus=$(smi driver_version) || [[ -z $gpus ]]; then
  gpus=${gpus:-it lists no GPU}
  none "nvidia-smi: ${gpus%%$'\n'*}"
fi
driver="" low=999 high=0
while IFS=', ' read -r version cap; do
  [[ $version =~ ^[0-9]+(\.[0-9]+)*$ ]] \
    || die "nvidia-smi printed '$version' for a driver version: set PARTLAB_TORCH_VARIANT"
  driver=${driver:-$version}
  if [[ $cap =~ ^[0-9]+\.[0-9]$ ]]; then
    cap=${cap/./}
    low=$((cap < low ? cap : low)) high=$((cap > high ? cap : high))
  fi
done <<< "$gpus"
d=$(key "$driver")
((d >= 525060013)) || die "NVIDIA driver $driver is older than 525.60.13, the oldest that runs \
torch's CUDA builds (CUDA 12): update the driver, or set PARTLAB_TORCH_VARIANT=cpu to run on CPU"
((high > 0)) \
  || die "nvidia-smi names no compute capability (driver $driver): set PARTLAB_TORCH_VARIANT"
cc() { echo "$(($1 / 10)).$(($1 % 10))"; }
if ((low >= 75 && d >= 580000000)); then
  pick cu130 "driver $driver (CUDA 13 needs >= 580), every GPU >= 7.5 (lowest $(cc "$low"))"
elif ((high > 90)); then
  die "a GPU of compute capability $(cc "$high") needs torch's cu130 build (cu126 stops at 9.0), \
which needs driver >= 580 (found $driver) and every GPU >= 7.5 (lowest $(cc "$low")): update the \
driver, or set PARTLAB_TORCH_VARIANT"
elif ((low < 75)); then
  pick cu126 "a GPU of compute capability $(cc "$low"), which torch's cu130 build (>= 7.5) dropped"
else
  pick cu126 "driver $driver is older than the 580 that torch's cu130 build (CUDA 13) needs"
fi
