#!/bin/sh
# Regenerates the Go code of proto/turnlog/v1 into clients/go/turnlog/v1.
#
#   clients/go/generate.sh          # rewrite the generated files
#   clients/go/generate.sh --check  # exit 1 if they differ from what proto/ gives
#
# protoc, protoc-gen-go and protoc-gen-go-grpc are Debian's (toolchain.txt),
# so the output, version comments included, is the same on every machine
# that installed those versions. The well-known types come from
# libprotobuf-dev's /usr/include. The engine protocol (proto/turnlog/engine)
# is internal to the service and not generated for clients.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
module=github.com/turnlog/turnlog/clients/go
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cd "$root/proto"
protoc -I . -I /usr/include \
    --go_out="$out" --go_opt=module=$module \
    --go-grpc_out="$out" --go-grpc_opt=module=$module \
    turnlog/v1/*.proto

if [ "${1:-}" = --check ]; then
    if ! diff -r "$out/turnlog" "$here/turnlog" >/dev/null; then
        diff -r "$out/turnlog" "$here/turnlog" | head -40 >&2
        echo "clients/go/turnlog is stale: run make clients-go-gen" >&2
        exit 1
    fi
    exit 0
fi
rm -rf "$here/turnlog"
cp -r "$out/turnlog" "$here/turnlog"
