#!/usr/bin/env bash
# Makes a Debian 12 base image with Python 3.11 in the local buildah store, without a registry:
# debootstrap (minbase + python3, python3-venv, ca-certificates) then `buildah from scratch`.
# It stands in for the official python image where no registry can be reached:
#   BASE=$LOCAL_BASE make image
# Idempotent: does nothing when the image is already in the store.
set -euo pipefail
# shellcheck source=deploy/container/env.sh
source "$(dirname "$0")/env.sh"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "${BUILDAH[@]}" inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
  echo "base image $LOCAL_BASE present"
  exit 0
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool not found: make container-tools" >&2; exit 1; }
done
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/mcd-rootfs.XXXXXX")
container=""
cleanup() {
  if [ -n "$container" ]; then "${BUILDAH[@]}" rm "$container" >/dev/null 2>&1 || true; fi
  rm -rf "$rootfs" "$rootfs.log"
}
trap cleanup EXIT
echo "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# What the official image also leaves out: package lists and caches.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
container=$("${BUILDAH[@]}" from scratch)
mnt=$("${BUILDAH[@]}" mount "$container")
cp -a "$rootfs"/. "$mnt"/
"${BUILDAH[@]}" umount "$container" >/dev/null
"${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 "$container"
"${BUILDAH[@]}" commit --quiet "$container" "$LOCAL_BASE" >/dev/null
echo "base image $LOCAL_BASE committed"
