#!/usr/bin/env bash
# Makes the base image the Dockerfile builds on from Debian's own packages (debootstrap, then
# `docker import`), for machines that cannot pull from a registry. Elsewhere, use any Debian
# 12 image instead: docker build --build-arg BASE=debian:bookworm-slim ...
# Usage: docker/make-base-image.sh [TAG] [MIRROR]   (as root; needs debootstrap and docker)
set -euo pipefail
tag="${1:-sharedllm-base:bookworm}"
mirror="${2:-http://deb.debian.org/debian}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag is there already"
  exit 0
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "made $tag"
