#!/usr/bin/env bash
# Generates the Go stubs from proto/ into a GOPATH under target/ and runs
# client.go with the arguments given (e.g. -target 127.0.0.1:50051 -check).
#
# Works offline with Debian's Go packages only (no module proxy), in GOPATH
# mode:
#   apt-get install golang-go golang-google-grpc-dev golang-google-genproto-dev \
#     golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc \
#     protobuf-compiler libprotobuf-dev
# (golang-github-golang-protobuf-1-5-dev must be named: the -1-3 variant that
# apt would otherwise pick breaks Timestamp decoding at run time.)
#
# CLIENT_GOPATH overrides where the stubs go (default: target/ci/gopath).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
gopath="${CLIENT_GOPATH:-$repo/target/ci/gopath}"
proto=payroc/broker/v1/token_broker.proto
# The stubs' import path inside $gopath/src, as client.go imports it.
package=payroc-broker/gen/payroc/broker/v1

rm -rf "${gopath:?}/src/$package"
mkdir -p "$gopath/src"
# google/protobuf/{duration,timestamp}.proto come from libprotobuf-dev
# (/usr/include), which protoc searches by default.
protoc --proto_path="$repo/proto" \
    --go_out="$gopath/src" --go_opt="M$proto=$package;brokerv1" \
    --go-grpc_out="$gopath/src" --go-grpc_opt="M$proto=$package;brokerv1" \
    "$proto"

export GO111MODULE=off
export GOPATH="$gopath:/usr/share/gocode"
# Go needs a build cache; without HOME (as in some CI environments) it has no
# default, so one under target/ unless the caller chose one.
export GOCACHE="${GOCACHE:-$(go env GOCACHE 2>/dev/null || true)}"
if [[ -z "$GOCACHE" || "$GOCACHE" == off ]]; then
    export GOCACHE="$repo/target/ci/go-build"
fi
exec go run "$repo/examples/clients/go/client.go" "$@"
