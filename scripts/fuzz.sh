#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/*.rs) for a bounded time, one after
# the other, and reports the executions of each. Exits non-zero if any target
# crashed (panic, abort, over-large allocation, timeout, out of memory), after
# printing the input that did it (under fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   long run (default 60 s per target)
#   scripts/fuzz.sh --smoke                10 s per target (CI-sized)
#   scripts/fuzz.sh --merge [SECONDS]      also fold new inputs into the committed
#                                          corpus, minimised (-merge=1)
#   scripts/fuzz.sh --seed  [SECONDS]      like --merge, and first regenerate seed
#                                          inputs (fuzz/make_seeds.py; needs
#                                          python3, zstd and a cachemount binary)
#   FUZZ_TARGETS="open index" scripts/fuzz.sh   only some targets
#
# The committed corpus (fuzz/corpus/<target>/) is read, never written, unless
# --merge/--seed: inputs found during a run go to a temporary directory.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Works on the stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and
# `--sanitizer none` avoids the sanitizers that need a nightly std. Without a
# sanitizer, out-of-bounds reads are still caught by Rust's own checks, and
# integer overflow by the overflow checks (`--debug-assertions`: a length from
# the input that wraps is a bug, not a value).
#
# Memory: every input runs under -rss_limit_mb (the process's resident memory)
# and -malloc_limit_mb (the heap the target holds at once, counted by the
# targets' allocator, fuzz/fuzz_targets/common.rs, which reports to libFuzzer's
# malloc hook: one huge allocation, or a blow-up of many small untouched ones
# that RSS does not see). Override with FUZZ_RSS_MB / FUZZ_MALLOC_MB.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60
rss_mb=${FUZZ_RSS_MB:-512}
malloc_mb=${FUZZ_MALLOC_MB:-256}
merge=false
seed=false
for arg in "$@"; do
  case "$arg" in
    --smoke) secs=10 ;;
    --merge) merge=true ;;
    --seed) merge=true; seed=true ;;
    ''|*[!0-9]*) echo "usage: $0 [--smoke|--merge|--seed] [SECONDS_PER_TARGET]" >&2; exit 2 ;;
    *) secs="$arg" ;;
  esac
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# Outside the repo: an instrumented build of the whole crate (AWS SDK included).
default_target=/var/cache/cachemount-fuzz-target
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p "$default_target" 2>/dev/null && [ -w "$default_target" ]; then
    export CARGO_TARGET_DIR="$default_target"
  else
    export CARGO_TARGET_DIR="$PWD/fuzz/target"
  fi
fi
export RUSTC_BOOTSTRAP=1
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$CARGO_TARGET_DIR/$triple/release"

targets=${FUZZ_TARGETS:-$(cd fuzz && cargo fuzz list)}
start=$(date +%s)
echo "fuzz: building (target dir $CARGO_TARGET_DIR)"
(cd fuzz && cargo fuzz build -O --debug-assertions --sanitizer none 2>&1 | grep -Ev '^\s*(Compiling|Fresh|Checking)\b' || true)
for t in $targets; do
  [ -x "$bin_dir/$t" ] || { echo "fuzz: build failed: no $bin_dir/$t" >&2; exit 2; }
done
built=$(date +%s)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if $seed; then
  bin=${CACHEMOUNT_BIN:-}
  for b in /var/cache/cachemount-target/debug/cachemount target/debug/cachemount; do
    [ -n "$bin" ] || { [ -x "$b" ] && bin=$b; } || true
  done
  [ -n "$bin" ] || { echo "fuzz: --seed needs a cachemount binary (cargo build, or CACHEMOUNT_BIN)" >&2; exit 2; }
  python3 fuzz/make_seeds.py "$bin" "$work/seeds" >/dev/null
fi

failed=()
summary=()
limits=(-timeout=10 -rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" -max_len=65536)
echo "fuzz: ${secs} s per target, limits: rss ${rss_mb} MB, heap ${malloc_mb} MB"
printf '%-20s %12s %8s %s\n' target executions exec/s result
for t in $targets; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "$work/new/$t" "fuzz/artifacts/$t"
  log="$work/$t.log"
  extra=()
  if $seed && [ -d "$work/seeds/$t" ]; then extra=("$work/seeds/$t"); fi
  set +e
  # New inputs go to the first (temporary) directory; the committed corpus is read only.
  "$bin_dir/$t" "$work/new/$t" "$corpus" "${extra[@]}" \
    -max_total_time="$secs" "${limits[@]}" \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    result="CRASH (exit $rc): ${artifact:-no artifact, see below}"
    failed+=("$t")
    echo "---- $t ----" >&2
    grep -E -A 25 '^(thread .* panicked|==[0-9]+== ERROR|fuzz: single allocation|ALARM|.*out-of-memory)' "$log" | head -n 40 >&2 || tail -n 40 "$log" >&2
  fi
  row=$(printf '%-20s %12s %8s %s' "$t" "${execs:-?}" "${rate:-?}" "$result")
  echo "$row"
  summary+=("$row")
  if $merge && [ "$rc" -eq 0 ]; then
    # Minimise committed corpus + new finds (+ seeds) into a fresh directory.
    # Edge coverage only (-use_counters=0): hit-count buckets would keep
    # thousands of near-duplicates (JSON above all) in the repository.
    merged="$work/merged/$t"
    mkdir -p "$merged"
    "$bin_dir/$t" -merge=1 -use_counters=0 "${limits[@]}" "$merged" "$corpus" "$work/new/$t" \
      "${extra[@]}" >"$work/$t.merge.log" 2>&1
    rm -rf "$corpus" && mkdir -p "$corpus" && cp "$merged"/* "$corpus"/ 2>/dev/null || true
    echo "    corpus: $(ls "$corpus" | wc -l) inputs, $(cat "$corpus"/* 2>/dev/null | wc -c) bytes"
  fi
done
end=$(date +%s)
echo "fuzz: executions per target"
printf '%-20s %12s %8s %s\n' target executions exec/s result
printf '%s\n' "${summary[@]}"
echo "fuzz: build $((built - start)) s, fuzzing $((end - built)) s (${secs} s per target)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O --debug-assertions TARGET ARTIFACT)" >&2
  exit 1
fi
