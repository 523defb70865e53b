#!/usr/bin/env bash
# `make fuzz`: builds the cargo-fuzz targets in fuzz/ (nightly, libFuzzer),
# writes their seed corpus with tarn's eStargz writer, and runs each target
# for a bounded time. Exits non-zero if the toolchain is missing or any
# target found a crash (kept in fuzz/artifacts/TARGET/).
#
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_TARGETS  which targets (default: footer toc chunk layer)
#   FUZZ_SANITIZER  none (default) or address: see fuzz/README.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${FUZZ_SECONDS:-60}"
read -r -a targets <<<"${FUZZ_TARGETS:-footer toc chunk layer}"
sanitizer="${FUZZ_SANITIZER:-none}"

# cargo-fuzz needs nightly; it cannot be downloaded here, so say so and fail
# rather than skip: a skipped fuzz run would look like a clean one.
if ! RUSTUP_AUTO_INSTALL=0 cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly Rust toolchain is not installed (rustup toolchain install nightly); cargo fuzz needs it" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

# Release with debug assertions and overflow checks: an overflow is a crash.
build=(-O -a -s "$sanitizer")
start=$SECONDS
cargo +nightly fuzz build "${build[@]}"
echo "fuzz: built in $((SECONDS - start))s (sanitizer $sanitizer)"

host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
# The layer target writes every target's seeds when asked (fuzz/src/seeds.rs).
TARN_FUZZ_WRITE_SEEDS=fuzz/corpus fuzz/target/"$host"/release/layer

failed=()
for t in "${targets[@]}"; do
  extra=()
  [ -d "fuzz/seeds/$t" ] && extra=("fuzz/seeds/$t")
  log="fuzz/target/fuzz-$t.log"
  echo "fuzz: $t for ${seconds}s"
  # -rss_limit_mb and -timeout: a blow-up in memory or time is a crash too
  # (the issue bounds a layer to 256 MB and 10 s; 512 MB leaves room for
  # libFuzzer itself).
  status=0
  cargo +nightly fuzz run "${build[@]}" "$t" "fuzz/corpus/$t" "${extra[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=512 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  # libFuzzer's last status line: executions, coverage, features, corpus.
  grep -E '^#[0-9]+' "$log" | tail -n 1 | sed "s/^/fuzz: $t: /" || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" |
    sed "s/^/fuzz: $t: /" || true
  if [ "$status" != 0 ]; then
    echo "fuzz: $t FAILED (exit $status); its log:" >&2
    tail -n 40 "$log" >&2
    failed+=("$t")
  fi
done

if [ "${#failed[@]}" != 0 ]; then
  echo "fuzz: ${#failed[@]} of ${#targets[@]} targets crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash"
