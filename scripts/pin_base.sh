#!/usr/bin/env bash
# Resolve the digests of the base images that docker/Dockerfile pins, from the registry.
#
# usage: scripts/pin_base.sh [--check] [TAG...]
#   TAG      image tags to resolve (default: the tags of the BASE_IMAGE and RUNTIME_IMAGE
#            defaults in docker/Dockerfile, e.g. nvidia/cuda:13.0.0-devel-ubuntu24.04, and of
#            the CUDA 12.6 variant's `--build-arg BASE_IMAGE=...` lines in its header)
#   --check  compare each resolved digest with the one in docker/Dockerfile; exit 1 on a
#            difference (NVIDIA re-pushes tags with security updates: a new digest is a new base)
# Prints `TAG@sha256:...` per tag: the multi-arch index digest, the value to paste into the
# Dockerfile's ARG defaults. Needs a registry and one of: skopeo, docker buildx, crane.
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
dockerfile="$here/../docker/Dockerfile"
die() { echo "pin_base.sh: error: $*" >&2; exit 1; }

check=0
tags=()
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option: $arg" ;;
    *) tags+=("$arg") ;;
  esac
done

pinned() {  # the full reference (tag@digest) of an ARG default in the Dockerfile
  sed -n "s/^ARG $1=\(.*\)$/\1/p" "$dockerfile"
}
if [ "${#tags[@]}" -eq 0 ]; then
  for arg in BASE_IMAGE RUNTIME_IMAGE; do
    ref="$(pinned "$arg")"
    [ -n "$ref" ] || die "no ARG $arg default in $dockerfile"
    tags+=("${ref%@*}")
  done
  while read -r ref; do
    tags+=("${ref%@*}")
  done < <(sed -n 's/^#.*--build-arg [A-Z]*_IMAGE=\([^ ]*@sha256:[0-9a-f]*\).*/\1/p' "$dockerfile")
fi

command -v skopeo > /dev/null || command -v crane > /dev/null \
  || { command -v docker > /dev/null && docker buildx version > /dev/null 2>&1; } \
  || die "none of skopeo, docker buildx, crane is installed (apt-get install skopeo)"

resolve() {  # print the registry's digest of the manifest (list) a tag points at
  local tag="$1"
  if command -v skopeo > /dev/null; then
    skopeo inspect --raw "docker://$tag" | sha256sum | sed 's/^\([0-9a-f]*\).*/sha256:\1/'
  elif command -v docker > /dev/null && docker buildx version > /dev/null 2>&1; then
    docker buildx imagetools inspect "$tag" --format '{{json .Manifest}}' \
      | sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' | head -n 1
  else
    crane digest "$tag"
  fi
}

status=0
for tag in "${tags[@]}"; do
  digest="$(resolve "$tag")" || die "could not resolve $tag (is the registry reachable?)"
  [ -n "$digest" ] || die "no digest for $tag"
  echo "$tag@$digest"
  if [ "$check" = 1 ]; then
    if ! grep -qF "$tag@$digest" "$dockerfile"; then
      echo "pin_base.sh: $tag now resolves to $digest, docker/Dockerfile pins another digest" >&2
      status=1
    fi
  fi
done
exit "$status"
