#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian's package mirror (debootstrap --variant=minbase,
# imported with podman), for machines that reach no container registry. Installs podman, runc and
# debootstrap from Debian's packages when they are missing. Prints the image's name.
#   scripts/make_base_image.sh [IMAGE]        (default: localhost/lmi-base:bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-localhost/lmi-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/container/podman/containers.conf}
if podman image exists "$image"; then
  echo "$image"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase bookworm from $mirror" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >&2
echo "$image"
