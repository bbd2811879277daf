# Sourced by the container scripts: buildah and podman without a Docker engine, sharing one
# local image store. vfs storage and chroot isolation work inside an unprivileged container or
# a VM without overlay support; runc (crun fails on a hybrid cgroup layout), cgroupfs (no
# systemd) and a file events backend keep podman off systemd and journald.
# shellcheck shell=bash
MCD_CONTAINER_STORE=${MCD_CONTAINER_STORE:-/var/tmp/mcdropout-containers}
STORAGE_FLAGS=(--root "$MCD_CONTAINER_STORE/root" --runroot "$MCD_CONTAINER_STORE/runroot"
  --storage-driver vfs)
BUILDAH=(buildah "${STORAGE_FLAGS[@]}")
PODMAN=(podman "${STORAGE_FLAGS[@]}" --cgroup-manager cgroupfs --events-backend file
  --runtime runc)
# The Debian base made by local-base-image.sh (stands in for the official python image).
LOCAL_BASE=${LOCAL_BASE:-localhost/mcdropout-base:bookworm-python3}
