#!/usr/bin/env bash
# Benchmark: `cachemount mount` against `restore` (download + extract) and
# against a raw GET + `zstd -d`, on SeaweedFS, in one run, on two seeded
# workloads: (a) ~100k small files in a node_modules-like tree, (b) a few
# files of 500 MB+, (seq) one large file read with `cat`, (start) mount
# start-up of a 50k-entry tree. Needs root (FUSE, drop_caches), curl and zstd.
#
#   scripts/bench-mount.sh [--only a,b,seq,start] [--repeat N] [--small N]
#                          [--large COUNT] [--large-mb MB] [--seq-mb MB] [--start-files N]
#
# seq: a file of --seq-mb (600) MB, half text, half random bytes, read with
# `cat` through a fresh mount, against `zstd -d` of the same bytes (a .zst in
# the page cache, to /dev/null), against a GET of that .zst piped into
# `zstd -d`, and against the GET alone (to /dev/null: the store's ceiling on
# this machine); each --repeat (3) times, interleaved, medians and the ratios
# of medians printed. Goal: cat >= 0.9x zstd -d.
# start: --start-files (50000) small files: `mount` returning, mount -> first
# `ls` answering, and restore, --repeat times each, medians; and the daemon's
# start-up phases (its log's "start-up phases" line) of the last mount;
# each once cold (page cache dropped first) and once warm (a host running
# job after job).
# Goal: restore / (mount -> ls) >= 15, `mount` < 0.1 s.
#
# Every mount measurement runs on a fresh mount (so the kernel and the block
# cache are cold); every measurement on the restored tree runs after
# dropping the page cache. Printed per workload: seconds, ratios against the
# goals of issue 3, and the S3 GET requests the mount made.
#
# Goals: mount <= 0.5 s and >= 20x faster than restore; 10% sample >= 5x
# faster than restore + the same reads; read-all <= 1.25x restore + read
# (workload b, a few large files: <= 0.8x); sequential >= 80% of raw GET +
# zstd -d; cold find <= 2x find on the restored tree.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=100000 large=2 large_mb=600 seq_mb=600 start_files=50000 repeat=3 only=a,b,seq,start
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --large-mb) large_mb=$2; shift 2 ;;
    --seq-mb) seq_mb=$2; shift 2 ;;
    --start-files) start_files=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "usage: $0 [--only a,b,seq,start] [--repeat N] [--small N] [--large COUNT] [--large-mb MB] [--seq-mb MB] [--start-files N]" >&2; exit 2 ;;
  esac
done
wanted() { [[ ",$only," == *",$1,"* ]]; }
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
# Cold figures: the host's disk cache would serve bytes an earlier run left.
export CACHEMOUNT_NO_DISK_CACHE=true

# Each workload mounts its key several times: no access profile, so every
# mount here is cold (scripts/bench-prefetch.sh measures the profile's replay).
export CACHEMOUNT_NO_RECORD=true

# Times are bash's $EPOCHREALTIME, read in this shell (no fork): a mount
# answers in tens of milliseconds, and `date` in a subshell plus an `awk`
# inside the timed span added 3-8 ms to each figure.
export LC_NUMERIC=C
# elapsed T0 [T1]: seconds from T0 to T1 (default: now).
elapsed() { local t1=${2:-$EPOCHREALTIME}; awk -v a="$t1" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
timed() { local t0=$EPOCHREALTIME; "$@" >/dev/null; elapsed "$t0"; }
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
  t0=$EPOCHREALTIME
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

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# seq: one large file, cat through the mount vs zstd -d vs GET | zstd -d.
run_seq() {
  local w="$work/seq" key=seq i
  echo "== seq: generating one ${seq_mb} MB file (seed 42)" >&2
  python3 "$repo/scripts/lib/gen-tree.py" "$w/src/tree" --small 0 --large 1 --large-mb "$seq_mb"
  (cd "$w/src" && "$bin" --quiet save --key "$key" tree >/dev/null)
  zstd -q -3 -c "$w/src/tree/big/large-0.bin" > "$w/file.zst"
  s3curl -T "$w/file.zst" "$(s3url raw/seq.zst)" >/dev/null
  R[seq.bytes]=$(stat -c %s "$w/src/tree/big/large-0.bin")
  rm -rf "$w/src"
  local cat_t=() zstd_t=() get_t=() raw_t=()
  for i in $(seq "$repeat"); do
    mount_fresh "$key" "$w/m$i"
    cat_t+=("$(timed cat tree/big/large-0.bin)")
    R[seq.req]=$(requests "$w/m$i/tree")
    unmount "$w/m$i/tree"
    cd "$w"
    cat "$w/file.zst" > /dev/null
    zstd_t+=("$(timed zstd -q -d -c "$w/file.zst")")
    drop_caches
    get_t+=("$(timed bash -c "$(declare -f s3curl); s3curl '$(s3url raw/seq.zst)' | zstd -q -d -c > /dev/null")")
    drop_caches
    raw_t+=("$(timed bash -c "$(declare -f s3curl); s3curl '$(s3url raw/seq.zst)' > /dev/null")")
  done
  R[seq.cat]=$(printf '%s\n' "${cat_t[@]}" | median)
  R[seq.zstd]=$(printf '%s\n' "${zstd_t[@]}" | median)
  R[seq.get]=$(printf '%s\n' "${get_t[@]}" | median)
  R[seq.raw]=$(printf '%s\n' "${raw_t[@]}" | median)
  R[seq.runs]="cat ${cat_t[*]}; zstd -d ${zstd_t[*]}; GET|zstd -d ${get_t[*]}; GET ${raw_t[*]}"
  rm -f "$w/file.zst"
}

# start: mount -> first ls of a 50k-entry tree vs its restore, and the phases.
run_start() {
  local w="$work/start" key=start i t0 t1 t2 log
  echo "== start: generating $start_files small files (seed 42)" >&2
  python3 "$repo/scripts/lib/gen-tree.py" "$w/src/tree" --small "$start_files" --large 0
  R[start.files]=$(find "$w/src/tree" | wc -l)
  (cd "$w/src" && "$bin" --quiet save --key "$key" tree >/dev/null)
  rm -rf "$w/src"
  local -A t=()
  # One cold (page cache dropped: the binary and the store's files come
  # from disk) and one warm (a host running job after job) of each.
  for i in $(seq "$repeat"); do
    for state in cold warm; do
      rm -rf "$w/m$i" && mkdir -p "$w/m$i" && cd "$w/m$i"
      if [ "$state" = cold ]; then drop_caches; else sync; fi
      t0=$EPOCHREALTIME
      "$bin" mount --key "$key" tree >"$w/mount.out"
      t1=$EPOCHREALTIME
      ls tree >/dev/null
      t2=$EPOCHREALTIME
      t[$state.mount]+="$(elapsed "$t0" "$t1") "
      t[$state.ls]+="$(elapsed "$t0" "$t2") "
      log=$(awk '$1 == "daemon" { print $NF }' "$w/mount.out")
      mounts+=("$w/m$i/tree")
      unmount "$w/m$i/tree"
      R[start.$state.phases]=$(grep -o 'start-up phases.*' "$log" | tail -1)
      # Each restore into a new dir, all deleted at the end: creating files
      # right after deleting a 58k-file tree is slow on ext4 (its inode
      # allocator skips recently deleted inodes: perf puts half the time of
      # such a restore in recently_deleted), which is not the restore's cost.
      mkdir -p "$w/r$i.$state" && cd "$w/r$i.$state"
      if [ "$state" = cold ]; then drop_caches; else sync; fi
      t[$state.restore]+="$(timed "$bin" --quiet restore --key "$key") "
      cd "$w"
    done
  done
  rm -rf "$w"/r*.cold "$w"/r*.warm
  local k
  for k in "${!t[@]}"; do
    R[start.$k]=$(printf '%s\n' ${t[$k]} | median)
  done
  R[start.runs]="cold: mount ${t[cold.mount]}; mount->ls ${t[cold.ls]}; restore ${t[cold.restore]}; warm: mount ${t[warm.mount]}; mount->ls ${t[warm.ls]}; restore ${t[warm.restore]}"
}

if wanted a; then run_workload a "--small $small --large 0"; fi
if wanted b; then run_workload b "--small 0 --large $large --large-mb $large_mb"; fi
if wanted seq; then run_seq; fi
if wanted start; then run_start; fi

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
  printf '  %-44s %9.3f %9.3f %9s   (goal mount/restore <= %s)\n' "read every byte incl. mount / restore (s)" "$a_m" "$a_r" "$(ratio "$a_m" "$a_r")" "$( [ "$n" = b ] && echo 0.8 || echo 1.25)"
  local seq_m seq_r raw
  seq_m=$(awk -v m="$mb" -v t="${R[$n.seq]}" 'BEGIN { printf "%.0f", m / t }')
  seq_r=$(awk -v m="$mb" -v t="${R[$n.seq_r]}" 'BEGIN { printf "%.0f", m / t }')
  raw=$(awk -v m="$mb" -v t="${R[$n.raw]}" 'BEGIN { printf "%.0f", m / t }')
  printf '  %-44s %9s %9s %9s   (goal mount/raw >= 0.8; restored disk: %s MB/s)\n' "sequential MB/s, largest file ($mb MiB): mount/raw GET+zstd -d" "$seq_m" "$raw" "$(ratio "$seq_m" "$raw")" "$seq_r"
  printf '  %-44s find %s, read-all %s, sample %s, sequential %s\n' "S3 GET requests of the mount" "${R[$n.find_req]}" "${R[$n.all_req]}" "${R[$n.sample_req]}" "${R[$n.seq_req]}"
}
mbps() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.0f", b / 1e6 / t }'; }
if wanted a; then report a; fi
if wanted b; then report b; fi
if wanted seq; then
  printf '\nseq: one %s MB file (half text, half random), medians of %s runs\n' "$(( R[seq.bytes] / 1000000 ))" "$repeat"
  printf '  %-44s %9s MB/s  (%s s)\n' "cat through a fresh mount" "$(mbps "${R[seq.bytes]}" "${R[seq.cat]}")" "${R[seq.cat]}"
  printf '  %-44s %9s MB/s  (%s s)\n' "zstd -d of the same bytes (page cache)" "$(mbps "${R[seq.bytes]}" "${R[seq.zstd]}")" "${R[seq.zstd]}"
  printf '  %-44s %9s MB/s  (%s s)\n' "GET | zstd -d" "$(mbps "${R[seq.bytes]}" "${R[seq.get]}")" "${R[seq.get]}"
  printf '  %-44s %9s MB/s  (%s s)\n' "GET alone, to /dev/null" "$(mbps "${R[seq.bytes]}" "${R[seq.raw]}")" "${R[seq.raw]}"
  printf '  %-44s %9s   (goal >= 0.9)\n' "cat / zstd -d (throughput ratio)" "$(ratio "${R[seq.zstd]}" "${R[seq.cat]}")"
  printf '  %-44s %9s\n' "cat / GET | zstd -d (throughput ratio)" "$(ratio "${R[seq.get]}" "${R[seq.cat]}")"
  printf '  %-44s %9s\n' "cat / GET alone (throughput ratio)" "$(ratio "${R[seq.raw]}" "${R[seq.cat]}")"
  printf '  %-44s %s\n' "S3 GET requests of the last cat" "${R[seq.req]}"
  printf '  runs (s): %s\n' "${R[seq.runs]}"
fi
if wanted start; then
  printf '\nstart: %s entries, medians of %s runs\n' "${R[start.files]}" "$repeat"
  for state in cold warm; do
    printf ' %s:\n' "$state"
    printf '  %-44s %9s s   (goal < 0.1)\n' "mount returning" "${R[start.$state.mount]}"
    printf '  %-44s %9s s\n' "mount -> first ls answering" "${R[start.$state.ls]}"
    printf '  %-44s %9s s\n' "restore" "${R[start.$state.restore]}"
    printf '  %-44s %9s   (goal >= 15)\n' "restore / (mount -> ls)" "$(ratio "${R[start.$state.restore]}" "${R[start.$state.ls]}")"
    printf '  %s\n' "${R[start.$state.phases]:-no start-up phases in the daemon log}"
  done
  printf '  runs (s): %s\n' "${R[start.runs]}"
fi
