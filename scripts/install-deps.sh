#!/usr/bin/env bash
# Idempotent install of the Debian packages tarn's build, tests and demo need.
#   install-deps.sh [--bench]   (--bench: also what `make bench` needs for its chart)
set -euo pipefail

# python3-jwt, python3-cryptography: the test bed's token server
# (scripts/tokenserver.py) for the registry with short-lived tokens.
# golang-github-containerd-stargz-snapshotter-dev: the Go estargz package
# the test bed's reference checker is built with (scripts/go-tools.sh).
PKGS=(containerd runc docker-registry skopeo stargz-snapshotter fuse3 umoci
      busybox-static iproute2 protobuf-compiler python3-minimal libpython3.11-stdlib
      golang-1.19-src golang-1.19-go golang-github-containerd-stargz-snapshotter-dev
      ca-certificates curl jq shellcheck python3-jwt python3-cryptography)
# Only the benchmark's chart needs matplotlib: the test path stays lean.
if [ "${1:-}" = --bench ]; then
  PKGS+=(python3-matplotlib)
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged daemons; the test bed runs its own instances.
for svc in containerd docker-registry; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
echo "install-deps: done"
