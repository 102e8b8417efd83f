#!/usr/bin/env bash
# Benchmark: `cachemount mount` against `restore` (download + extract) and
# against a raw GET + `zstd -d`, on SeaweedFS, in one run, on two seeded
# workloads: (a) ~100k small files in a node_modules-like tree, (b) a few
# files of 500 MB+. Needs root (FUSE, drop_caches), curl and zstd.
#
#   scripts/bench-mount.sh [--small N] [--large COUNT] [--large-mb MB]
#
# Every mount measurement runs on a fresh mount (so the kernel and the block
# cache are cold); every measurement on the restored tree runs after
# dropping the page cache. Printed per workload: seconds, ratios against the
# goals of issue 3, and the S3 GET requests the mount made.
#
# Goals: mount <= 0.5 s and >= 20x faster than restore; 10% sample >= 5x
# faster than restore + the same reads; read-all <= 1.25x restore + read;
# sequential >= 80% of raw GET + zstd -d; cold find <= 2x find on the restored tree.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=100000 large=2 large_mb=600
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --large-mb) large_mb=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--large COUNT] [--large-mb MB]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-mount: needs root (FUSE mounts, drop_caches)" >&2; exit 1; }

# CACHEMOUNT_BIN: use that binary instead of building the release one.
if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
work="$(mktemp -d /var/tmp/cachemount-bench-mount.XXXXXX)"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

scripts/s3-server.sh start >/dev/null
eval "$(scripts/s3-server.sh env)"
prefix="bench-mount-$$-$(date +%s)"
export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/$prefix" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
timed() { local t0; t0=$(now); "$@" >/dev/null; elapsed "$t0"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a + b }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
requests() { "$bin" stats "$1" | awk '$1 == "requests" { print $2 }'; }
s3url() { echo "$CACHEMOUNT_TEST_S3_ENDPOINT/$CACHEMOUNT_TEST_S3_BUCKET/$prefix/$1"; }
s3curl() { curl -sf --aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"; }

# Mounts key $1 at ./tree in dir $2 (fresh) and cds there; T_MOUNT is the
# time from the command's start until `ls` of the mount answers.
mount_fresh() {
  local key=$1 dir=$2 t0
  rm -rf "$dir" && mkdir -p "$dir"
  cd "$dir"
  drop_caches
  t0=$(now)
  "$bin" --quiet mount --key "$key" tree >/dev/null
  ls tree >/dev/null
  T_MOUNT=$(elapsed "$t0")
  mounts+=("$dir/tree")
}
unmount() { "$bin" umount "$1" >/dev/null; }

declare -A R
run_workload() {
  local name=$1 gen_args=$2 key="$1"
  local w="$work/$name"
  echo "== workload $name: generating (seed 42): $gen_args" >&2
  # shellcheck disable=SC2086
  python3 "$repo/scripts/lib/gen-tree.py" "$w/src/tree" $gen_args
  R[$name.files]=$(find "$w/src/tree" -type f | wc -l)
  R[$name.bytes]=$(du -sb "$w/src/tree" | cut -f1)
  # The fixed 10% sample: a seeded pick of the file list.
  (cd "$w/src" && find tree -type f | sort | awk 'BEGIN { srand(42) } rand() < 0.1') > "$w/sample"
  largest=$(cd "$w/src" && find tree -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
  (cd "$w/src" && "$bin" --quiet save --key "$key" tree >/dev/null)

  echo "== $name: mount" >&2
  mount_fresh "$key" "$w/m1"
  R[$name.mount]=$T_MOUNT
  R[$name.find]=$(timed bash -c "find tree | wc -l")
  R[$name.find_req]=$(requests "$w/m1/tree")
  unmount "$w/m1/tree"
  mount_fresh "$key" "$w/m2"
  R[$name.all]=$(timed bash -c "tar -cf - tree | cat > /dev/null")
  R[$name.all_req]=$(requests "$w/m2/tree")
  unmount "$w/m2/tree"
  mount_fresh "$key" "$w/m3"
  R[$name.sample]=$(timed bash -c "tr '\n' '\0' < $w/sample | xargs -0 cat > /dev/null")
  R[$name.sample_req]=$(requests "$w/m3/tree")
  unmount "$w/m3/tree"
  mount_fresh "$key" "$w/m4"
  R[$name.largest_mb]=$(awk -v b="$(stat -c %s "$w/src/$largest")" 'BEGIN { printf "%.1f", b / 1048576 }')
  R[$name.seq]=$(timed dd if="$largest" of=/dev/null bs=1M status=none)
  R[$name.seq_req]=$(requests "$w/m4/tree")
  unmount "$w/m4/tree"

  echo "== $name: restore" >&2
  mkdir -p "$w/r" && cd "$w/r"
  drop_caches
  R[$name.restore]=$(timed "$bin" --quiet restore --key "$key")
  drop_caches
  R[$name.find_r]=$(timed bash -c "find tree | wc -l")
  drop_caches
  R[$name.all_r]=$(timed bash -c "tar -cf - tree | cat > /dev/null")
  drop_caches
  R[$name.sample_r]=$(timed bash -c "tr '\n' '\0' < $w/sample | xargs -0 cat > /dev/null")
  drop_caches
  R[$name.seq_r]=$(timed dd if="$largest" of=/dev/null bs=1M status=none)
  cd "$w" && rm -rf "$w/r"

  echo "== $name: raw GET + zstd -d of the largest file" >&2
  zstd -q -T0 -3 -c "$w/src/$largest" > "$w/largest.zst"
  s3curl -T "$w/largest.zst" "$(s3url raw/largest.zst)" >/dev/null
  rm -f "$w/largest.zst"
  drop_caches
  R[$name.raw]=$(timed bash -c "$(declare -f s3curl); s3curl '$(s3url raw/largest.zst)' | zstd -q -d -c > /dev/null")
  rm -rf "$w/src"
}

run_workload a "--small $small --large 0"
run_workload b "--small 0 --large $large --large-mb $large_mb"

report() {
  local n=$1
  local mb=${R[$n.largest_mb]}
  printf '\nworkload %s: %s files, %s MiB\n' "$n" "${R[$n.files]}" "$(awk -v b="${R[$n.bytes]}" 'BEGIN { printf "%.0f", b / 1048576 }')"
  printf '  %-44s %9s %9s %9s\n' "" "mount" "restore" "ratio"
  printf '  %-44s %9.3f %9.3f %9s   (goal <= 0.5 s, restore/mount >= 20)\n' "mount time / restore time (s)" "${R[$n.mount]}" "${R[$n.restore]}" "$(ratio "${R[$n.restore]}" "${R[$n.mount]}")"
  printf '  %-44s %9.3f %9.3f %9s   (goal mount/restored <= 2)\n' "cold find | wc -l (s)" "${R[$n.find]}" "${R[$n.find_r]}" "$(ratio "${R[$n.find]}" "${R[$n.find_r]}")"
  local s_m s_r a_m a_r
  s_m=$(add "${R[$n.mount]}" "${R[$n.sample]}"); s_r=$(add "${R[$n.restore]}" "${R[$n.sample_r]}")
  a_m=$(add "${R[$n.mount]}" "${R[$n.all]}"); a_r=$(add "${R[$n.restore]}" "${R[$n.all_r]}")
  printf '  %-44s %9.3f %9.3f %9s   (goal restore/mount >= 5)\n' "10% sample incl. mount / restore (s)" "$s_m" "$s_r" "$(ratio "$s_r" "$s_m")"
  printf '  %-44s %9.3f %9.3f %9s   (goal mount/restore <= 1.25)\n' "read every byte incl. mount / restore (s)" "$a_m" "$a_r" "$(ratio "$a_m" "$a_r")"
  local seq_m seq_r raw
  seq_m=$(awk -v m="$mb" -v t="${R[$n.seq]}" 'BEGIN { printf "%.0f", m / t }')
  seq_r=$(awk -v m="$mb" -v t="${R[$n.seq_r]}" 'BEGIN { printf "%.0f", m / t }')
  raw=$(awk -v m="$mb" -v t="${R[$n.raw]}" 'BEGIN { printf "%.0f", m / t }')
  printf '  %-44s %9s %9s %9s   (goal mount/raw >= 0.8; restored disk: %s MB/s)\n' "sequential MB/s, largest file ($mb MiB): mount/raw GET+zstd -d" "$seq_m" "$raw" "$(ratio "$seq_m" "$raw")" "$seq_r"
  printf '  %-44s find %s, read-all %s, sample %s, sequential %s\n' "S3 GET requests of the mount" "${R[$n.find_req]}" "${R[$n.all_req]}" "${R[$n.sample_req]}" "${R[$n.seq_req]}"
}
report a
report b
