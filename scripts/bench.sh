#!/usr/bin/env bash
# `make bench`: tarn's benchmark (issue 5). Runs the scenarios against a
# private registry, behind the far-registry emulator (tarn-farproxy) for the
# far profiles, with fresh containerd and tarn daemons per run; prints a
# table with ratios against the baselines measured in the same run and the
# issue's targets; writes OUT/records.jsonl, OUT/results.json and
# OUT/results.png. This script only runs things and notes raw facts per run
# (start and end times, registry log marks, what a measuring subcommand
# printed); every number is computed by tarn-bench (`records`, `report`).
#
#   bench.sh [--profiles P,...] [--scenarios S,...] [--out DIR]
#
# Profiles: loopback (no proxy), rtt50, rtt100, rtt200 (all at 100 Mbit/s),
# thin40 (RTT 40 ms, 20 Mbit/s) and thin100 (RTT 100 ms, 10 Mbit/s); the
# thin ones run S1 only.
# Scenarios: S1 pull+create+run (tarn, tarn optimized by ctr-remote and by
# tarn optimize, tarn with no speculation as a baseline, overlayfs), S2
# background fetch (profiles with a rate limit), S3 20 concurrent pulls, S4
# cached read and walk (once, local), S5 daemon RSS per TOC entry (once,
# local).
# P7 two images sharing ~80% of their files and no layer (registry bytes of
# the second after the first against it alone; the cache's disk against the
# distinct bytes of both).
# G1 the break-even of carrying a cached chunk inside one GET: two 64 KiB
# ranges with a gap between, one GET against two at once, per profile.
# S6 (issue 15) the reference image converted to overlaybd by `tarn convert`,
# pull+run against the same image as eStargz and containerd's own pull, in
# the same profile (not on the thin ones); S4 then also reads and walks the
# bench images as overlaybd disks (ext4 over a loop device over FUSE); both
# with the loop device's direct I/O (the default) and buffered. S4 measures warm and with
# the kernel's caches dropped (cold_*, with the page cache that pass took).
# S7 (issue 17) BENCH_S7_NODES nodes (default 4), each its own containerd
# and tarn, start the reference image at once through the profile's shared
# link: peers off, peers on, and one node alone (not on the thin ones);
# BENCH_S7_REPS runs of each give the median (default 1).
# The environment works too: PROFILES, SCENARIOS, BENCH_OUT; BENCH_STEP_TIMEOUT
# bounds each step (default 600 s), BENCH_STRICT=1 fails unless every target
# passes, BENCH_S3_OVERLAYFS=0 skips S3's slow overlayfs reference,
# BENCH_S1_OVERLAYFS=0 S1's (to try tarn settings through
# TARN_CONFIG_EXTRA; BENCH_S1_VARIANTS=tarn,tarn-nospec runs only those of
# S1's tarn variants), BENCH_S1_REPS sets how many S1 tarn runs give the
# median (default 3), BENCH_S3_REPS how many S3 tarn runs of each kind
# (default 9), BENCH_CACHE_MAX_BYTES bounds tarn's cache in S1 and S4 (the
# cost of eviction on the read path; the records note the bound and the
# evictions). BENCH_BASE_BIN_DIR names another build's binaries (a
# directory like target/release): S1 then also runs `tarn-base` with them,
# right after `tarn` in each profile, and reports tarn against it (a change
# must not slow the 100 Mbit/s profiles). Everything started is stopped by
# PID on exit, also on failure.
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPTS/.." && pwd)"
BED_SCRIPTS="${TARN_BED_SCRIPTS:-$SCRIPTS}"
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

PROFILES="${PROFILES:-loopback,rtt50,rtt100,rtt200,thin40,thin100}"
SCENARIOS="${SCENARIOS:-S1,S2,S3,S4,S5,P7,G1,S6,S7}"
OUT="${BENCH_OUT:-$REPO_ROOT/bench}"
STEP_TIMEOUT="${BENCH_STEP_TIMEOUT:-600}"
CONCURRENT=20
# tarn's own debug events (Prepare, resolve) without the per-request
# debug lines of FUSE, HTTP/2 and hyper, which cost time on the paths timed.
export TARN_LOG_LEVEL="${TARN_LOG_LEVEL:-info,tarn_snapshotter=debug,tarn_fs=debug}"
RATE_MBIT=100

while [ "$#" -gt 0 ]; do
  case "$1" in
    --profiles) PROFILES="$2"; shift 2 ;;
    --scenarios) SCENARIOS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
      exit 2
      ;;
  esac
done
[ "$PROFILES" = all ] && PROFILES=loopback,rtt50,rtt100,rtt200,thin40,thin100

log() { echo "bench: $*" >&2; }
die() { log "error: $*"; exit 1; }

# profile NAME -> "RTT_MS RATE_MBIT" (loopback: no proxy at all)
profile_params() {
  case "$1" in
    loopback) echo "0 0" ;;
    rtt50) echo "50 $RATE_MBIT" ;;
    rtt100) echo "100 $RATE_MBIT" ;;
    rtt200) echo "200 $RATE_MBIT" ;;
    thin40) echo "40 20" ;;
    thin100) echo "100 10" ;;
    *) die "unknown profile $1 (known: loopback rtt50 rtt100 rtt200 thin40 thin100)" ;;
  esac
}
IFS=, read -r -a PROFILE_LIST <<<"$PROFILES"
for p in "${PROFILE_LIST[@]}"; do profile_params "$p" >/dev/null; done
wants() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
# S1's tarn variants to run (BENCH_S1_VARIANTS, default all of them).
S1_VARIANTS="${BENCH_S1_VARIANTS:-tarn,tarn-opt,tarn-topt,tarn-prof,tarn-nospec}"
s1_wants() { [[ ",$S1_VARIANTS," == *",$1,"* ]]; }

# ---------------------------------------------------------------- binaries

# Built binaries are in $TARN_BIN_DIR (default target/release), the one
# place the tests and the test bed look too.
TARN_BIN_DIR="${TARN_BIN_DIR:-$REPO_ROOT/target/release}"
export TARN_BIN_DIR
bin() {
  [ -x "$TARN_BIN_DIR/$1" ] && echo "$TARN_BIN_DIR/$1" && return 0
  die "$TARN_BIN_DIR/$1 not found (run cargo build --release --workspace, or set TARN_BIN_DIR)"
}
BENCH_BIN="$(bin tarn-bench)"
PROXY_BIN="$(bin tarn-farproxy)"
# The CLI may be missing while the daemon is being built: its variants then
# fail with that reason.
TARN_BIN="$(bin tarn 2>/dev/null || echo "")"

# ---------------------------------------------------------------- lifecycle

WORK="$(mktemp -d /tmp/tarn-bench.XXXXXX)"
NOTES="$WORK/notes.jsonl"
: >"$NOTES"
PROXY_PIDS=()
BEDS=()

cleanup() {
  local rc=$? b pid
  for b in "${BEDS[@]}"; do
    [ -d "$b" ] && { "$BED_SCRIPTS/testbed.sh" down "$b" >/dev/null 2>&1 || log "down $b failed"; }
  done
  for pid in "${PROXY_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# bed_up NAME FLAGS...: a fresh test bed; its env is sourced (CONTAINERD_SOCK,
# TARN_ADMIN_SOCK, TARN_PID...). REGISTRY in the environment is what
# testbed.sh configures containerd and tarn to reach (plain HTTP).
bed_up() {
  local name="$1"
  shift
  BED="$WORK/$name"
  BEDS+=("$BED")
  unset CONTAINERD_SOCK TARN_ADMIN_SOCK TARN_PID CONTAINERD_STATE
  if ! REGISTRY="$TARGET" timeout "$STEP_TIMEOUT" "$BED_SCRIPTS/testbed.sh" up "$BED" "$@" >"$BED.up.log" 2>&1; then
    # The daemon's own first error says more than testbed.sh's summary.
    local why
    why="$(grep -h -m1 -E '^Error|panicked|error' "$BED/tarn.log" "$BED/containerd.log" "$BED.up.log" 2>/dev/null |
      head -n1 | cut -c1-160)"
    REASON="test bed did not start: ${why:-see $BED.up.log}"
    return 1
  fi
  # shellcheck disable=SC1091
  . "$BED/env"
}

# Stops the bed and deletes it, keeping its logs in BED.logs: every bed
# holds a containerd root with an unpacked image, and a run makes dozens.
# A bed whose down failed (something still mounted) is left alone.
bed_down() {
  if ! "$BED_SCRIPTS/testbed.sh" down "$BED" >"$BED.down.log" 2>&1; then
    log "down $BED failed (see $BED.down.log); left in place"
    return 0
  fi
  mkdir -p "$BED.logs"
  cp "$BED"/*.log "$BED.logs/" 2>/dev/null || true
  rm -rf "$BED"
}

# step LOG CMD...: run CMD bounded in time, output to LOG; on failure REASON
# says why in one line.
step() {
  local logfile="$1" rc=0
  shift
  timeout "$STEP_TIMEOUT" "$@" >>"$logfile" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] && return 0
  if [ "$rc" -eq 124 ]; then
    REASON="$(basename "$1") timed out after ${STEP_TIMEOUT}s"
  else
    REASON="$(basename "$1") exited $rc: $(grep -v '^\s*$' "$logfile" | tail -n1 | cut -c1-160)"
  fi
  return 1
}

# A moment, in Unix seconds: the start and end facts of a run.
now() { date +%s.%N; }

# note PROFILE SCENARIO VARIANT [--rep] [--fail REASON] [NAME=VALUE]...:
# writes down one run for tarn-bench, which makes the records of the notes
# (seconds from start/end, registry traffic from reg_from/reg_to, the
# median of --rep runs) and logs the note.
note() {
  local profile="$1" scenario="$2" variant="$3"
  shift 3
  "$BENCH_BIN" note "$NOTES" --profile "$profile" --scenario "$scenario" --variant "$variant" "$@"
}

# The registry log's size now: a mark, for the reg_from and reg_to facts.
reg_mark() { stat -c %s "$REG_LOG"; }

# Whether tarn's pull was lazy: LAZY holds its facts (layers=N), or REASON
# says why not.
tarn_lazy_check() {
  local out
  if ! out="$("$BENCH_BIN" lazy-check --admin "$TARN_ADMIN_SOCK" 2>"$BED.layers.err")"; then
    REASON="$(tail -n1 "$BED.layers.err")"
    REASON="${REASON#tarn-bench: }"
    return 1
  fi
  read -ra LAZY <<<"$out"
}

# The daemon's configuration for S1 and S4: TARN_CONFIG_EXTRA, plus the
# cache bound of BENCH_CACHE_MAX_BYTES when set.
bounded_config() {
  local extra="${TARN_CONFIG_EXTRA:-}"
  if [ -n "${BENCH_CACHE_MAX_BYTES:-}" ]; then
    extra="${extra:+$extra$'\n'}[cache]"$'\n'"max_bytes = $BENCH_CACHE_MAX_BYTES"
  fi
  printf '%s' "$extra"
}

# TARN_CONFIG_EXTRA with overlaybd's loop devices on buffered I/O (direct
# is the default).
loop_buffered_config() {
  printf '%s' "${TARN_CONFIG_EXTRA:+$TARN_CONFIG_EXTRA$'\n'}"$'[snapshotter]\nloop_direct_io = false'
}

# Evictions and the bound after a run with BENCH_CACHE_MAX_BYTES, into
# CACHE_FACTS (none without a bound).
cache_facts() {
  CACHE_FACTS=()
  [ -n "${BENCH_CACHE_MAX_BYTES:-}" ] || return 0
  local out
  out="$("$BENCH_BIN" cache-stats --admin "$TARN_ADMIN_SOCK" 2>>"$1")" || return 0
  read -ra CACHE_FACTS <<<"$out"
}

tarn_pull() {
  [ -n "$TARN_BIN" ] || { REASON="the tarn CLI is not built"; return 1; }
  step "$1" "$TARN_BIN" pull --plain-http --address "$CONTAINERD_SOCK" --admin-address "$TARN_ADMIN_SOCK" "$2"
}

# ---------------------------------------------------------------- images

images_up() {
  log "building images (cached in ${TARN_IMAGE_CACHE:-/var/cache/tarn-images})"
  "$BED_SCRIPTS/images.sh" build busybox busybox-esgz python-esgz multi multi-esgz multi-esgz-opt >/dev/null
  if wants S4 || wants S5; then "$SCRIPTS/bench-images.sh" build; fi
  if wants P7; then "$BED_SCRIPTS/images.sh" build p7-a-esgz p7-b-esgz >/dev/null; fi
  if wants S4 || wants S6; then
    [ -n "$TARN_BIN" ] || die "S4 and S6 convert images to overlaybd: the tarn CLI is not built"
  fi
  REGBED="$WORK/registry"
  BEDS+=("$REGBED")
  "$BED_SCRIPTS/testbed.sh" up "$REGBED" --registry >/dev/null 2>&1 || die "the registry did not start"
  # shellcheck disable=SC1091
  REG_ADDR="$(. "$REGBED/env" && echo "$REGISTRY")"
  # shellcheck disable=SC1091
  REG_LOG="$(. "$REGBED/env" && echo "$REGISTRY_LOG")"
  local name
  local names=(busybox-esgz python-esgz multi multi-esgz multi-esgz-opt)
  if wants P7; then names+=(p7-a-esgz p7-b-esgz); fi
  for name in "${names[@]}"; do
    "$BED_SCRIPTS/images.sh" push "$name" "$REG_ADDR"
  done
  if wants S4 || wants S5; then
    for name in bench-bigfile bench-bigfile-esgz bench-manyfiles bench-manyfiles-esgz; do
      skopeo copy -q --dest-tls-verify=false "oci:$("$SCRIPTS/bench-images.sh" path "$name"):latest" \
        "docker://$REG_ADDR/$name:latest"
    done
  fi
  # overlaybd images are made here, by tarn's converter, from the images
  # just pushed (root and a loop device; a minute or two for all three).
  local obd=()
  if wants S6; then obd+=(multi); fi
  if wants S4; then obd+=(bench-bigfile bench-manyfiles); fi
  for name in "${obd[@]}"; do
    "$TARN_BIN" convert --format overlaybd --plain-http --work-dir "$WORK" \
      "$REG_ADDR/$name:latest" "$REG_ADDR/$name-obd:latest" >"$WORK/convert-$name.log" 2>&1 ||
      die "tarn convert --format overlaybd $name failed: $(tail -n1 "$WORK/convert-$name.log")"
  done
  # S1's `tarn-topt`: the plain reference image optimized by `tarn
  # optimize` (its workload run once through containerd and tarn), beside
  # ctr-remote's `multi-esgz-opt`.
  if wants S1 && s1_wants tarn-topt; then
    [ -n "$TARN_BIN" ] || die "S1 optimizes an image with tarn: the tarn CLI is not built"
    TARGET="$REG_ADDR" bed_up images-topt --containerd --tarn || die "$REASON"
    "$TARN_BIN" optimize --plain-http --period 60 --address "$CONTAINERD_SOCK" \
      --admin-address "$TARN_ADMIN_SOCK" --work-dir "$WORK" \
      "$REG_ADDR/multi:latest" "$REG_ADDR/multi-topt:latest" -- /app/run.sh \
      >"$WORK/optimize-multi.log" 2>&1 ||
      die "tarn optimize multi failed: $(tail -n1 "$WORK/optimize-multi.log")"
    bed_down
  fi
  if wants S1 && s1_wants tarn-prof; then learn_profile; fi
  log "registry $REG_ADDR holds the images"
}

# S1's `tarn-prof`: the plain lazy image's start profile, learned by one
# run of its workload on a node with [profile] on, then pushed to the
# registry beside the image (`tarn profile push`), where S1's fresh nodes
# find it at pull.
learn_profile() {
  local ref="$REG_ADDR/multi-esgz:latest" lg="$WORK/learn-profile.log" i
  TARN_CONFIG_EXTRA="$PROFILE_CONFIG" TARGET="$REG_ADDR" bed_up images-profile --containerd --tarn ||
    die "$REASON"
  if ! { tarn_pull "$lg" "$ref" &&
    step "$lg" ctr --address "$CONTAINERD_SOCK" run --rm --snapshotter tarn "$ref" "learn-$$" /app/run.sh &&
    check_workload "$lg"; }; then
    die "the profile's learning run failed: ${REASON:-see $lg}"
  fi
  # The recording ends when the container's snapshot goes (`--rm`).
  for i in $(seq 300); do
    "$TARN_BIN" profile show --plain-http --admin-address "$TARN_ADMIN_SOCK" "$ref" >"$WORK/profile.json" 2>>"$lg" && break
    sleep 0.2
  done
  step "$lg" "$TARN_BIN" profile push --plain-http --admin-address "$TARN_ADMIN_SOCK" "$ref" ||
    die "tarn profile push failed: $(tail -n1 "$lg")"
  bed_down
}

# The far registry of a profile: a proxy in front of the shared registry;
# sets TARGET to the address clients use.
proxy_up() {
  local rtt rate
  read -r rtt rate <<<"$(profile_params "$1")"
  if [ "$rtt" = 0 ] && [ "$rate" = 0 ]; then
    TARGET="$REG_ADDR"
    return 0
  fi
  local addr_file="$WORK/proxy-$1.addr"
  "$PROXY_BIN" --upstream "$REG_ADDR" --listen 127.0.0.1:0 --addr-file "$addr_file" \
    --rtt-ms "$rtt" --rate-mbit "$rate" >"$WORK/proxy-$1.log" 2>&1 &
  PROXY_PIDS+=("$!")
  local i
  for i in $(seq 100); do
    [ -s "$addr_file" ] && break
    sleep 0.1
  done
  [ -s "$addr_file" ] || die "tarn-farproxy for $1 did not start: $(tail -n1 "$WORK/proxy-$1.log")"
  TARGET="$(cat "$addr_file")"
  log "profile $1: registry behind $TARGET (rtt ${rtt} ms, ${rate} Mbit/s)"
}

# ---------------------------------------------------------------- scenarios

check_workload() {
  grep -q "tarn test workload" "$1" || { REASON="workload output missing (see $1)"; return 1; }
}

# S1 overlayfs: containerd's own full pull, then run (noted under SCENARIO,
# default S1).
s1_overlayfs() {
  local p="$1" s="${2:-S1}" ref="$TARGET/multi:latest" lg="$WORK/$1-s1-overlayfs.log" mark t0 t1
  REASON=""
  if bed_up "$p-$s-overlayfs" --containerd; then
    mark="$(reg_mark)"
    t0="$(now)"
    if step "$lg" ctr --address "$CONTAINERD_SOCK" image pull --plain-http "$ref" &&
      step "$lg" ctr --address "$CONTAINERD_SOCK" run --rm --snapshotter overlayfs "$ref" "bench-$$" /app/run.sh &&
      check_workload "$lg"; then
      t1="$(now)"
      note "$p" "$s" overlayfs start="$t0" end="$t1" reg_from="$mark" reg_to="$(reg_mark)"
    else
      note "$p" "$s" overlayfs --fail "$REASON"
    fi
    bed_down
  else
    note "$p" "$s" overlayfs --fail "$REASON"
  fi
}

# repeat PROFILE SCENARIO VARIANT REPS CMD...: runs `CMD... REP` for REP
# in 1..REPS, each on fresh daemons, each noting its run with --rep (or
# setting REASON, and FAILED_FACTS to what it measured, and failing: the
# variant fails, with that reason).
repeat() {
  local p="$1" scenario="$2" variant="$3" reps="$4" r
  shift 4
  for ((r = 1; r <= reps; r++)); do
    FAILED_FACTS=()
    if ! "$@" "$r"; then
      note "$p" "$scenario" "$variant" --fail "$REASON" "${FAILED_FACTS[@]}"
      return 0
    fi
  done
}

# s1_tarn PROFILE VARIANT IMAGE [SCENARIO]: the median of BENCH_S1_REPS
# (default 3) runs, noted under SCENARIO (default S1).
s1_tarn() {
  local s="${4:-S1}"
  repeat "$1" "$s" "$2" "${BENCH_S1_REPS:-3}" s1_tarn_run "$1" "$2" "$3" "$s"
}

# [profile] on: S1's `tarn-prof` and the run that learns its profile.
PROFILE_CONFIG=$'[profile]\nenabled = true'

# S1 on a fresh node with start profiles on: the plain lazy image, its
# profile fetched from the registry at pull.
s1_profile() {
  local extra="${TARN_CONFIG_EXTRA:-}"
  export TARN_CONFIG_EXTRA="${extra:+$extra$'\n'}$PROFILE_CONFIG"
  s1_tarn "$1" tarn-prof multi-esgz
  if [ -n "$extra" ]; then export TARN_CONFIG_EXTRA="$extra"; else unset TARN_CONFIG_EXTRA; fi
}

# S1 tarn fetching nothing ahead of reads (no read-ahead, no hints, no
# prioritized files): the baseline speculation must beat on thin links.
s1_nospec() {
  local extra="${TARN_CONFIG_EXTRA:-}"
  export TARN_CONFIG_EXTRA=$'[fetch]\nspeculate = false'
  s1_tarn "$1" tarn-nospec multi-esgz
  if [ -n "$extra" ]; then export TARN_CONFIG_EXTRA="$extra"; else unset TARN_CONFIG_EXTRA; fi
}

# One lazy pull and run, noted with the lazy layers, or REASON. Bytes are
# counted right after the run, before any background fetch could add to
# them, then the daemons go.
s1_tarn_run() {
  local p="$1" variant="$2" image="$3" s="$4" r="$5" ref lg mark t0 t1 mark1 ok=1
  ref="$TARGET/$image:latest"
  lg="$WORK/$p-$s-$variant-$r.log"
  REASON=""
  TARN_CONFIG_EXTRA="$(bounded_config)" bed_up "$p-$s-$variant-$r" --containerd --tarn || return 1
  mark="$(reg_mark)"
  t0="$(now)"
  if tarn_pull "$lg" "$ref" &&
    step "$lg" ctr --address "$CONTAINERD_SOCK" run --rm --snapshotter tarn "$ref" "bench-$$" /app/run.sh &&
    check_workload "$lg"; then
    t1="$(now)"
    mark1="$(reg_mark)"
    if tarn_lazy_check; then
      cache_facts "$lg"
      note "$p" "$s" "$variant" --rep start="$t0" end="$t1" reg_from="$mark" reg_to="$mark1" "${LAZY[@]}" \
        "${CACHE_FACTS[@]}"
      ok=0
    else
      # What the failed run took and fetched still belongs in its reason:
      # measured, not made up.
      FAILED_FACTS=(start="$t0" end="$t1" reg_from="$mark" reg_to="$mark1")
    fi
  fi
  bed_down
  return "$ok"
}

# S2: time until tarn has every chunk of multi-esgz, from the start of the
# pull, against the link's capacity and against skopeo copy through the
# same proxy.
s2() {
  local p="$1" rate ref="$TARGET/multi-esgz:latest" lg="$WORK/$1-s2.log" mark t0 t1 end image
  read -r _ rate <<<"$(profile_params "$p")"
  image="$("$BENCH_BIN" layout-bytes "$("$BED_SCRIPTS/images.sh" path multi-esgz)")"
  REASON=""
  # The scenario measures the daemon's background fetch: turn it on.
  export TARN_CONFIG_EXTRA=$'[fetch]\nbackground = true'
  local up=0
  bed_up "$p-s2-tarn" --containerd --tarn || up=$?
  unset TARN_CONFIG_EXTRA
  if [ "$up" = 0 ]; then
    mark="$(reg_mark)"
    t0="$(now)"
    # The bytes fact is the image's (what the link must carry); the
    # registry's own count becomes registry_bytes.
    if tarn_pull "$lg" "$ref" &&
      end="$(timeout "$STEP_TIMEOUT" "$BENCH_BIN" wait-fetched --admin "$TARN_ADMIN_SOCK" \
        --min-layers 5 --timeout "$STEP_TIMEOUT" 2>>"$lg")"; then
      note "$p" S2 tarn-background start="$t0" "$end" "$image" reg_from="$mark" \
        reg_to="$(reg_mark)" rate_mbit="$rate"
    else
      [ -n "$REASON" ] || REASON="$(tail -n1 "$lg" | cut -c1-160)"
      note "$p" S2 tarn-background --fail "$REASON"
    fi
    bed_down
  else
    note "$p" S2 tarn-background --fail "$REASON"
  fi
  local dest="$WORK/$p-s2-skopeo"
  mark="$(reg_mark)"
  t0="$(now)"
  if step "$lg" skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$dest:latest"; then
    t1="$(now)"
    note "$p" S2 skopeo start="$t0" end="$t1" reg_from="$mark" reg_to="$(reg_mark)"
  else
    note "$p" S2 skopeo --fail "$REASON"
  fi
  rm -rf "$dest"
}

# kill_after SECS PID...: kills the PIDs after SECS seconds unless it is
# killed first (then it stops its sleep too).
kill_after() {
  local secs="$1" s
  shift
  sleep "$secs" &
  s=$!
  trap 'kill "$s" 2>/dev/null; exit 0' TERM
  wait "$s" && kill "$@" 2>/dev/null
}

# pull_n N LOG CMD...: N copies of CMD at once; fails unless all succeed.
# One watchdog bounds them all: a `timeout` per copy would add N process
# starts to what S3 times, and a pull here takes a tenth of a second.
pull_n() {
  local n="$1" lg="$2" i pids=() failed=0 watchdog
  shift 2
  for ((i = 0; i < n; i++)); do
    "$@" >"$lg.$i" 2>&1 &
    pids+=("$!")
  done
  kill_after "$STEP_TIMEOUT" "${pids[@]}" &
  watchdog=$!
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      failed=$((failed + 1))
      REASON="$failed of $n pulls failed; e.g. $(grep -v '^\s*$' "$lg.$i" | tail -n1 | cut -c1-140)"
    fi
  done
  if kill "$watchdog" 2>/dev/null; then
    wait "$watchdog" 2>/dev/null || true
  else
    REASON="pulls killed after ${STEP_TIMEOUT}s; $REASON"
  fi
  [ "$failed" -eq 0 ]
}

# S3: N concurrent pulls of one image against one pull, each on fresh
# daemons. A pull of this image takes 0.1-0.5 s, and single runs on
# loopback ranged over half as much again: tarn's are the median of
# BENCH_S3_REPS (default 9) runs of each, one pull and N taking turns so
# that both see the machine's same slow and fast spells.
s3_tarn() {
  local p="$1" n="$2" reps="$3" r
  for ((r = 1; r <= reps; r++)); do
    if ! s3_run "$p" tarn 1 "$r"; then
      note "$p" S3 tarn-1 --fail "$REASON"
      note "$p" S3 "tarn-$n" --fail "the one-pull run failed"
      return 0
    fi
    if ! s3_run "$p" tarn "$n" "$r"; then
      note "$p" S3 tarn-1 --fail "the $n-pull run failed"
      note "$p" S3 "tarn-$n" --fail "$REASON"
      return 0
    fi
  done
}

# The overlayfs reference: one run (minutes each).
s3_one() {
  repeat "$1" S3 "$2-$3" 1 s3_run "$1" "$2" "$3"
}

# One run of S3 on fresh daemons, noted as a repetition of KIND-N, or
# REASON.
s3_run() {
  local p="$1" kind="$2" n="$3" r="$4" ref lg mark t0 t1
  lg="$WORK/$p-s3-$kind-$n-$r.log"
  REASON=""
  local flags=(--containerd) cmd
  if [ "$kind" = tarn ]; then
    flags+=(--tarn)
    ref="$TARGET/multi-esgz:latest"
  else
    ref="$TARGET/multi:latest"
  fi
  bed_up "$p-s3-$kind-$n-$r" "${flags[@]}" || return 1
  if [ "$kind" = tarn ]; then
    if [ -z "$TARN_BIN" ]; then
      REASON="the tarn CLI is not built"
      bed_down
      return 1
    fi
    cmd=("$TARN_BIN" pull --plain-http --address "$CONTAINERD_SOCK" --admin-address "$TARN_ADMIN_SOCK" "$ref")
  else
    cmd=(ctr --address "$CONTAINERD_SOCK" image pull --plain-http "$ref")
  fi
  mark="$(reg_mark)"
  t0="$(now)"
  local ok=0
  if pull_n "$n" "$lg" "${cmd[@]}"; then
    t1="$(now)"
    # The daemon goes on fetching what it started during the pull (the
    # entrypoint): bytes are counted once the registry is quiet, so one
    # pull and twenty are compared on the same work.
    "$BENCH_BIN" settle "$REG_LOG"
    if [ "$kind" = overlayfs ] || tarn_lazy_check; then
      note "$p" S3 "$kind-$n" --rep start="$t0" end="$t1" reg_from="$mark" reg_to="$(reg_mark)"
      ok=1
    fi
  fi
  bed_down
  [ "$ok" = 1 ]
}

# s4_on KIND (overlayfs, tarn, tarn-rec, tarn-obd, tarn-obd-buffered): run a container
# that sleeps on that snapshotter, then read and walk
# through its rootfs mount from the host. The first pass fills the caches
# (tarn's chunk cache and the page cache), the second is measured.
s4_on() {
  local kind="$1" snap=tarn suffix="" lg="$WORK/local-s4-$1.log"
  case "$kind" in
    overlayfs) snap=overlayfs ;;
    tarn | tarn-rec) suffix=-esgz ;;
    tarn-obd*) suffix=-obd ;;
  esac
  REASON=""
  local flags=(--containerd) extra="${TARN_CONFIG_EXTRA:-}"
  [ "$snap" = tarn ] && flags+=(--tarn) && extra="$(bounded_config)"
  if ! TARN_CONFIG_EXTRA="$extra" bed_up "local-s4-$kind" "${flags[@]}"; then
    note local S4 "read-$kind" --fail "$REASON"
    note local S4 "walk-$kind" --fail "$REASON"
    return 0
  fi
  local what image id rootfs out
  for what in read walk; do
    if [ "$what" = read ]; then image=bench-bigfile$suffix; else image=bench-manyfiles$suffix; fi
    id="bench-$what-$$"
    local ref="$TARGET/$image:latest"
    REASON=""
    if [ "$snap" = tarn ]; then
      tarn_pull "$lg" "$ref" || { note local S4 "$what-$kind" --fail "$REASON"; continue; }
    else
      step "$lg" ctr --address "$CONTAINERD_SOCK" image pull --plain-http "$ref" ||
        { note local S4 "$what-$kind" --fail "$REASON"; continue; }
    fi
    if ! step "$lg" ctr --address "$CONTAINERD_SOCK" run -d --snapshotter "$snap" "$ref" "$id"; then
      note local S4 "$what-$kind" --fail "$REASON"
      continue
    fi
    rootfs="$CONTAINERD_STATE/io.containerd.runtime.v2.task/default/$id/rootfs"
    if [ "$what" = read ]; then
      out=(read "$rootfs/data/big.bin")
    else
      out=(walk "$rootfs/data")
    fi
    # One pass to fill the caches, then the median of three measured ones
    # (tarn-bench keeps the median pass), then three with the kernel's
    # caches dropped first: cold_*, with the page cache each took.
    local facts cold
    if step "$lg" "$BENCH_BIN" "${out[@]}" &&
      facts="$(timeout "$STEP_TIMEOUT" "$BENCH_BIN" "${out[@]}" --passes 3 2>>"$lg")" &&
      cold="$(timeout "$STEP_TIMEOUT" "$BENCH_BIN" "${out[@]}" --passes 3 --drop-caches 2>>"$lg")"; then
      read -ra cold <<<"$cold"
      read -ra facts <<<"$facts"
      facts+=("${cold[@]/#/cold_}")
      CACHE_FACTS=()
      if [ "$kind" = tarn ]; then
        cache_facts "$lg"
        # What the cache holds for this image against what it takes on
        # disk: whole-file objects for passthrough show here.
        local held
        if held="$("$BENCH_BIN" cache-figures --cache "$BED/tarn/cache" \
          "$("$SCRIPTS/bench-images.sh" path "$image")" 2>>"$lg")"; then
          read -ra held <<<"$held"
          CACHE_FACTS+=("${held[@]}")
        fi
      fi
      note local S4 "$what-$kind" "${facts[@]}" "${CACHE_FACTS[@]}"
    else
      note local S4 "$what-$kind" --fail "${REASON:-measurement failed}"
    fi
    timeout 30 ctr --address "$CONTAINERD_SOCK" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    timeout 30 ctr --address "$CONTAINERD_SOCK" task delete "$id" >/dev/null 2>&1 || true
    timeout 30 ctr --address "$CONTAINERD_SOCK" container rm "$id" >/dev/null 2>&1 || true
  done
  bed_down
}

# S5: RSS of the daemon with five images mounted, per TOC entry of the
# layers it serves.
s5() {
  local lg="$WORK/local-s5.log" image toc rss layouts=()
  REASON=""
  if ! bed_up local-s5 --containerd --tarn; then
    note local S5 tarn --fail "$REASON"
    return 0
  fi
  for image in busybox-esgz python-esgz multi-esgz multi-esgz-opt bench-manyfiles-esgz; do
    tarn_pull "$lg" "$TARGET/$image:latest" || { note local S5 tarn --fail "$REASON"; bed_down; return 0; }
    layouts+=("$("$BED_SCRIPTS/images.sh" path "$image")")
  done
  if toc="$("$BENCH_BIN" toc-entries --admin "$TARN_ADMIN_SOCK" "${layouts[@]}" 2>>"$lg")" &&
    rss="$("$BENCH_BIN" rss "${TARN_PID:?set by the test bed env}" 2>>"$lg")"; then
    read -ra toc <<<"$toc"
    note local S5 tarn "${toc[@]}" "$rss"
  else
    local why
    why="$(tail -n1 "$lg")"
    note local S5 tarn --fail "measurement failed: ${why#tarn-bench: }"
  fi
  bed_down
}

# p7_run PROFILE LOG IMAGE: lazy pull and run of IMAGE on the bed that is
# up, once the registry is quiet; P7_FACTS holds its start, end and marks,
# or REASON says why it failed.
p7_run() {
  local p="$1" lg="$2" ref="$TARGET/$3:latest" mark t0 t1
  "$BENCH_BIN" settle "$REG_LOG"
  mark="$(reg_mark)"
  t0="$(now)"
  tarn_pull "$lg" "$ref" &&
    step "$lg" ctr --address "$CONTAINERD_SOCK" run --rm --snapshotter tarn "$ref" "bench-p7-$$" /app/run.sh &&
    check_workload "$lg" || return 1
  t1="$(now)"
  # Read-ahead may still be landing: its bytes belong to this run.
  "$BENCH_BIN" settle "$REG_LOG"
  tarn_lazy_check || return 1
  P7_FACTS=(start="$t0" end="$t1" reg_from="$mark" reg_to="$(reg_mark)")
}

# P7: p7-b-esgz alone on fresh daemons, then p7-a-esgz and p7-b-esgz in
# turn on one node: the second image's registry bytes against its own
# alone, and the cache's disk against the distinct chunks of both it holds.
p7() {
  local p="$1" lg="$WORK/$1-p7.log" a b
  a="$("$BED_SCRIPTS/images.sh" path p7-a-esgz)"
  b="$("$BED_SCRIPTS/images.sh" path p7-b-esgz)"
  REASON=""
  if bed_up "$p-p7-alone" --containerd --tarn; then
    if p7_run "$p" "$lg" p7-b-esgz; then
      note "$p" P7 b-alone "${P7_FACTS[@]}"
    else
      note "$p" P7 b-alone --fail "$REASON"
    fi
    bed_down
  else
    note "$p" P7 b-alone --fail "$REASON"
  fi
  REASON=""
  if ! bed_up "$p-p7-pair" --containerd --tarn; then
    note "$p" P7 a-first --fail "$REASON"
    note "$p" P7 b-after-a --fail "$REASON"
    return 0
  fi
  if p7_run "$p" "$lg" p7-a-esgz; then
    note "$p" P7 a-first "${P7_FACTS[@]}"
    local held
    if p7_run "$p" "$lg" p7-b-esgz &&
      held="$("$BENCH_BIN" cache-figures --cache "$BED/tarn/cache" "$a" "$b" 2>>"$lg")"; then
      read -ra held <<<"$held"
      note "$p" P7 b-after-a "${P7_FACTS[@]}" "${held[@]}"
    else
      note "$p" P7 b-after-a --fail "${REASON:-$(tail -n1 "$lg" | cut -c1-160)}"
    fi
  else
    note "$p" P7 a-first --fail "$REASON"
    note "$p" P7 b-after-a --fail "the first image's run failed"
  fi
  bed_down
}

# G1: what carrying a cached chunk inside one GET costs against a second
# GET sent at once (issue 16's break-even, fetch/plan.rs's MAX_GAP), with
# tarn's registry client over this profile's link. No daemon: the GETs
# themselves.
g1() {
  local p="$1" lg="$WORK/$1-g1.log" out
  if out="$(timeout "$STEP_TIMEOUT" "$BENCH_BIN" gaps --plain-http "$TARGET/multi-esgz:latest" 2>>"$lg")"; then
    read -ra out <<<"$out"
    note "$p" G1 gets "${out[@]}"
  else
    note "$p" G1 gets --fail "$(tail -n1 "$lg" | cut -c1-160)"
  fi
}

# S7 (issue 17): N nodes (BENCH_S7_NODES, default 4), each its own
# containerd and tarn daemon (peers on 127.0.7.1, .2, ...), pull and run
# the reference workload at once through the profile's one far link: with
# peers off, with peers on, against one node alone (peers off) in the same
# run. A group's time is its slowest node's; its bytes are all the nodes'
# registry traffic.
S7_NODES="${BENCH_S7_NODES:-4}"
S7_PORT=7717

# The cluster's [peers] section for node I (1-based) of N.
s7_peers_config() {
  local i="$1" n="$2" j list=""
  for ((j = 1; j <= n; j++)); do list+="${list:+, }\"127.0.7.$j:$S7_PORT\""; done
  printf '[peers]\nlisten = "127.0.7.%s:%s"\nstatic = [%s]\ntoken_file = "%s"\n' \
    "$i" "$S7_PORT" "$list" "$WORK/peers.token"
}

# s7_group PROFILE VARIANT N PEERS(0|1) REP: N fresh nodes, then all at
# once; noted with --rep (or REASON, and failing).
s7_group() {
  local p="$1" variant="$2" n="$3" peers="$4" r="$5" ref="$TARGET/multi-esgz:latest" i mark t0 t1
  local socks=() admins=() beds=() pids=() ok=1 run="$1-S7-$2-$5"
  REASON=""
  (umask 077 && echo "bench-s7-$$" >"$WORK/peers.token")
  for ((i = 1; i <= n; i++)); do
    local extra=""
    if [ "$peers" = 1 ]; then extra="$(s7_peers_config "$i" "$n")"; fi
    if ! TARN_CONFIG_EXTRA="$extra" bed_up "$run-$i" --containerd --tarn; then
      ok=0
      break
    fi
    socks+=("$CONTAINERD_SOCK") admins+=("$TARN_ADMIN_SOCK") beds+=("$BED")
  done
  if [ "$ok" = 1 ]; then
    mark="$(reg_mark)"
    t0="$(now)"
    for ((i = 0; i < ${#beds[@]}; i++)); do
      (
        lg="$WORK/$run-$((i + 1)).log"
        CONTAINERD_SOCK="${socks[$i]}" TARN_ADMIN_SOCK="${admins[$i]}"
        if tarn_pull "$lg" "$ref" &&
          step "$lg" ctr --address "$CONTAINERD_SOCK" run --rm --snapshotter tarn "$ref" "bench-$$-$i" /app/run.sh &&
          check_workload "$lg"; then
          now >"$lg.end"
        else
          echo "node $((i + 1)): $REASON" >"$lg.fail"
          exit 1
        fi
      ) &
      pids+=("$!")
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || ok=0; done
    if [ "$ok" = 1 ]; then
      t1="$(sort -n "$WORK/$run-"*.log.end | tail -n1)"
      note "$p" S7 "$variant" --rep start="$t0" end="$t1" reg_from="$mark" reg_to="$(reg_mark)" nodes="$n"
    else
      REASON="$(cat "$WORK/$run-"*.log.fail 2>/dev/null | head -n1)"
    fi
  fi
  REASON="${REASON:-a node failed}"
  for BED in "${beds[@]}"; do bed_down; done
  [ "$ok" = 1 ]
}

# The median of BENCH_S7_REPS runs (default 1: each run starts 2N+1
# daemons) of each group.
s7() {
  local reps="${BENCH_S7_REPS:-1}"
  repeat "$1" S7 alone "$reps" s7_group "$1" alone 1 0
  repeat "$1" S7 peers-off "$reps" s7_group "$1" peers-off "$S7_NODES" 0
  repeat "$1" S7 peers-on "$reps" s7_group "$1" peers-on "$S7_NODES" 1
}

# ---------------------------------------------------------------- main

mkdir -p "$OUT"
log "profiles $PROFILES; scenarios $SCENARIOS; work dir $WORK"
images_up

for p in "${PROFILE_LIST[@]}"; do
  proxy_up "$p"
  if wants S1; then
    if [ "${BENCH_S1_OVERLAYFS:-1}" = 1 ]; then s1_overlayfs "$p"; fi
    if s1_wants tarn; then s1_tarn "$p" tarn multi-esgz; fi
    if [ -n "${BENCH_BASE_BIN_DIR:-}" ]; then
      TARN_BIN_DIR="$BENCH_BASE_BIN_DIR" s1_tarn "$p" tarn-base multi-esgz
    fi
    if s1_wants tarn-opt; then s1_tarn "$p" tarn-opt multi-esgz-opt; fi
    if s1_wants tarn-topt; then s1_tarn "$p" tarn-topt multi-topt; fi
    if s1_wants tarn-prof; then s1_profile "$p"; fi
    if s1_wants tarn-nospec; then s1_nospec "$p"; fi
  fi
  if wants G1; then g1 "$p"; fi
  # A thin link is S1's question (issue 20); the other scenarios would take
  # many minutes on it and answer nothing new.
  case "$p" in thin*) continue ;; esac
  if wants S6; then
    if [ "${BENCH_S1_OVERLAYFS:-1}" = 1 ]; then s1_overlayfs "$p" S6; fi
    s1_tarn "$p" tarn-esgz multi-esgz S6
    s1_tarn "$p" tarn-obd multi-obd S6
    TARN_CONFIG_EXTRA="$(loop_buffered_config)" s1_tarn "$p" tarn-obd-buffered multi-obd S6
  fi
  if wants S2; then
    read -r _ rate <<<"$(profile_params "$p")"
    if [ "$rate" != 0 ]; then s2 "$p"; fi
  fi
  if wants P7; then p7 "$p"; fi
  if wants S7; then s7 "$p"; fi
  if wants S3; then
    s3_tarn "$p" "$CONCURRENT" "${BENCH_S3_REPS:-9}"
    # The overlayfs reference of S3 is slow (containerd's lock back-off:
    # minutes per profile); BENCH_S3_OVERLAYFS=0 leaves it out.
    if [ "${BENCH_S3_OVERLAYFS:-1}" = 1 ]; then
      s3_one "$p" overlayfs 1
      s3_one "$p" overlayfs "$CONCURRENT"
    fi
  fi
done

# S4 and S5 do not depend on the network: run once, straight to the registry.
TARGET="$REG_ADDR"
if wants S4; then
  s4_on overlayfs
  s4_on tarn
  # The same with the container's first start recorded throughout (a start
  # profile being learned): what recording costs reads.
  TARN_CONFIG_EXTRA="${TARN_CONFIG_EXTRA:+$TARN_CONFIG_EXTRA$'\n'}$PROFILE_CONFIG"$'\nrecord_secs = 86400' s4_on tarn-rec
  s4_on tarn-obd
  TARN_CONFIG_EXTRA="$(loop_buffered_config)" s4_on tarn-obd-buffered
fi
if wants S5; then s5; fi

"$BENCH_BIN" records "$NOTES" --registry-log "$REG_LOG" --out "$OUT/records.jsonl"
cp "$NOTES" "$OUT/notes.jsonl"
strict=()
if [ "${BENCH_STRICT:-0}" = 1 ]; then strict=(--strict); fi
rc=0
"$BENCH_BIN" report "$OUT/records.jsonl" --out "$OUT/results.json" "${strict[@]}" >"$OUT/results.txt" || rc=$?
cat "$OUT/results.txt"
if "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
  "$PYTHON" "$SCRIPTS/bench-chart.py" "$OUT/results.json" "$OUT/results.png"
  log "chart: $OUT/results.png"
else
  log "no chart: python3-matplotlib is missing (scripts/install-deps.sh --bench)"
fi
log "results: $OUT/results.json"
[ "$rc" = 0 ]
