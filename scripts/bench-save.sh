#!/usr/bin/env bash
# Benchmark: cachemount save/restore against `tar | zstd -T0 -3` on the same
# seeded tree (about 50k small files plus a few files of 100+ MB), on the
# local store and on SeaweedFS, in one run. Prints times, sizes and ratios.
#
#   scripts/bench-save.sh [--small N] [--large COUNT] [--large-mb MB]
#
# Goals: save and restore no slower than the tar+zstd pipeline (ratio <= 1.0);
# archive at most 1.3x the size of tar+zstd -3.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=50000 large=3 large_mb=120
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --large-mb) large_mb=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--large COUNT] [--large-mb MB]" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
work="$(mktemp -d /var/tmp/cachemount-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT

echo "generating tree: $small small files, $large x $large_mb MB (seed 42)"
python3 scripts/lib/gen-tree.py "$work/src/tree" --small "$small" --large "$large" --large-mb "$large_mb"
src_bytes=$(du -sb "$work/src/tree" | cut -f1)

now() { date +%s.%N; }
timed() { local t0; t0=$(now); "$@" >/dev/null; awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1048576 }'; }
sync

cd "$work/src"
t_tar=$(timed bash -c "tar -cf - tree | zstd -q -T0 -3 -o $work/tree.tar.zst")
mkdir -p "$work/untar"
t_untar=$(timed bash -c "zstd -q -d -c $work/tree.tar.zst | tar -x -C $work/untar")
tar_size=$(stat -c %s "$work/tree.tar.zst")

export CACHEMOUNT_STORE="$work/store"
t_save=$(timed "$bin" --quiet save --key bench tree)
blob=$(ls "$work"/store/blobs/sha256/* | head -1)
cm_size=$(stat -c %s "$blob")
mkdir -p "$work/restore" && cd "$work/restore"
t_restore=$(timed "$bin" --quiet restore --key bench)
diff -rq "$work/src/tree" "$work/restore/tree" >/dev/null || { echo "restored tree differs!" >&2; exit 1; }

s3_line=""
cd "$repo"
if scripts/s3-server.sh start >/dev/null 2>&1; then
  eval "$(scripts/s3-server.sh env)"
  export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/bench-$$" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"
  cd "$work/src"
  t_save_s3=$(timed "$bin" --quiet save --key bench tree)
  mkdir -p "$work/restore-s3" && cd "$work/restore-s3"
  t_restore_s3=$(timed "$bin" --quiet restore --key bench)
  diff -rq "$work/src/tree" "$work/restore-s3/tree" >/dev/null || { echo "S3-restored tree differs!" >&2; exit 1; }
  s3_line=1
fi

printf '\ntree: %d small files + %d x %d MB = %s MiB\n' "$small" "$large" "$large_mb" "$(mib "$src_bytes")"
printf '%-34s %9s %9s\n' "" "seconds" "ratio"
printf '%-34s %9.2f\n' "tar | zstd -T0 -3" "$t_tar"
printf '%-34s %9.2f %9s\n' "cachemount save (local store)" "$t_save" "$(ratio "$t_save" "$t_tar")"
[ -n "$s3_line" ] && printf '%-34s %9.2f %9s\n' "cachemount save (SeaweedFS)" "$t_save_s3" "$(ratio "$t_save_s3" "$t_tar")"
printf '%-34s %9.2f\n' "zstd -d | tar -x" "$t_untar"
printf '%-34s %9.2f %9s\n' "cachemount restore (local store)" "$t_restore" "$(ratio "$t_restore" "$t_untar")"
[ -n "$s3_line" ] && printf '%-34s %9.2f %9s\n' "cachemount restore (SeaweedFS)" "$t_restore_s3" "$(ratio "$t_restore_s3" "$t_untar")"
printf '%-34s %9s MiB\n' "tar.zst size" "$(mib "$tar_size")"
printf '%-34s %9s MiB %5s\n' "cachemount archive size" "$(mib "$cm_size")" "$(ratio "$cm_size" "$tar_size")"
