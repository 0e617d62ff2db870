#!/usr/bin/env bash
# Generates the Go code for proto/switchboard/v1 and builds the example client in main.go, with
# Debian's Go toolchain, code generators and libraries only (no Go module proxy): GOPATH mode, with
# the libraries from /usr/share/gocode (golang-google-grpc-dev, golang-google-protobuf-dev,
# golang-google-genproto-dev). `.ci/run` runs it; docs/CLIENTS.md says what to do with modules.
#
# Usage: clients/go-example/build.sh [OUT_DIR]   (default: target/go-example)
# Prints the path of the binary it built.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$(mkdir -p "${1:-$root/target/go-example}" && cd "${1:-$root/target/go-example}" && pwd)"

# The module prefix of every go_package in proto/: generated files land under it in the GOPATH.
module=example.invalid/switchboard/gen/go
gopath="$out/gopath"
rm -rf "$gopath"
mkdir -p "$gopath/src/$module" "$gopath/src/example.invalid/switchboard/go-example"

# --go_opt=module strips the module prefix from go_package to place the files; no M flags.
# /usr/include holds google/protobuf/timestamp.proto (libprotobuf-dev).
protoc -I "$root/proto" -I /usr/include \
    --go_out="$gopath/src/$module" --go_opt=module="$module" \
    --go-grpc_out="$gopath/src/$module" --go-grpc_opt=module="$module" \
    "$root"/proto/switchboard/v1/*.proto
cp "$here/main.go" "$gopath/src/example.invalid/switchboard/go-example/"

cd "$gopath/src/example.invalid/switchboard/go-example"
# CGO off: a static binary, and no C compiler needed.
CGO_ENABLED=0 GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOPROXY=off GOFLAGS= \
    GOCACHE="$out/cache" go build -o "$out/switchboard-go-example" .
echo "$out/switchboard-go-example"
