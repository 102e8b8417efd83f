#!/usr/bin/env bash
# The main job on the embedded default store (a local directory, no service):
# save a cache, list keys, restore it elsewhere and check it is identical; and,
# where FUSE is available (root, /dev/fuse), mount it lazily and read it, then
# mount it writable, change it, and save the change incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cachemount"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The embedded default store: a local directory under ~/.cache/cachemount.
unset CACHEMOUNT_STORE

cp -r src "$work/src"
cd "$work"
key="demo-$(find src -type f -exec sha256sum {} + | sort | sha256sum | cut -c1-16)"
"$bin" save --key "$key" src
"$bin" keys
mv src src.orig
"$bin" restore --key "$key"
diff -r src.orig src && echo "restore: identical to the saved tree"

if "$bin" mount --help >/dev/null 2>&1 && [ -w /dev/fuse ]; then
  rm -rf src
  "$bin" mount --key "$key" src
  diff -r src.orig src && echo "mount: identical to the saved tree"
  "$bin" umount src

  "$bin" mount --writable --key "$key" src
  echo "// written by the build" >> src/main.rs
  echo "new" > src/new-file
  "$bin" save --key "$key-changed" src
  "$bin" umount src
  "$bin" restore --key "$key-changed"
  grep -q "written by the build" src/main.rs && [ "$(cat src/new-file)" = new ] &&
    echo "writable mount: the change was saved incrementally and restores"
  rm -rf src
  "$bin" restore --key "$key"
  diff -r src.orig src && echo "the first key still holds the saved tree"
fi
