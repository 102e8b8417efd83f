#!/usr/bin/env bash
# What "no unverified byte is served" costs on a large foreign entry (issue
# 10, item 5): a foreign zip's entry has one CRC-32 for all of its content, so
# a mount decodes it whole once (the verify pass) before serving its first
# byte. On a generated zip (Buildkite layout, written by Python's zipfile) with
# a ~300 MB deflate entry and a ~300 MB stored one, mounted from the local
# disk, this prints for each entry, from one run:
#   - time to first byte (`head -c1`) through a fresh mount, page cache dropped;
#   - a full sequential `cat` through a fresh mount, page cache dropped, with
#     the default cache and with a 64 MiB one (and then the daemon's peak RSS);
# against the same file read natively after `restore` + drop_caches, and the
# ratios mount/native. Needs root (FUSE, drop_caches).
#
#   scripts/bench-foreign.sh [--mb N]
#
# CACHEMOUNT_BIN selects the binary (default: a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
mb=300
while [ $# -gt 0 ]; do
  case "$1" in
    --mb) mb=$2; shift 2 ;;
    *) echo "usage: $0 [--mb N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-foreign: needs root (FUSE mounts, drop_caches)" >&2; exit 1; }
if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
work="$(mktemp -d /var/tmp/cachemount-bench-foreign.XXXXXX)"
mounted=""
cleanup() {
  [ -n "$mounted" ] && { "$bin" umount "$mounted" 2>/dev/null || umount -l "$mounted" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT
export HOME="$work/home" CACHEMOUNT_STORE="$work/store"
mkdir -p "$HOME" "$work/native" "$work/m"

echo "== generating a zip with a ${mb} MB deflate and a ${mb} MB stored entry" >&2
python3 - "$work/archive.zip" "$mb" <<'EOF'
import random, sys, zipfile
path, mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 12))) for _ in range(4000)]
# 4 MiB pieces: text-like lines for deflate, noise for stored.
def text_piece():
    out, n = [], 0
    while n < 4 << 20:
        line = b" ".join(rng.choices(words, k=12)) + b"\n"
        out.append(line)
        n += len(line)
    return b"".join(out)[: 4 << 20]
pieces = mb * (1 << 20) // (4 << 20)
with zipfile.ZipFile(path, "w") as z:
    z.writestr(".buildkite/cache-manifest.json", b'{"version":2,"mappings":{"_0":"."}}')
    texts = [text_piece() for _ in range(4)]
    info = zipfile.ZipInfo("_0/bench/deflate.bin")
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o100644 << 16
    with z.open(info, "w", force_zip64=True) as f:
        for i in range(pieces):
            f.write(texts[i % 4])
    info = zipfile.ZipInfo("_0/bench/stored.bin")
    info.compress_type, info.external_attr = zipfile.ZIP_STORED, 0o100644 << 16
    with z.open(info, "w", force_zip64=True) as f:
        for _ in range(pieces):
            f.write(rng.randbytes(4 << 20))
EOF
url="file://$work/archive.zip"
ls -l "$work/archive.zip" >&2

now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Seconds `cmd` takes, page cache dropped first.
timed() { drop; local t0; t0=$(now); "$@" >/dev/null; echo "$(now) - $t0" | bc -l; }

(cd "$work/native" && "$bin" --quiet restore "$url" >/dev/null)
# mount_it [ARGS]: a fresh mount of the zip at $work/m/bench; $pid is its daemon.
mount_it() {
  (cd "$work/m" && "$bin" --quiet mount "$url" bench "$@") >"$work/mount.out"
  mounted="$work/m/bench"
  pid=$(sed -n 's/.*daemon pid \([0-9]*\),.*/\1/p' "$work/mount.out")
}
umount_it() { "$bin" umount "$mounted" >/dev/null; mounted=""; }
peak_mib() { awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status"; }

printf '%-8s %-22s %10s %10s %8s\n' entry figure native mount ratio
for entry in deflate stored; do
  native="$work/native/bench/$entry.bin"
  through="$work/m/bench/$entry.bin"
  n_first=$(timed head -c1 "$native")
  n_cat=$(timed cat "$native")
  mount_it
  m_first=$(timed head -c1 "$through")
  umount_it
  mount_it
  m_cat=$(timed cat "$through")
  passes=$("$bin" stats "$mounted" | awk '$1 == "verify_passes" { print $2 }')
  cmp -s "$native" "$through" || { echo "bench-foreign: $entry differs through the mount" >&2; exit 1; }
  umount_it
  # The memory bound (README "Memory") with a cache smaller than the entry:
  # 64 MiB cache + 32 MiB read-ahead + 128 MiB slack = 224 MiB.
  mount_it --cache-size 64M
  s_cat=$(timed cat "$through")
  s_peak=$(peak_mib)
  umount_it
  printf '%-8s %-22s %10.3f %10.3f %8.1f\n' "$entry" "first byte (s)" "$n_first" "$m_first" "$(echo "$m_first / $n_first" | bc -l)"
  printf '%-8s %-22s %10.3f %10.3f %8.2f\n' "$entry" "cat $mb MB (s)" "$n_cat" "$m_cat" "$(echo "$m_cat / $n_cat" | bc -l)"
  printf '%-8s %-22s %10.3f %10.3f %8.2f\n' "$entry" "cat, 64M cache (s)" "$n_cat" "$s_cat" "$(echo "$s_cat / $n_cat" | bc -l)"
  printf '%-8s %-22s %10s %10s %8s\n' "$entry" "daemon peak RSS, 64M" - "${s_peak} MiB" -
  printf '%-8s %-22s %10s %10s %8s\n' "$entry" "verify passes" - "$passes" -
done
