#!/usr/bin/env bash
# Build the Apptainer image partlab.sif from the Docker image (docker/partlab.def).
#
# usage: scripts/build_sif.sh [--image REF | --archive FILE | --podman REF] [--out FILE]
#                             [--def FILE] [--print-def] [-- APPTAINER_BUILD_ARGS...]
#   --image REF     a local Docker image (default: partlab:latest): Bootstrap docker-daemon
#   --archive FILE  an image archive from `docker save partlab -o partlab.tar` (or
#                   `podman save --format docker-archive`): Bootstrap docker-archive, or
#                   oci-archive when the archive holds an OCI layout (`docker save` from
#                   Docker >= 25 writes both, which older Apptainers read badly as a docker
#                   archive); for a cluster without Docker, copy the archive there and build
#   --podman REF    a podman image: saved to a temporary archive, then as --archive
#   --out FILE      the image to write (default: partlab.sif)
#   --def FILE      the definition (default: docker/partlab.def)
#   --print-def     print the definition that would be built, build nothing
#   -- ARGS         passed to `apptainer build` (e.g. --fakeroot, --notest)
# env: APPTAINER  the apptainer (or singularity) command (default: the first on PATH)
set -euo pipefail

die() { echo "build_sif.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
image="partlab:latest"
archive=""
podman_image=""
out="partlab.sif"
def="$here/../docker/partlab.def"
print_def=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="${2:?--image needs a value}"; shift 2 ;;
    --archive) archive="${2:?--archive needs a value}"; shift 2 ;;
    --podman) podman_image="${2:?--podman needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --def) def="${2:?--def needs a value}"; shift 2 ;;
    --print-def) print_def=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -f "$def" ] || die "definition not found: $def"

apptainer="${APPTAINER:-}"
if [ -z "$apptainer" ] && [ "$print_def" = 0 ]; then
  apptainer="$(command -v apptainer || command -v singularity || true)"
  [ -n "$apptainer" ] || die "apptainer not found on PATH (nor singularity). Install Apptainer \
(https://apptainer.org/docs/admin/main/installation.html) or load its module (module load \
apptainer); on a machine with Docker only, run the image with docker instead (docs/containers.md)."
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ -n "$podman_image" ]; then
  command -v podman > /dev/null || die "--podman given but podman is not installed"
  archive="$tmp/image.tar"
  echo "build_sif.sh: podman save $podman_image -> $archive" >&2
  podman save --format docker-archive -o "$archive" "$podman_image"
fi

if [ -n "$archive" ]; then
  [ -f "$archive" ] || die "archive not found: $archive"
  archive="$(cd -- "$(dirname -- "$archive")" && pwd)/$(basename -- "$archive")"
  bootstrap=docker-archive
  if tar -tf "$archive" 2> /dev/null | grep -x -e 'oci-layout' -e './oci-layout' > /dev/null; then
    bootstrap=oci-archive
  fi
  sed -e "s|^Bootstrap:.*|Bootstrap: $bootstrap|" -e "s|^From:.*|From: $archive|" \
    "$def" > "$tmp/partlab.def"
else
  sed -e 's|^Bootstrap:.*|Bootstrap: docker-daemon|' -e "s|^From:.*|From: $image|" \
    "$def" > "$tmp/partlab.def"
fi

if [ "$print_def" = 1 ]; then
  cat "$tmp/partlab.def"
  exit 0
fi

[ -x "$apptainer" ] || command -v "$apptainer" > /dev/null || die "not executable: $apptainer"
echo "build_sif.sh: $apptainer build $out ($(head -n 2 "$tmp/partlab.def" | tr '\n' ' '))" >&2
"$apptainer" build --force "${extra[@]}" "$out" "$tmp/partlab.def"
echo "build_sif.sh: wrote $out; try: apptainer test --nv $out" >&2
