#!/usr/bin/env bash
# Benchmark: incremental `save` of a writable mount (`mount --writable`)
# against a full `save` of the same changed tree, on SeaweedFS, in one run.
# Needs root (FUSE, kernel overlayfs, drop_caches).
#
#   scripts/bench-incremental.sh [--small N] [--change-percent P]
#
# The workload is bench-mount's (a): N (default 100000) small files in a
# node_modules-like tree (gen-tree.py, seed 42), saved whole under key
# `base`. A build then changes P% (default 1) of the files, the same way on
# both sides (gen-tree.py --change-percent: of the changes, half rewrite a
# file, 30% add a new one, 20% delete one, picked evenly from the sorted
# file list):
#   incremental: mount `base` --writable, change it, `save --key incr` of the
#                mount (unchanged files are copied inside the store);
#   full:        restore `base`, change it, `save --key full` of the tree.
# The page cache is dropped before each timed save. The restored `incr` must
# be identical (diff -r) to the changed restored tree, or the script fails.
# Printed: seconds and the `transferred:` bytes of each save.
#
# Goals (issue 6): the incremental save uploads <= 5% of its archive's size
# at 1% changed, and is faster than the full save (full/incremental > 1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=100000 percent=1
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --change-percent) percent=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--change-percent P]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-incremental: needs root (FUSE and overlayfs mounts, drop_caches)" >&2; exit 1; }

# CACHEMOUNT_BIN: use that binary instead of building the release one.
if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
grep -q -- --writable <<<"$("$bin" mount --help)" || { echo "bench-incremental: $bin has no 'mount --writable'" >&2; exit 1; }

work="$(mktemp -d /var/tmp/cachemount-bench-incremental.XXXXXX)"
mounts=()
cleanup() {
  cd /
  for m in "${mounts[@]}"; do "$bin" umount --lazy "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
  # Whatever is still mounted under the work dir (an overlay's lower layer
  # when `umount` failed): detach it, deepest first, before removing files.
  awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The writable mount's layers (its upper dir takes the changes) live in the
# work dir, on the same filesystem as the restored tree.
export CACHEMOUNT_STATE_DIR="$work/state"
scripts/s3-server.sh start >/dev/null
eval "$(scripts/s3-server.sh env)"
prefix="bench-incremental-$$-$(date +%s)"
export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/$prefix" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"
# Cold figures: the host's disk cache would serve bytes an earlier run left.
export CACHEMOUNT_NO_DISK_CACHE=true

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
percent_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f%%", 100 * a / b }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1048576 }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
change() { python3 "$repo/scripts/lib/gen-tree.py" "$1" --change-percent "$percent" >&2; }

declare -A R
# Runs `save --key $1 tree` in the current dir after dropping the page
# cache; R[$1.secs] is its time, R[$1.up|copied|down|archive] the bytes of
# its `transferred:` line.
timed_save() {
  local key=$1 t0 out line
  drop_caches
  t0=$(now)
  out=$("$bin" --quiet save --key "$key" tree)
  R[$key.secs]=$(elapsed "$t0")
  printf '%s\n' "$out" | sed 's/^/   /' >&2
  line=$(echo "$out" | grep '^transferred: ') || { echo "bench-incremental: no 'transferred:' line from save --key $key" >&2; exit 1; }
  read -r "R[$key.up]" "R[$key.copied]" "R[$key.down]" "R[$key.archive]" < <(echo "$line" |
    sed -E 's/^transferred: ([0-9]+) bytes uploaded, ([0-9]+) bytes copied inside the store, ([0-9]+) bytes downloaded; archive ([0-9]+) bytes$/\1 \2 \3 \4/')
  [[ "${R[$key.archive]}" =~ ^[0-9]+$ ]] || { echo "bench-incremental: cannot parse: $line" >&2; exit 1; }
  R[$key.reused]=$(echo "$out" | sed -nE 's/.*incremental: ([0-9]+) unchanged files.*/\1/p')
}

echo "== generating (seed 42): $small small files" >&2
python3 "$repo/scripts/lib/gen-tree.py" "$work/src/tree" --small "$small" --large 0
files=$(find "$work/src/tree" -type f | wc -l)
bytes=$(du -sb "$work/src/tree" | cut -f1)
echo "== save --key base (the full tree)" >&2
cd "$work/src"
timed_save base
cd "$work" && rm -rf "$work/src"

echo "== incremental: mount base --writable, change $percent%, save --key incr" >&2
mkdir -p "$work/m" && cd "$work/m"
"$bin" --quiet mount --key base --writable tree >/dev/null
mounts+=("$work/m/tree")
change "$work/m/tree"
sync
timed_save incr
[ -n "${R[incr.reused]}" ] || { echo "bench-incremental: save of the writable mount was not incremental" >&2; exit 1; }
cd "$work" && "$bin" umount "$work/m/tree" >/dev/null

echo "== full: restore base, change $percent%, save --key full" >&2
mkdir -p "$work/r" && cd "$work/r"
"$bin" --quiet restore --key base >/dev/null
change "$work/r/tree"
sync
timed_save full

echo "== check: restore incr, diff -r against the changed restored tree" >&2
mkdir -p "$work/check" && cd "$work/check"
"$bin" --quiet restore --key incr >/dev/null
diff -r "$work/check/tree" "$work/r/tree" >&2 || { echo "bench-incremental: the restored incr differs from the changed tree" >&2; exit 1; }
echo "   identical" >&2

printf '\n%s files, %s MiB; %s%% changed; base save %.3f s, archive %s bytes\n' \
  "$files" "$(mib "$bytes")" "$percent" "${R[base.secs]}" "${R[base.archive]}"
printf '  %-34s %14s %14s %9s\n' "" "incremental" "full" "ratio"
printf '  %-34s %14.3f %14.3f %9s   (full/incremental; goal > 1)\n' "save time (s)" "${R[incr.secs]}" "${R[full.secs]}" "$(ratio "${R[full.secs]}" "${R[incr.secs]}")"
printf '  %-34s %14s %14s %9s   (incremental uploaded / its archive; goal <= 5%%)\n' "bytes uploaded" "${R[incr.up]}" "${R[full.up]}" "$(percent_of "${R[incr.up]}" "${R[incr.archive]}")"
printf '  %-34s %14s %14s\n' "bytes copied inside the store" "${R[incr.copied]}" "${R[full.copied]}"
printf '  %-34s %14s %14s\n' "bytes downloaded" "${R[incr.down]}" "${R[full.down]}"
printf '  %-34s %14s %14s %9s   (incremental/full)\n' "archive bytes" "${R[incr.archive]}" "${R[full.archive]}" "$(ratio "${R[incr.archive]}" "${R[full.archive]}")"
printf '  %-34s %14s\n' "unchanged files reused" "${R[incr.reused]}"
