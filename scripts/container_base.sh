#!/usr/bin/env bash
# Build the local CPU base image that tests docker/Dockerfile without a registry.
#
# The real image starts from nvidia/cuda (see docker/Dockerfile); no registry is reachable on CI,
# so the container test substitutes this base: Debian bookworm made with debootstrap from the apt
# mirror, with python3, and a wheelhouse at /opt/wheels holding the pinned CPU torch wheel (the
# file pip's find-links point at) and the exact versions of its dependencies that the project's
# venv runs. The image sets PIP_FIND_LINKS=/opt/wheels and PIP_NO_INDEX=1, so the Dockerfile's pip
# steps install from the wheelhouse, offline, the same files the venv has.
#
# The image is tagged with a hash of its recipe (this script, the wheel list, the mirror): a
# second run with the same recipe finds it in podman's storage and returns at once.
#
# usage: scripts/container_base.sh            prints the image reference on its last line
# env:   PYTHON            python whose pip downloads the wheelhouse (default: .venv/bin/python)
#        PARTLAB_CACHE     cache dir (default: ~/.cache/partlab); holds the rootfs and wheelhouse
#        PODMAN            podman command with its global flags (default: podman), e.g.
#                          "podman --root DIR --runroot DIR --storage-driver overlay"
#        DEBIAN_MIRROR     apt mirror (default: the first deb.debian.org-style URI in apt sources)
#        TORCH_SPEC        the torch requirement (default: constraints.txt's torch, +cpu)
set -euo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname -- "$here")"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
PARTLAB_CACHE="${PARTLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/partlab}"
TORCH_SPEC="${TORCH_SPEC:-$(grep '^torch==' "$repo/constraints.txt")+cpu}"
SUITE=bookworm
read -r -a podman <<< "${PODMAN:-podman}"

die() { echo "container_base.sh: error: $*" >&2; exit 1; }
log() { echo "container_base.sh: $*" >&2; }

for tool in debootstrap tar sha256sum "${podman[0]}"; do
  command -v "$tool" > /dev/null || die "$tool not found (apt-get install -y debootstrap podman)"
done
[ -x "$PYTHON" ] || command -v "$PYTHON" > /dev/null || die "no python at $PYTHON (set PYTHON)"

if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR="$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2> /dev/null | awk '{print $2}' | head -n 1 || true)"
  DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi

# Pin the wheelhouse to what the venv runs (torch's dependencies) and what the Dockerfile pins.
constraints="$("$PYTHON" - << 'EOF'
import importlib.metadata as md
names = ["filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "sympy",
         "typing-extensions"]
for name in names:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
)"
# numpy, setuptools, ninja, matplotlib: the pins of constraints.txt, which docker/Dockerfile's pip
# step installs (matplotlib's own dependencies come along unpinned, as pip resolves them).
image_pins="$(grep -E '^(numpy|setuptools|ninja|matplotlib)==' "$repo/constraints.txt" | sort)"
[ "$(echo "$image_pins" | wc -l)" = 4 ] \
  || die "expected numpy==, setuptools==, ninja==, matplotlib== pins in constraints.txt, found: $image_pins"
constraints="$constraints
$image_pins"

key="$( { cat "${BASH_SOURCE[0]}"; echo "$constraints"; echo "$TORCH_SPEC $DEBIAN_MIRROR"; } \
  | sha256sum | cut -c1-16)"
image="localhost/partlab-base:$key"

if "${podman[@]}" image exists "$image"; then
  log "cached: $image"
  echo "$image"
  exit 0
fi

work="$PARTLAB_CACHE/base-$key"
mkdir -p "$work"
wheels="$work/wheels"
packages=python3,passwd,ca-certificates
rootfs="$PARTLAB_CACHE/rootfs-$(echo "$SUITE $DEBIAN_MIRROR $packages" | sha256sum | cut -c1-16)"
if [ ! -f "$wheels/.complete" ]; then
  log "downloading the wheelhouse ($TORCH_SPEC + pinned dependencies) to $wheels"
  rm -rf "$wheels"
  mkdir -p "$wheels"
  echo "$constraints" > "$work/constraints.txt"
  # torch comes from pip's find-links (the local CPU wheel); the rest from the index.
  # The host runs Python 3.11 on glibc 2.36 like the bookworm base, so its wheels fit.
  "$PYTHON" -m pip download --quiet --only-binary=:all: \
    -c "$work/constraints.txt" -d "$wheels" \
    "$TORCH_SPEC" numpy setuptools ninja matplotlib
  touch "$wheels/.complete"
fi

if [ ! -f "$rootfs.complete" ]; then
  log "debootstrap $SUITE from $DEBIAN_MIRROR (minbase + python3) into $rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$packages" \
    "$SUITE" "$rootfs" "$DEBIAN_MIRROR" > "$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  touch "$rootfs.complete"
fi
mkdir -p "$rootfs/opt/wheels"
cp -f "$wheels"/*.whl "$rootfs/opt/wheels/"

log "importing $image"
tar --numeric-owner -C "$rootfs" -c . | "${podman[@]}" import \
  --change "ENV PIP_FIND_LINKS=/opt/wheels" \
  --change "ENV PIP_NO_INDEX=1" \
  --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change "LABEL org.opencontainers.image.description=partlab-local-cpu-test-base" \
  --message "debootstrap $SUITE minbase + python3 + wheelhouse ($TORCH_SPEC)" \
  --quiet - "$image" > /dev/null
rm -rf "$rootfs/opt/wheels"
echo "$image"
