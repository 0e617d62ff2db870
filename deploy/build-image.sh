#!/usr/bin/env bash
# Builds the `switchboard` container image from this repository alone: no registry, no base image.
#
# The broker and `sb` are built as static glibc binaries and copied into a `FROM scratch` image, so
# `docker build` needs nothing it would have to pull. Two flags make a static binary work in an
# empty root filesystem:
#   -C target-feature=+crt-static          link glibc statically (scratch has no libc.so)
#   --cfg getrandom_backend="linux_getrandom"  use the getrandom(2) syscall: there is no /dev/urandom
#                                          in the image, and the fallback would panic at start
# `--target` keeps these flags off build scripts and proc macros (they run on the host) and puts the
# artifacts in target/x86_64-unknown-linux-gnu/, apart from the ordinary release build.
#
# Usage: deploy/build-image.sh [IMAGE_TAG]     (default switchboard:local; env SWITCHBOARD_IMAGE too)
set -euo pipefail
cd "$(dirname "$0")/.."

image="${1:-${SWITCHBOARD_IMAGE:-switchboard:local}}"
triple=x86_64-unknown-linux-gnu

echo "== static release build ($triple)"
RUSTFLAGS="-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\"" \
    cargo build --release --locked --target "$triple" --bin switchboard --bin sb

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "target/$triple/release/switchboard" "target/$triple/release/sb" deploy/Dockerfile "$context/"
# Empty folders for the image's /data and /tmp: scratch has neither, and COPY of a folder keeps
# its mode, so /tmp gets the sticky, world-writable bit it needs.
mkdir -p "$context/rootfs/data" "$context/rootfs/tmp"
chmod 1777 "$context/rootfs/tmp"

echo "== docker build $image"
docker build --quiet --tag "$image" "$context"
docker image ls "$image"
