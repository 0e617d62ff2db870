#!/usr/bin/env bash
# Regenerates the committed stubs in src/switchboard/v1 from proto/switchboard/v1 with
# grpcio-tools (pinned: the generated code checks the protobuf and grpcio versions at import).
#   bash clients/python/generate.sh          rewrite the stubs
#   bash clients/python/generate.sh --check  fail when the committed stubs are not current
# PYTHON names the interpreter that has grpcio-tools (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
want="1.85.4"
have="$("$python" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))')"
if [ "$have" != "$want" ]; then
    echo "generate.sh: grpcio-tools $have found, $want wanted (pip install grpcio-tools==$want)" >&2
    exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
(cd "$root" && "$python" -m grpc_tools.protoc -I proto --python_out="$out" \
    --grpc_python_out="$out" --pyi_out="$out" proto/switchboard/v1/*.proto)
cp "$here/src/switchboard/v1/__init__.py" "$out/switchboard/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
    if ! diff -r "$out/switchboard/v1" "$here/src/switchboard/v1" --exclude=__pycache__ --exclude=py.typed; then
        echo "clients/python: the generated stubs are stale; run bash clients/python/generate.sh" >&2
        exit 1
    fi
    echo "clients/python: generated stubs are current"
else
    rm -f "$here"/src/switchboard/v1/*_pb2*.py "$here"/src/switchboard/v1/*_pb2*.pyi
    cp "$out"/switchboard/v1/*_pb2*.py* "$here/src/switchboard/v1/"
fi
