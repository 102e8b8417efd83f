#!/usr/bin/env bash
# Benchmark: the disk cache shared by the mounts of a host (issue 12), on
# SeaweedFS, as root, page caches dropped between steps (the disk cache
# survives them: that is the point). Ratios from one run:
#
#   scripts/bench-local-cache.sh [--small N] [--large COUNT] [--large-mb MB]
#
# - a generated tree: --small (40000) node_modules-like files and --large (3)
#   files of --large-mb (200) MB, saved as key A;
# - native: the tree restored, then `find`, a 10% sample and read-all, each
#   after drop_caches;
# - a first mount of A reads everything (fills the disk cache); the second
#   mount of A, after drop_caches before each step: `find`, the 10% sample,
#   read-all, each against native (goal <= 1.2x), and the GETs after mount
#   (goal: 0; the HEAD and the tail/index are the mount's own);
# - open cost: read-all of the small files with passthrough (open answered)
#   against no passthrough (no-open: the kernel sends no open);
# - key B: 2% of A's files changed; read-all of B: bytes fetched after mount
#   against the changed files' compressed bytes (goal <= 1.2x, + the index);
# - restore of key B with the disk cache (A's files in it) against
#   --no-disk-cache: seconds and bytes downloaded;
# - the largest file read sequentially from the disk cache (passthrough)
#   against native (goal >= 90%);
# - the peak RSS (VmHWM) of the daemon whose reads were all disk hits.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=40000 large=3 large_mb=200
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --large-mb) large_mb=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--large COUNT] [--large-mb MB]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-local-cache: needs root (FUSE, drop_caches)" >&2; exit 1; }

if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
work="$(mktemp -d /var/tmp/cachemount-bench-local-cache.XXXXXX)"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do "$bin" umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

scripts/s3-server.sh start >/dev/null
eval "$(scripts/s3-server.sh env)"
prefix="bench-local-cache-$$-$(date +%s)"
export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/$prefix" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"
export CACHEMOUNT_CACHE_DIR="$work/disk-cache"

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
timed() { local t0; t0=$(now); "$@" >/dev/null; elapsed "$t0"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
counter() { "$bin" stats "$1" | awk -v k="$2" '$1 == k { print $2 }'; }
# Mounts key $1 at $2/tree (fresh dir), with extra mount flags after.
mount_at() {
  local key=$1 dir=$2; shift 2
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$dir" && "$bin" --quiet mount --key "$key" "$@" tree >/dev/null)
  mounts+=("$dir/tree")
}
unmount() { "$bin" umount "$1" >/dev/null; }
walk() { (cd "$1" && find tree | wc -l); }
sample() { (cd "$1" && tr '\n' '\0' < "$work/sample" | xargs -0 cat > /dev/null); }
readall() { (cd "$1" && tar -cf - tree | cat > /dev/null); }
readsmall() { (cd "$1" && find tree -type f -size -1M -print0 | xargs -0 cat > /dev/null); }

echo "== generating $small small files + $large x $large_mb MB (seed 42)" >&2
python3 "$repo/scripts/lib/gen-tree.py" "$work/src/tree" --small "$small" --large "$large" --large-mb "$large_mb"
(cd "$work/src" && find tree -type f | sort | awk 'BEGIN { srand(42) } rand() < 0.1') > "$work/sample"
largest=$(cd "$work/src" && find tree -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
(cd "$work/src" && "$bin" --quiet save --key A tree >/dev/null)

echo "== native: restore, then find / sample / read-all / largest after drop_caches" >&2
mkdir -p "$work/native" && (cd "$work/native" && "$bin" --quiet --no-disk-cache restore --key A tree >/dev/null)
drop_caches; n_find=$(timed walk "$work/native")
drop_caches; n_sample=$(timed sample "$work/native")
drop_caches; n_all=$(timed readall "$work/native")
drop_caches; n_small=$(timed readsmall "$work/native")
drop_caches; n_seq=$(timed cat "$work/native/$largest")

echo "== first mount of A: read everything (fills the disk cache)" >&2
mount_at A "$work/m1"
readall "$work/m1"
unmount "$work/m1/tree"

echo "== second mount of A, drop_caches before each step" >&2
mount_at A "$work/m2" --passthrough
after_mount=$(counter "$work/m2/tree" requests)
drop_caches; m_find=$(timed walk "$work/m2")
drop_caches; m_sample=$(timed sample "$work/m2")
drop_caches; m_all=$(timed readall "$work/m2")
drop_caches; m_small=$(timed readsmall "$work/m2")
drop_caches; m_seq=$(timed cat "$work/m2/$largest")
gets=$(( $(counter "$work/m2/tree" requests) - after_mount ))
pid=$(pgrep -f -n "cachemount.*--daemon-child" || true)
rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
unmount "$work/m2/tree"

echo "== open cost: small files with no passthrough (no-open)" >&2
mount_at A "$work/m3"
drop_caches; np_small=$(timed readsmall "$work/m3")
drop_caches; np_find=$(timed walk "$work/m3")
unmount "$work/m3/tree"

echo "== key B: 2% of the files changed" >&2
cp -a "$work/src" "$work/srcB"
python3 "$repo/scripts/lib/gen-tree.py" "$work/srcB/tree" --change-percent 2 > /dev/null
(cd "$work/srcB" && "$bin" --quiet save --key B tree >/dev/null)
# The changed files' compressed bytes: what zstd -3 makes of each (as save does).
changed=$(cd "$work" && { diff -rq src/tree srcB/tree 2>/dev/null || true; } | awk '/^Files / { print $4 } /^Only in srcB/ { sub(":", "", $3); print $3 "/" $4 }')
changed_bytes=0 changed_count=0
for f in $changed; do
  [ -f "$work/$f" ] || continue
  changed_count=$((changed_count + 1))
  changed_bytes=$((changed_bytes + $(zstd -3 -q -c "$work/$f" | wc -c)))
done
echo "== restore of B: from the disk cache (A's files) against --no-disk-cache" >&2
# Prints "seconds bytes_downloaded disk_cache_files" of a restore of B into a fresh dir.
restore_b() {
  rm -rf "$work/rB" && mkdir -p "$work/rB"
  drop_caches
  (cd "$work/rB" && "$bin" --json "$@" restore --key B tree) |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["seconds"], r["bytes_downloaded"], r["disk_cache_files"])'
}
read -r rd_t rd_bytes rd_files < <(restore_b)
read -r rn_t rn_bytes _ < <(restore_b --no-disk-cache)
rm -rf "$work/rB"
mount_at B "$work/m4"
b_after_mount=$(counter "$work/m4/tree" bytes_fetched)
readall "$work/m4"
b_fetched=$(( $(counter "$work/m4/tree" bytes_fetched) - b_after_mount ))
unmount "$work/m4/tree"

echo
echo "disk cache: $("$bin" cache stats | tr '\n' ' ')"
printf '%-44s %10s %10s %8s %s\n' step native mount ratio goal
printf '%-44s %10s %10s %8s %s\n' "find (2nd mount of A)" "$n_find" "$m_find" "$(ratio "$m_find" "$n_find")" "<= 1.2"
printf '%-44s %10s %10s %8s %s\n' "10% sample" "$n_sample" "$m_sample" "$(ratio "$m_sample" "$n_sample")" "<= 1.2"
printf '%-44s %10s %10s %8s %s\n' "read-all" "$n_all" "$m_all" "$(ratio "$m_all" "$n_all")" "<= 1.2"
printf '%-44s %10s %10s %8s %s\n' "largest file, sequential (native/mount)" "$n_seq" "$m_seq" "$(ratio "$n_seq" "$m_seq")" ">= 0.9"
echo "GETs after mount (2nd mount of A): $gets (goal 0)"
echo "peak RSS of the all-disk-hit daemon: $((rss / 1024)) MiB"
echo "open cost, small files (< 1 MiB) read-all: passthrough on (open answered) $m_small s, no passthrough (no-open) $np_small s, ratio $(ratio "$m_small" "$np_small"); find: $m_find s vs $np_find s; native $n_small s"
echo "restore of B: with the disk cache $rd_t s, $rd_bytes bytes downloaded ($rd_files files from the cache); without $rn_t s, $rn_bytes bytes: time ratio $(ratio "$rd_t" "$rn_t"), bytes ratio $(ratio "$rd_bytes" "$rn_bytes")"
echo "key B: $changed_count changed files, $changed_bytes compressed bytes; fetched after mount $b_fetched bytes: ratio $(ratio "$b_fetched" "$changed_bytes") (goal <= 1.2)"
