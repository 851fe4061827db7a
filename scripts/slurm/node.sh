# shellcheck shell=bash
# What one node of a Slurm job has, for run.sbatch (the batch host, the job's first node) and
# launch.sh (every node, inside the job step): sourced, it defines functions and runs nothing.
# Each node counts its own GPUs and finds its own address, since nodes may differ (--gpus=6 on
# two nodes can be 4 + 2).

# GPUs this node's task can use: Slurm's count, else the entries of CUDA_VISIBLE_DEVICES as CUDA
# reads them: indices or GPU-/MIG- UUIDs, up to the first entry that is neither (so "-1", "" or
# Slurm's "NoDevFiles" mean no GPU).
node_gpus() {
  local gpus=${SLURM_GPUS_ON_NODE:-0} device visible
  if [[ "$gpus" == 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    for device in "${visible[@]}"; do
      [[ "$device" =~ ^([0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$ ]] || break
      gpus=$((gpus + 1))
    done
  fi
  echo "$gpus"
}

# Processes torchrun starts on this node: PARTLAB_NPROC_PER_NODE, else one per GPU, else the
# job's --cpus-per-task CPU processes (default 2; run.sbatch keeps the job's value in
# PARTLAB_CPU_PROCESSES, since inside the step SLURM_CPUS_PER_TASK is the step's).
node_nproc() {
  local nproc gpus
  gpus=$(node_gpus)
  if [[ -n "${PARTLAB_NPROC_PER_NODE:-}" ]]; then
    nproc=$PARTLAB_NPROC_PER_NODE
  elif [[ "$gpus" -gt 0 ]]; then
    nproc=$gpus
  else
    nproc=${PARTLAB_CPU_PROCESSES:-${SLURM_CPUS_PER_TASK:-2}}
  fi
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "PARTLAB_NPROC_PER_NODE must be a positive integer (got '$nproc')"
  echo "$nproc"
}

# The address the other nodes reach this one at: the IPv4 address of PARTLAB_IFNAME (an
# interface you name, e.g. ib0), else the node's Slurm NodeAddr, else its host name.
node_addr() {
  local name=${SLURMD_NODENAME:-$(hostname -s)} addr
  if [[ -n "${PARTLAB_IFNAME:-}" ]]; then
    addr=$(ip -4 -o addr show dev "$PARTLAB_IFNAME" 2> /dev/null | awk '{print $4}' | cut -d/ -f1 | head -n 1)
    [[ -n "$addr" ]] || die "PARTLAB_IFNAME=$PARTLAB_IFNAME: no IPv4 address on $name (ip -4 addr lists the interfaces)"
  else
    addr=$( (scontrol show node "$name" -o 2> /dev/null || true) | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  fi
  echo "${addr:-$name}"
}
