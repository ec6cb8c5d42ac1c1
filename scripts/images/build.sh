#!/usr/bin/env bash
# Build the server (CPU variant) and operator images with buildah, no Docker engine and no registry:
# both on the debootstrapped Debian base (build_base.sh), torch from a local wheel mounted into the build.
#   scripts/images/build.sh [server] [operator]     (default both; `make images`; needs root)
# Environment: SERVER_IMAGE, OPERATOR_IMAGE, BASE_IMAGE (tags), TORCH (pip requirement of the wheel),
# PIP and TORCH_PIP_ARGS (how to fetch it), CPU_KERNELS (1: g++ in the server image), STORAGE_DRIVER.
set -euo pipefail
cd "$(dirname "$0")/../.."

SERVER_IMAGE=${SERVER_IMAGE:-localhost/genserve-server:dev}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-localhost/genserve-operator:dev}
export BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
TORCH=${TORCH:-torch==2.13.0}
PIP=${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo pip3 )}
WHEELS=${WHEELS:-build/images/wheels}
# vfs: works in any container or VM (no overlay mounts needed); it copies every layer, so it costs disk
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(server operator)

command -v buildah >/dev/null || { echo "buildah is needed: apt-get install buildah" >&2; exit 1; }
scripts/images/build_base.sh "$BASE_IMAGE"

# The host's CA bundle, read-only and only while building: pip reaches PyPI through whatever TLS proxy
# the host trusts, and the image keeps Debian's own bundle.
BUILD_ARGS=(--isolation chroot --format docker)
CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA" ] && BUILD_ARGS+=(--volume "$CA:$CA:ro")

image_id() { "${BUILDAH[@]}" images --noheading --no-trunc --format "{{.ID}}" "$1" 2>/dev/null | head -1 || true; }

build() {  # tag dockerfile extra-args...
    local tag=$1 file=$2 old start seconds
    shift 2
    old=$(image_id "$tag")
    start=$(date +%s)
    "${BUILDAH[@]}" bud "${BUILD_ARGS[@]}" "$@" -f "$file" -t "$tag" .
    seconds=$(( $(date +%s) - start ))
    # the image this tag named before is now untagged: drop it, vfs keeps a full copy of each
    if [ -n "$old" ] && [ "$old" != "$(image_id "$tag")" ]; then "${BUILDAH[@]}" rmi "$old" >/dev/null 2>&1 || true; fi
    SUMMARY+=("$(printf '%-36s %8s  built in %dm%02ds' "$tag" "$("${BUILDAH[@]}" images --format '{{.Size}}' "$tag" | head -1)" $((seconds / 60)) $((seconds % 60)))")
}

SUMMARY=()
for target in "${TARGETS[@]}"; do
    case $target in
        server)
            mkdir -p "$WHEELS"
            # torch as the host's pip resolves it (here: the CPU wheel on local disk; elsewhere pass
            # TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"); only this folder is mounted
            ls "$WHEELS/torch-${TORCH#torch==}"*.whl >/dev/null 2>&1 \
                || "$PIP" download -q --no-deps -d "$WHEELS" "$TORCH" ${TORCH_PIP_ARGS:-}
            build "$SERVER_IMAGE" Dockerfile.server --volume "$(realpath "$WHEELS"):/wheels:ro" \
                --build-arg "CUDA_IMAGE=$BASE_IMAGE" --build-arg TORCH_WHEELS=/wheels \
                --build-arg "TORCH_VERSION=${TORCH#torch==}" \
                --build-arg "CPU_KERNELS=${CPU_KERNELS:-1}" ;;
        operator)
            build "$OPERATOR_IMAGE" Dockerfile.operator --build-arg "PYTHON_IMAGE=$BASE_IMAGE" ;;
        *)
            echo "unknown image $target (server, operator)" >&2; exit 2 ;;
    esac
done
printf '%s\n' "${SUMMARY[@]}"
