#!/usr/bin/env bash
# The demo: the same 5-layer image (busybox, Python, Go source, Go toolchain,
# an app) pulled and run twice on a private test bed, once in full with
# containerd's own overlayfs snapshotter and once lazily with tarn, printing
# the time each took and the bytes each fetched from the registry. Everything
# it starts is stopped and unmounted when it ends, also on failure or Ctrl-C.
#
#   demo.sh [--full-only]    (--full-only: only the overlayfs baseline)
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FULL_ONLY=0
case "${1:-}" in
  "") ;;
  --full-only) FULL_ONLY=1 ;;
  *)
    echo "usage: demo.sh [--full-only]" >&2
    exit 2
    ;;
esac

if [ -t 1 ]; then
  say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
  say() { printf '\n==> %s\n' "$*"; }
fi

# Built binaries are in $TARN_BIN_DIR (default target/release).
BIN_DIR="${TARN_BIN_DIR:-$SCRIPTS/../target/release}"
WORK="$(mktemp -d /tmp/tarn-demo.XXXXXX)"
BED="$WORK/bed"
cleanup() {
  say "cleaning up"
  "$SCRIPTS/testbed.sh" down "$BED" || {
    echo "demo: cleanup failed; $WORK kept" >&2
    return
  }
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Body bytes the registry has sent so far, from its access log (read by
# tarn-bench, the one parser of that log: "bytes=N requests=M").
registry_bytes() {
  local facts
  facts="$("$BIN_DIR/tarn-bench" traffic "$REGISTRY_LOG")"
  facts="${facts#bytes=}"
  echo "${facts%% *}"
}

mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

say "starting the test bed (registry, containerd$([ "$FULL_ONLY" = 1 ] || echo ", tarn-snapshotter"))"
if [ "$FULL_ONLY" = 1 ]; then
  "$SCRIPTS/testbed.sh" up "$BED" --registry --containerd
else
  "$SCRIPTS/testbed.sh" up "$BED" --all
fi
# shellcheck disable=SC1091
. "$BED/env"
CTR=(ctr --address "$CONTAINERD_SOCK")
TARN="$BIN_DIR/tarn"

say "pushing the sample image (5 layers) as plain gzip and as eStargz"
"$SCRIPTS/images.sh" push multi "$REGISTRY"
[ "$FULL_ONLY" = 1 ] || "$SCRIPTS/images.sh" push multi-esgz "$REGISTRY"

check_output() {
  grep -q "tarn test workload" <<<"$1" || {
    echo "demo: unexpected workload output:" >&2
    echo "$1" >&2
    exit 1
  }
}

say "full pull + run with containerd's overlayfs snapshotter"
b0="$(registry_bytes)"
t0="$(now)"
"${CTR[@]}" image pull --plain-http "$REGISTRY/multi:latest" >/dev/null
out="$("${CTR[@]}" run --rm --snapshotter overlayfs "$REGISTRY/multi:latest" "demo-full-$$" /app/run.sh)"
t1="$(now)"
b1="$(registry_bytes)"
echo "$out"
check_output "$out"
FULL_TIME="$(elapsed "$t0" "$t1")"
FULL_BYTES=$((b1 - b0))

if [ "$FULL_ONLY" = 0 ]; then
  say "lazy pull + run with tarn"
  t0="$(now)"
  # tarn pull gives each layer's Prepare the labels a lazy snapshotter needs
  # (image reference, layer digest, TOC digest); tarn answers at once for
  # every eStargz layer and containerd downloads nothing.
  "$TARN" pull --address "$CONTAINERD_SOCK" --admin-address "$TARN_ADMIN_SOCK" --snapshotter tarn "$REGISTRY/multi-esgz:latest"
  out="$("${CTR[@]}" run --rm --snapshotter tarn "$REGISTRY/multi-esgz:latest" "demo-lazy-$$" /app/run.sh)"
  t1="$(now)"
  # Measured at once: tarn may go on fetching in the background.
  b2="$(registry_bytes)"
  echo "$out"
  check_output "$out"
  LAZY_TIME="$(elapsed "$t0" "$t1")"
  LAZY_BYTES=$((b2 - b1))
  say "what tarn fetched per layer (tarn status)"
  "$TARN" status --admin-address "$TARN_ADMIN_SOCK"
fi

say "results (pull + run of /app/run.sh)"
printf '  %-34s %9s %14s\n' "" "time" "from registry"
printf '  %-34s %8ss %14s\n' "full pull, overlayfs" "$FULL_TIME" "$(mb "$FULL_BYTES")"
if [ "$FULL_ONLY" = 0 ]; then
  printf '  %-34s %8ss %14s\n' "lazy pull, tarn" "$LAZY_TIME" "$(mb "$LAZY_BYTES")"
fi
