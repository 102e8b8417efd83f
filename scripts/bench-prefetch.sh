#!/usr/bin/env bash
# Benchmark (issue 13): learning from the last build. On SeaweedFS, with a
# generated node_modules-like tree (--files, 40000), a "build" reads a fixed
# 10% of the files in a fixed (seeded, shuffled) order:
#
#   run 1  mount cold, build, umount (the mount records; umount writes the profile)
#   run 2  every cache dropped (a new daemon: an empty block cache;
#          drop_caches), mount again (replaying the profile), build
#   native restore, drop_caches, the same build on the restored tree
#
# Two variants: "clustered" (the build reads every file of 10% of the
# packages) and "scattered" (10% of all files, anywhere in the tree). The
# scattered one also saves the tree again once the profile exists, which lays
# the profile's files out first, and runs run 2 on that archive ("laid out").
# Run 2 and native alternate --repeat times (3; medians, every run printed:
# native moves by 2-3x from one minute to the next on this shared machine).
# The floor is the same build once more on run 2's mount after drop_caches:
# every byte in the daemon's block cache, so what is left is FUSE's cost.
# Printed from one run: mount + build seconds of each run, run 2 / run 1,
# run 2 / native, the GETs and bytes each run fetched. Goal: run 2 <= 1.0x native.
# Needs root (FUSE, drop_caches).
#
#   scripts/bench-prefetch.sh [--files N] [--repeat N] [--only clustered,scattered]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
files=40000 only=clustered,scattered repeat=3
while [ $# -gt 0 ]; do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    *) echo "usage: $0 [--files N] [--repeat N] [--only clustered,scattered]" >&2; exit 2 ;;
  esac
done
wanted() { [[ ",$only," == *",$1,"* ]]; }
[ "$(id -u)" = 0 ] || { echo "bench-prefetch: needs root (FUSE mounts, drop_caches)" >&2; exit 1; }

# CACHEMOUNT_BIN: use that binary instead of building the release one.
if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
work="$(mktemp -d /var/tmp/cachemount-bench-prefetch.XXXXXX)"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

scripts/s3-server.sh start >/dev/null
eval "$(scripts/s3-server.sh env)"
prefix="bench-prefetch-$$-$(date +%s)"
export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/$prefix" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"
# Cold figures: the host's disk cache would serve bytes an earlier run left.
export CACHEMOUNT_NO_DISK_CACHE=true

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
median() { printf '%s\n' $1 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
counter() { "$bin" stats "$1" | awk -v k="$2" '$1 == k { print $2 }'; }
build() { tr '\n' '\0' < "$1" | xargs -0 cat > /dev/null; }

echo "== generating $files files (seed 42)" >&2
python3 "$repo/scripts/lib/gen-tree.py" "$work/src/tree" --small "$files" --large 0
# The builds: fixed file lists in a fixed order (seeded shuffles).
(cd "$work/src" && find tree -type f | sort) > "$work/all"
python3 - "$work/all" "$work" <<'EOF'
import random, sys
files = open(sys.argv[1]).read().split("\n")[:-1]
rng = random.Random(42)
pkgs = sorted({f.split("/")[2] for f in files})
chosen = set(rng.sample(pkgs, len(pkgs) // 10))
clustered = [f for f in files if f.split("/")[2] in chosen]
rng.shuffle(clustered)
scattered = rng.sample(files, len(files) // 10)
for name, lst in (("clustered", clustered), ("scattered", scattered)):
    open(f"{sys.argv[2]}/{name}", "w").write("".join(f + "\n" for f in lst))
EOF

declare -A R
# One mount + build of key $1 in a fresh dir $2 with build list $3; adds
# the time to R[$4.runs] and sets R[$4.gets], R[$4.bytes], R[$4.replay],
# R[$4.summary]; with $5 = floor, also times the build again after
# drop_caches into R[$4.floor]; unmounts (writing the profile).
run_mounted() {
  local key=$1 dir=$2 list=$3 tag=$4 t0
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  drop_caches
  t0=$(now)
  "$bin" --quiet mount --key "$key" tree >/dev/null
  mounts+=("$dir/tree")
  build "$list"
  R[$tag.runs]+="$(elapsed "$t0") "
  R[$tag.gets]=$(counter "$dir/tree" requests)
  R[$tag.bytes]=$(counter "$dir/tree" bytes_fetched)
  R[$tag.replay]=$(counter "$dir/tree" replay_bytes)
  if [ "${5:-}" = floor ]; then
    drop_caches
    t0=$(now)
    build "$list"
    R[$tag.floor]+="$(elapsed "$t0") "
  fi
  R[$tag.summary]=$("$bin" umount tree | tail -1)
  cd "$work"
}

# The build on key $1 restored into $work/r (restored once, kept).
run_native() {
  local key=$1 list=$2 tag=$3 t0
  if [ ! -d "$work/r" ]; then
    mkdir -p "$work/r" && (cd "$work/r" && "$bin" --quiet restore --key "$key" >/dev/null)
  fi
  cd "$work/r"
  drop_caches
  t0=$(now)
  build "$list"
  R[$tag.runs]+="$(elapsed "$t0") "
  cd "$work"
}

variant() {
  local v=$1 key="$1-v1" i
  echo "== $v: save (no profile), run 1, then run 2 and native $repeat times" >&2
  (cd "$work/src" && "$bin" --quiet save --key "$key" tree >/dev/null)
  run_mounted "$key" "$work/$v-1" "$work/$v" "$v.run1"
  for i in $(seq "$repeat"); do
    run_mounted "$key" "$work/$v-2" "$work/$v" "$v.run2" "$( [ "$i" = "$repeat" ] && echo floor)"
    run_native "$key" "$work/$v" "$v.native"
  done
  if [ "$v" = scattered ]; then
    echo "== $v: save again with the profile (laid out), run 2 $repeat times" >&2
    (cd "$work/src" && "$bin" --quiet save --key "$key" tree >/dev/null)
    for i in $(seq "$repeat"); do
      run_mounted "$key" "$work/$v-3" "$work/$v" "$v.laid"
    done
  fi
  rm -rf "$work/r"
  local tag
  for tag in run1 run2 native laid; do
    if [ -n "${R[$v.$tag.runs]:-}" ]; then R[$v.$tag.t]=$(median "${R[$v.$tag.runs]}"); fi
  done
}

wanted clustered && variant clustered
wanted scattered && variant scattered

echo
echo "bench-prefetch: $files files, builds read 10% ($(wc -l < "$work/clustered") clustered / $(wc -l < "$work/scattered") scattered files), SeaweedFS, $(nproc) cores"
for v in clustered scattered; do
  wanted "$v" || continue
  echo "-- $v"
  for tag in run1 run2 laid; do
    [ -n "${R[$v.$tag.t]:-}" ] || continue
    printf '  %-28s %7s s   %6s GETs  %10s fetched (%s by replay)\n' \
      "$tag: mount + build" "${R[$v.$tag.t]}" "${R[$v.$tag.gets]}" "$(mb "${R[$v.$tag.bytes]}")" "$(mb "${R[$v.$tag.replay]}")"
    printf '  %-28s %s\n' "" "umount: ${R[$v.$tag.summary]}"
    printf '  %-28s %s\n' "" "runs (s): ${R[$v.$tag.runs]}"
  done
  printf '  %-28s %7s s   runs (s): %s\n' "native: build (restored)" "${R[$v.native.t]}" "${R[$v.native.runs]}"
  printf '  %-28s %7s s   (the build again on the last run 2 mount after drop_caches: the cost of FUSE)\n' "floor: build, bytes cached" "${R[$v.run2.floor]}"
  echo "  run 2 / run 1:               $(ratio "${R[$v.run2.t]}" "${R[$v.run1.t]}")x"
  echo "  run 2 / native:              $(ratio "${R[$v.run2.t]}" "${R[$v.native.t]}")x   (goal <= 1.0x)"
  if [ -n "${R[$v.laid.t]:-}" ]; then
    echo "  laid out run 2 / run 1:      $(ratio "${R[$v.laid.t]}" "${R[$v.run1.t]}")x"
    echo "  laid out run 2 / native:     $(ratio "${R[$v.laid.t]}" "${R[$v.native.t]}")x"
    echo "  laid out run 2 / run 2:      $(ratio "${R[$v.laid.t]}" "${R[$v.run2.t]}")x   (what the layout adds)"
  fi
done
