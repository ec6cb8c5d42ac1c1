#!/usr/bin/env bash
# The Debian base both images build on where no registry image can be pulled: debootstrap bookworm with
# Python 3.11 and commit the tree as an image with buildah. Does nothing when the image exists.
#   scripts/images/build_base.sh [IMAGE]        (default localhost/debian-python:bookworm; needs root)
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/debian-python:bookworm}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDAH=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")

if "${BUILDAH[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "base $IMAGE exists"
    exit 0
fi
for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install $tool" >&2; exit 1; }
done

rootfs=$(mktemp -d /var/tmp/genserve-base.XXXXXX)
ctr=
cleanup() {
    [ -n "$ctr" ] && "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1
    rm -rf "$rootfs"
}
trap cleanup EXIT

start=$(date +%s)
# minbase: apt, dpkg, coreutils, passwd (useradd); python3-venv because both Dockerfiles make a venv
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$MIRROR"
# the package lists and .deb cache are not part of an image; apt-get update brings them back
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
ctr=$("${BUILDAH[@]}" from scratch)
"${BUILDAH[@]}" copy "$ctr" "$rootfs"/ / >/dev/null
"${BUILDAH[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
"${BUILDAH[@]}" commit --format docker --rm "$ctr" "$IMAGE" >/dev/null
ctr=
echo "base $IMAGE built in $(( $(date +%s) - start )) s," \
    "$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE")"
