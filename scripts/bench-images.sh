#!/usr/bin/env bash
# The two extra images of `make bench` (S4, S5), built once into the image
# cache that scripts/images.sh keeps ($TARN_IMAGE_CACHE):
#
#   bench-bigfile        busybox + one layer holding /data/big.bin (1 GiB of
#                        random bytes, so neither gzip nor dedup shortcuts it)
#   bench-manyfiles      busybox + one layer of 50,000 small files in
#                        /data/NNN/NNNNN (100 directories of 500)
#   bench-*-esgz         their eStargz forms (ctr-remote, level 1: the
#                        content is random, a higher level buys nothing)
#
#   bench-images.sh build
#   bench-images.sh path NAME
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# testbed.sh and images.sh (overridable to try this script against another
# checkout's copies).
BED_SCRIPTS="${TARN_BED_SCRIPTS:-$SCRIPTS}"
CACHE="${TARN_IMAGE_CACHE:-/var/cache/tarn-images}"
BIG_MIB="${BENCH_BIGFILE_MIB:-1024}"
MANY_FILES="${BENCH_MANY_FILES:-50000}"

log() { echo "bench-images: $*" >&2; }

have() { [ -f "$CACHE/$1/index.json" ]; }

stage_manyfiles() {
  local root="$1" per_dir=500 d i
  for ((d = 0; d * per_dir < MANY_FILES; d++)); do
    mkdir -p "$root/data/$(printf %03d "$d")"
    for ((i = d * per_dir; i < (d + 1) * per_dir && i < MANY_FILES; i++)); do
      # Distinct small contents: each file is one TOC entry and one chunk.
      echo "file $i" >"$root/data/$(printf %03d "$d")/$(printf %05d "$i")"
    done
  done
}

build_plain() {
  local name="$1" work="$CACHE/.work/$1"
  rm -rf "$work"
  mkdir -p "$work/tree/data"
  case "$name" in
    bench-bigfile) head -c "$((BIG_MIB << 20))" /dev/urandom >"$work/tree/data/big.bin" ;;
    bench-manyfiles) stage_manyfiles "$work/tree" ;;
  esac
  skopeo copy -q "oci:$CACHE/busybox:latest" "oci:$work/layout:latest"
  umoci insert --image "$work/layout:latest" "$work/tree" / >/dev/null
  umoci config --image "$work/layout:latest" --config.cmd sleep --config.cmd 3600 >/dev/null
  umoci gc --layout "$work/layout"
  rm -rf "${CACHE:?}/$name"
  mv "$work/layout" "$CACHE/$name"
  rm -rf "$work"
}

# Converts NAME (plain, in the cache) to NAME-esgz inside a private test bed.
convert() {
  local name="$1" bed
  bed="$(mktemp -d /tmp/tarn-bench-images.XXXXXX)"
  # shellcheck disable=SC2064 # expand $bed now
  trap "'$BED_SCRIPTS/testbed.sh' down '$bed/tb' >/dev/null 2>&1 || true; rm -rf '$bed'" EXIT
  "$BED_SCRIPTS/testbed.sh" up "$bed/tb" --registry --containerd
  local reg sock
  # shellcheck disable=SC1091
  reg="$(. "$bed/tb/env" && echo "$REGISTRY")"
  sock="$bed/tb/containerd.sock"
  skopeo copy -q --dest-tls-verify=false "oci:$CACHE/$name:latest" "docker://$reg/$name:latest"
  ctr --address "$sock" image pull --plain-http "$reg/$name:latest" >/dev/null
  ctr-remote --address "$sock" image convert --estargz --oci --estargz-compression-level 1 \
    "$reg/$name:latest" "$reg/$name-esgz:latest" >/dev/null
  ctr-remote --address "$sock" image push --plain-http "$reg/$name-esgz:latest" >/dev/null
  rm -rf "$CACHE/.work/$name-esgz"
  mkdir -p "$CACHE/.work"
  skopeo copy -q --src-tls-verify=false "docker://$reg/$name-esgz:latest" "oci:$CACHE/.work/$name-esgz:latest"
  rm -rf "${CACHE:?}/$name-esgz"
  mv "$CACHE/.work/$name-esgz" "$CACHE/$name-esgz"
  "$BED_SCRIPTS/testbed.sh" down "$bed/tb" >/dev/null
  rm -rf "$bed"
  trap - EXIT
}

cmd_build() {
  "$BED_SCRIPTS/images.sh" build busybox >/dev/null
  mkdir -p "$CACHE"
  # The same lock as images.sh: one builder at a time.
  exec 9>"$CACHE/.lock"
  flock 9
  local name start
  for name in bench-bigfile bench-manyfiles; do
    if ! have "$name"; then
      start=$SECONDS
      build_plain "$name"
      log "built $name in $((SECONDS - start))s"
    fi
    if ! have "$name-esgz"; then
      start=$SECONDS
      convert "$name"
      log "converted $name in $((SECONDS - start))s"
    fi
  done
  exec 9>&-
}

case "${1:-}" in
  build) cmd_build ;;
  path) echo "$CACHE/$2" ;;
  *)
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
