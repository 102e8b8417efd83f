#!/usr/bin/env bash
# Measures the 412 path (issue 4): a key mount of the ~100k-file benchmark
# tree on SeaweedFS reads every file (tar) while the blob's ETag is changed in
# the middle (the identical bytes re-uploaded as a multipart upload, with
# boto3 from the test-server venv). Prints the reopen time (HEAD + tail +
# index), how many reads waited on the reopen, the invalidated blocks, and
# whether the walk saw any error. Needs root (FUSE).
#
#   scripts/bench-reopen.sh [--small N] [--after SECONDS] [--parallel N]
#
# --parallel N reads the files with N concurrent readers (xargs -P) instead
# of one tar, so that several reads meet the reopen.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
small=100000 after=1 parallel=1
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --after) after=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    *) echo "usage: $0 [--small N] [--after SECONDS] [--parallel N]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-reopen: needs root (FUSE mounts)" >&2; exit 1; }
if [ -n "${CACHEMOUNT_BIN:-}" ]; then
  bin=$CACHEMOUNT_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
fi
venv="${CACHEMOUNT_VENV:-$HOME/.cache/cachemount/venv}"
work="$(mktemp -d /var/tmp/cachemount-bench-reopen.XXXXXX)"
mounted=""
cleanup() {
  [ -n "$mounted" ] && umount -l "$mounted" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

scripts/s3-server.sh start >/dev/null
eval "$(scripts/s3-server.sh env)"
prefix="bench-reopen-$$-$(date +%s)"
export CACHEMOUNT_STORE="s3://$CACHEMOUNT_TEST_S3_BUCKET/$prefix" AWS_ENDPOINT_URL="$CACHEMOUNT_TEST_S3_ENDPOINT"
# Cold figures: the host's disk cache would serve bytes an earlier run left.
export CACHEMOUNT_NO_DISK_CACHE=true

echo "== generating $small small files (seed 42)" >&2
python3 "$repo/scripts/lib/gen-tree.py" "$work/src/tree" --small "$small" --large 0
(cd "$work/src" && "$bin" --quiet save --key reopen tree >/dev/null)
rm -rf "$work/src"
blob="$prefix/blobs/sha256/$(
  "$venv/bin/python" - "$prefix" <<'EOF'
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
r = s3.list_objects_v2(Bucket=os.environ["CACHEMOUNT_TEST_S3_BUCKET"], Prefix=sys.argv[1] + "/blobs/sha256/")
print(r["Contents"][0]["Key"].rsplit("/", 1)[1])
EOF
)"
echo "== blob $blob" >&2

mkdir -p "$work/m" && cd "$work/m"
"$bin" --quiet mount --key reopen tree >"$work/mount.out"
log=$(sed -n 's/.*daemon pid [0-9]*, log //p' "$work/mount.out")
mounted="$work/m/tree"
t0=$(date +%s.%N)
if [ "$parallel" -gt 1 ]; then
  ( find tree -type f -print0 | xargs -0 -P "$parallel" -n 100 cat 2>"$work/tar.err" >/dev/null; echo $? > "$work/tar.rc" ) &
else
  ( tar -cf - tree 2>"$work/tar.err" | cat >/dev/null; echo $? > "$work/tar.rc" ) &
fi
walker=$!
sleep "$after"
echo "== changing the ETag (multipart re-upload of the same bytes) $after s into the walk" >&2
"$venv/bin/python" - "$blob" <<'EOF'
import boto3, os, sys, tempfile
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
bucket, key = os.environ["CACHEMOUNT_TEST_S3_BUCKET"], sys.argv[1]
before = s3.head_object(Bucket=bucket, Key=key)["ETag"]
with tempfile.NamedTemporaryFile() as f:
    s3.download_fileobj(bucket, key, f)
    f.flush()
    size = os.path.getsize(f.name)
    cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    if size < (5 << 20) or "-" in before:
        cfg = TransferConfig(multipart_threshold=1 << 40)
    s3.upload_file(f.name, bucket, key, Config=cfg)
after = s3.head_object(Bucket=bucket, Key=key)["ETag"]
print(f"ETag {before} -> {after} ({size} bytes)", file=sys.stderr)
assert before != after, "the ETag did not change"
EOF
wait "$walker"
walk=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
echo
echo "walk (every file, $parallel reader(s)): ${walk} s, exit $(cat "$work/tar.rc"), errors: $(wc -l < "$work/tar.err")"
"$bin" stats tree | grep -E '^(requests|cache_misses|precondition_failed|reopens|reopen_ms|reopen_max_ms|reopen_waits|reopen_refused|invalidated_blocks|changed_files|stale_handles|read_errors) '
"$bin" umount tree >/dev/null && mounted=""
grep -h "reopened in" "$log" 2>/dev/null | tail -1 || true
