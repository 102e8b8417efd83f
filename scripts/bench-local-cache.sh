#!/usr/bin/env bash
# Benchmark: the disk cache shared by the mounts of a host (issue 12), on
# SeaweedFS, as root, page caches dropped between steps (the disk cache
# survives them: that is the point). Ratios from one run:
#
#   scripts/bench-local-cache.sh [--small N] [--large COUNT] [--large-mb MB] [--repeat N]
#
# - a generated tree: --small (40000) node_modules-like files and --large (3)
#   files of --large-mb (200) MB, saved as key A;
# - native: the tree restored; a first mount of A reads everything (fills
#   the disk cache); then two second mounts of A, the default (no-open,
#   cached files read through FUSE) and --passthrough (open answered, files
#   wholly on disk read by the kernel from the cache file): `find`, the 10%
#   sample, read-all, the files under 1 MiB and the largest file, each on
#   the native tree and both mounts in turn after drop_caches, --repeat (3)
#   rounds, medians: goals <= 1.2x native, and >= 90% of native for the
#   largest file; the GETs after mount (goal: 0; the HEAD and the
#   tail/index are the mount's own);
# - key B: 2% of A's files changed; read-all of B: bytes fetched after mount
#   against the changed files' compressed bytes in B's archive (goal <=
#   1.2x; the mount's own HEAD and index GETs come before);
# - restore of key B with the disk cache (A's files in it) against
#   --no-disk-cache: seconds and bytes downloaded;
# - the peak RSS (VmHWM) of the daemons whose reads were all disk hits.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=40000 large=3 large_mb=200 repeat=3
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=$2; shift 2 ;;
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --large-mb) large_mb=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--large COUNT] [--large-mb MB] [--repeat N]" >&2; exit 2 ;;
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
readsmall() { (cd "$1" && find tree -type f -size -1024k -print0 | xargs -0 cat > /dev/null); }

echo "== generating $small small files + $large x $large_mb MB (seed 42)" >&2
python3 "$repo/scripts/lib/gen-tree.py" "$work/src/tree" --small "$small" --large "$large" --large-mb "$large_mb"
(cd "$work/src" && find tree -type f | sort | awk 'BEGIN { srand(42) } rand() < 0.1') > "$work/sample"
largest=$(cd "$work/src" && find tree -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
(cd "$work/src" && "$bin" --quiet save --key A tree >/dev/null)

echo "== native: restore" >&2
mkdir -p "$work/native" && (cd "$work/native" && "$bin" --quiet --no-disk-cache restore --key A tree >/dev/null)

echo "== first mount of A: read everything (fills the disk cache)" >&2
mount_at A "$work/m1"
readall "$work/m1"
unmount "$work/m1/tree"

# The second mounts of A: m2 the default (no-open, cached files read through
# FUSE), m3 with --passthrough. Each step runs on the native tree and both
# mounts in turn, after drop_caches, $repeat rounds; medians.
echo "== second mounts of A (default, --passthrough): $repeat rounds of find / sample / read-all / small files / largest" >&2
mount_at A "$work/m2"
mount_at A "$work/m3" --passthrough
m2_before=$(counter "$work/m2/tree" requests) m3_before=$(counter "$work/m3/tree" requests)
declare -A T=()
for _ in $(seq "$repeat"); do
  for step in walk sample readall readsmall largest; do
    for where in native m2 m3; do
      drop_caches
      if [ "$step" = largest ]; then
        T[$where.$step]+="$(timed cat "$work/$where/$largest") "
      else
        T[$where.$step]+="$(timed "$step" "$work/$where") "
      fi
    done
  done
done
med() { printf '%s\n' ${T[$1]} | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
peak_rss() { awk '/VmHWM/ { print $2 }' "/proc/$(counter "$1" daemon_pid)/status" 2>/dev/null || echo 0; }
gets=$(( $(counter "$work/m2/tree" requests) - m2_before )) p_gets=$(( $(counter "$work/m3/tree" requests) - m3_before ))
rss=$(peak_rss "$work/m2/tree") p_rss=$(peak_rss "$work/m3/tree")
unmount "$work/m2/tree"
unmount "$work/m3/tree"
read -r n_find n_sample n_all n_small n_seq <<< "$(med native.walk) $(med native.sample) $(med native.readall) $(med native.readsmall) $(med native.largest)"
read -r m_find m_sample m_all m_small m_seq <<< "$(med m2.walk) $(med m2.sample) $(med m2.readall) $(med m2.readsmall) $(med m2.largest)"
read -r p_find p_sample p_all p_small p_seq <<< "$(med m3.walk) $(med m3.sample) $(med m3.readall) $(med m3.readsmall) $(med m3.largest)"

echo "== key B: 2% of the files changed" >&2
cp -a "$work/src" "$work/srcB"
python3 "$repo/scripts/lib/gen-tree.py" "$work/srcB/tree" --change-percent 2 > /dev/null
(cd "$work/srcB" && "$bin" --quiet save --key B tree >/dev/null)
# The changed files' compressed bytes as key B's archive holds them (its
# frames: what a read fetches), from the same tree saved to a local store;
# and, for scale, what zstd -3 makes of each file whole.
changed=$(cd "$work" && { diff -rq src/tree srcB/tree 2>/dev/null || true; } | awk '/^Files / { print $4 } /^Only in srcB/ { sub(":", "", $3); print $3 "/" $4 }')
(cd "$work/srcB" && CACHEMOUNT_STORE="file://$work/localB" "$bin" --quiet save --key B tree >/dev/null)
changed_bytes=$(cd "$work" && python3 -c '
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
sizes = {i.filename: i.compress_size for i in z.infolist()}
print(sum(sizes.get("_0/" + f.split("/", 1)[1], 0) for f in sys.argv[2:]))
' "$(ls "$work"/localB/blobs/sha256/* | head -1)" $changed)
zstd_bytes=0 changed_count=0
for f in $changed; do
  [ -f "$work/$f" ] || continue
  changed_count=$((changed_count + 1))
  zstd_bytes=$((zstd_bytes + $(zstd -3 -q -c "$work/$f" | wc -c)))
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
row() { printf '%-34s %8s %8s %6s %11s %6s %s\n' "$@"; }
row step native mount ratio passthrough ratio goal
row "find (2nd mount of A)" "$n_find" "$m_find" "$(ratio "$m_find" "$n_find")" "$p_find" "$(ratio "$p_find" "$n_find")" "<= 1.2"
row "10% sample" "$n_sample" "$m_sample" "$(ratio "$m_sample" "$n_sample")" "$p_sample" "$(ratio "$p_sample" "$n_sample")" "<= 1.2"
row "read-all" "$n_all" "$m_all" "$(ratio "$m_all" "$n_all")" "$p_all" "$(ratio "$p_all" "$n_all")" "<= 1.2"
row "read-all, files < 1 MiB" "$n_small" "$m_small" "$(ratio "$m_small" "$n_small")" "$p_small" "$(ratio "$p_small" "$n_small")" "-"
row "largest file (native/mount)" "$n_seq" "$m_seq" "$(ratio "$n_seq" "$m_seq")" "$p_seq" "$(ratio "$n_seq" "$p_seq")" ">= 0.9"
echo "GETs after mount (2nd mount of A): $gets, with passthrough $p_gets (goal 0)"
echo "peak RSS of the all-disk-hit daemon: $((rss / 1024)) MiB, with passthrough $((p_rss / 1024)) MiB"
echo "restore of B: with the disk cache $rd_t s, $rd_bytes bytes downloaded ($rd_files files from the cache); without $rn_t s, $rn_bytes bytes: time ratio $(ratio "$rd_t" "$rn_t"), bytes ratio $(ratio "$rd_bytes" "$rn_bytes")"
echo "key B: $changed_count changed files, $changed_bytes bytes in the archive ($zstd_bytes as whole zstd -3 files); fetched after mount $b_fetched bytes: ratio $(ratio "$b_fetched" "$changed_bytes") (goal <= 1.2)"
