#!/usr/bin/env bash
# `make image`: builds the Dockerfile with docker when an engine answers, else with buildah.
#   IMAGE            tag (default mcdropout:latest)
#   CUDA             1 (default): with the CUDA 13 / cuDNN 9 libraries; 0: a CPU-only image
#   BASE             base image build argument (default: the Dockerfile's official image)
#   BUILD_CA_BUNDLE  buildah only: a CA bundle for pip inside the build, for networks where
#                    HTTPS goes through an intercepting proxy (mounted with a pip.conf)
#   BUILDER          docker or buildah, to choose instead of detecting
# The build context needs models/ (make models).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/container/env.sh
source deploy/container/env.sh
IMAGE=${IMAGE:-mcdropout:latest}
CUDA=${CUDA:-1}
args=(--build-arg "CUDA=$CUDA" -t "$IMAGE")
[ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")

if [ -z "$(ls -d models/*/ 2>/dev/null)" ]; then
  echo "models/ holds no model: run make models first (the image bakes it in)" >&2
  exit 1
fi
if [ -z "${BUILDER:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    BUILDER=docker
  elif command -v buildah >/dev/null; then
    BUILDER=buildah
  else
    echo "neither a Docker engine nor buildah: install one (make container-tools)" >&2
    exit 1
  fi
fi
echo "building $IMAGE with $BUILDER (CUDA=$CUDA${BASE:+, BASE=$BASE})"
if [ "$BUILDER" = docker ]; then
  exec docker build "${args[@]}" .
fi
mounts=()
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then
  pipconf=$(mktemp "${TMPDIR:-/tmp}/mcd-pip.XXXXXX.conf")
  trap 'rm -f "$pipconf"' EXIT
  printf '[global]\ncert = /run/host-ca.crt\n' >"$pipconf"
  chmod 644 "$pipconf"
  # Never over the image's own CA file: that breaks its ca-certificates package.
  mounts=(-v "$BUILD_CA_BUNDLE:/run/host-ca.crt:ro" -v "$pipconf:/etc/pip.conf:ro")
fi
# --format docker keeps HEALTHCHECK (the OCI format has no such field).
"${BUILDAH[@]}" bud --format docker --isolation "${BUILDAH_ISOLATION:-chroot}" --network host \
  "${mounts[@]}" "${args[@]}" .
