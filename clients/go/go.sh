#!/bin/sh
# Runs the go tool on clients/go offline, against Debian's Go sources.
#
#   clients/go/go.sh build -o OUT github.com/turnlog/turnlog/clients/go/cmd/example
#   clients/go/go.sh vet
#
# Why GOPATH mode: the machines that build this reach no Go module proxy, and
# Debian installs its Go libraries (toolchain.txt) as sources under
# /usr/share/gocode/src, laid out for GOPATH builds (Debian builds its own Go
# packages that way). Module mode would need every module of grpc's and
# genproto's dependency graphs (envoy, x/tools, lint ...), even the ones no
# package here imports, so it cannot resolve offline. GOPATH mode builds from
# exactly the packages installed, at the versions toolchain.txt pins.
#
# The repository's module path (github.com/turnlog/turnlog/clients/go, the
# protos' go_package) is made a GOPATH entry by a symlink under build/gopath.
# `go ... ./...` skips symlinks, so `vet` with no arguments names this
# module's packages itself.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
gopath="$root/build/gopath"
link="$gopath/src/github.com/turnlog/turnlog/clients"
mkdir -p "$(dirname "$link")"
[ "$(readlink "$link" 2>/dev/null)" = "$root/clients" ] || ln -sfn "$root/clients" "$link"

export GO111MODULE=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$root/build/go-cache}"

if [ "$#" -eq 1 ] && [ "$1" = vet ]; then
    cd "$here"
    set -- vet $(find turnlog cmd hashchain -name '*.go' -exec dirname {} \; | sort -u |
        sed 's|^|github.com/turnlog/turnlog/clients/go/|')
fi
exec go "$@"
