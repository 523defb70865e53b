#!/usr/bin/env bash
# Builds the test bed's Go tools offline with Debian's Go and the Go
# sources Debian packages under /usr/share/gocode (GOPATH mode: no module
# download, no network):
#   go-tools.sh OUTDIR
# integration/go/estargz-verify -> OUTDIR/estargz-verify: the reference
# eStargz reader's verification of a blob (integration/tests/convert.rs).
# Needs golang-1.19-go and golang-github-containerd-stargz-snapshotter-dev
# (scripts/install-deps.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: go-tools.sh OUTDIR}"
GO=/usr/lib/go-1.19/bin/go
[ -x "$GO" ] || { echo "go-tools: $GO missing (scripts/install-deps.sh)" >&2; exit 1; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
cd "$ROOT/integration/go/estargz-verify"
GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS='' GOPROXY=off GOCACHE="$CACHE" \
  "$GO" build -o "$OUT/estargz-verify" .
echo "go-tools: built $OUT/estargz-verify"
