#!/bin/sh
# Build keyd's OCI image (the Containerfile at the top of the checkout): `make image` runs it.
#
# keyd's wheel is built from this checkout and every dependency's wheel is fetched here, on the
# build host, for the image's Python (IMAGE_PYTHON) and this machine's architecture; the build
# context holds only the Containerfile and those wheels, so the build itself downloads nothing from
# PyPI. Prints the image's name on the last line. See docs/deploy.md, "In a container".
#
# Usage: build-image.sh [PIP]      (PIP: the pip that builds and fetches wheels; default python3 -m pip)
# Environment:
#   IMAGE         the tag to build (default: localhost/keyd:<version>)
#   BASE          the base image (default: the Containerfile's, docker.io/library/debian:bookworm-slim)
#   IMAGE_PYTHON  the base image's Python version (default: 3.11, Debian 12's)
#   ENGINE        podman or docker (default: podman if installed, else docker if its engine answers)
#   ENGINE_FLAGS  global options for the engine, e.g. "--runtime runc" for podman where crun refuses
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
pip=${1:-python3 -m pip}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$src/pyproject.toml" | head -n 1)
image=${IMAGE:-localhost/keyd:$version}
image_python=${IMAGE_PYTHON:-3.11}
flags=${ENGINE_FLAGS:-}

engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v podman >/dev/null 2>&1; then
        engine=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    fi
fi
if [ -z "$engine" ]; then
    if command -v docker >/dev/null 2>&1; then
        echo "make image: docker is installed but no Docker engine answers (docker info failed)," \
            "and podman is not installed. Install podman (apt-get install podman) or start Docker." >&2
    else
        echo "make image: needs podman or docker; neither is installed (apt-get install podman)." >&2
    fi
    exit 1
fi

case $(uname -m) in
    x86_64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) echo "make image: no manylinux wheels are fetched for $(uname -m)" >&2; exit 1 ;;
esac

work=$(mktemp -d /tmp/keyd-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/context/wheels"
# keyd's wheel from a copy of what pyproject.toml builds from (no build/ or egg-info in the checkout).
cp -a "$src/pyproject.toml" "$src/README.md" "$src/keyd" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
$pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/context/wheels" "$work/src"
# Its dependencies as binary wheels for the image's CPython and glibc (Debian 12 has glibc 2.36).
$pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version "$image_python" --implementation cp \
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
    --dest "$work/context/wheels" "$work"/context/wheels/keyd-*.whl
cp "$src/Containerfile" "$work/context/Containerfile"

set -- --tag "$image" --file "$work/context/Containerfile"
[ -n "${BASE:-}" ] && set -- "$@" --build-arg "BASE=$BASE"
# shellcheck disable=SC2086  # ENGINE_FLAGS is a list of options
$engine $flags build "$@" "$work/context" >&2
echo "$image"
