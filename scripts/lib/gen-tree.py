#!/usr/bin/env python3
"""Generates a seeded benchmark tree: the same arguments give the same bytes.

usage: gen-tree.py DIR --small N [--large COUNT --large-mb MB] [--seed S]
       gen-tree.py DIR --change-percent P [--seed S]

With --change-percent, DIR is an existing tree to change, the same way every
time (see apply_changes): the changes a build makes to a restored cache.

Small files look like a node_modules tree (many packages, nested lib dirs, text
of a few KiB that compresses like source code); large files are half text, half
incompressible bytes, like build outputs and tarballs in real caches.
"""
import argparse
import os
import random

WORDS = [b"const ", b"function ", b"return ", b"module", b".exports", b" = ", b"require(",
         b"'./lib'", b");\n", b"{\n", b"}\n", b"if (", b"value", b"index", b"42", b"\t", b"async ",
         b"await ", b"import ", b"from ", b"'react'", b"export default ", b"// comment\n"]


def text(rng, n):
    out = bytearray()
    while len(out) < n:
        out += rng.choice(WORDS)
    return bytes(out[:n])


def apply_changes(root, percent, seed=42):
    """Changes PERCENT% of the files under ROOT deterministically: of that
    many changes, half rewrite a file, 30% add a new one, 20% delete one.
    Files are picked evenly from the sorted list of paths (every Nth), so two
    copies of the same tree, wherever they are, get the same changes.
    Returns (rewritten, added, deleted)."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(d, root)
        files += [os.path.normpath(os.path.join(rel, n)) for n in names
                  if os.path.isfile(os.path.join(d, n))]
    files.sort(key=os.fsencode)
    total = round(len(files) * percent / 100)
    n_new = total * 30 // 100
    n_del = total * 20 // 100
    n_rw = total - n_new - n_del
    picks = n_rw + n_del
    rng = random.Random(seed + 1)
    pool = [text(rng, 8192) for _ in range(64)]

    def content(n):
        block = pool[rng.randrange(len(pool))]
        return b"// changed by the build\n" + (block * (n // len(block) + 1))[:n]

    rewritten = deleted = 0
    for k in range(picks):
        path = os.path.join(root, files[k * len(files) // picks])
        # Bresenham: the deletes are spread evenly among the picks.
        if (k + 1) * n_del // picks != k * n_del // picks:
            os.remove(path)
            deleted += 1
        else:
            size = os.stat(path).st_size
            with open(path, "wb") as f:
                f.write(content(size))
            rewritten += 1
    for j in range(n_new):
        # Most new files land next to existing ones, every 10th in a new package.
        if j % 10 == 9:
            d = os.path.join(root, "node_modules", f"pkg-new-{j // 100:04d}", "lib")
        else:
            d = os.path.dirname(os.path.join(root, files[(j * len(files) // max(n_new, 1) + 7) % len(files)]))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"new-{j}.js"), "wb") as f:
            f.write(content(int(rng.expovariate(1 / 3000)) + 50))
    return rewritten, n_new, deleted


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--small", type=int, default=50000)
    ap.add_argument("--large", type=int, default=3)
    ap.add_argument("--large-mb", type=int, default=120)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--change-percent", type=float, default=None)
    a = ap.parse_args()
    if a.change_percent is not None:
        rw, new, gone = apply_changes(a.dir, a.change_percent, a.seed)
        print(f"changed {a.dir}: {rw} rewritten, {new} new, {gone} deleted")
        return
    rng = random.Random(a.seed)
    # A pool of text blocks keeps generation fast while files stay varied.
    pool = [text(rng, 8192) for _ in range(256)]
    for i in range(a.small):
        pkg = i // 40
        d = os.path.join(a.dir, "node_modules", f"pkg-{pkg:05d}", "lib", f"m{(i // 8) % 5}")
        os.makedirs(d, exist_ok=True)
        n = int(rng.expovariate(1 / 3000)) + 50
        block = pool[rng.randrange(len(pool))]
        data = (block * (n // len(block) + 1))[:n]
        with open(os.path.join(d, f"f{i}.js"), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(a.dir, "big"), exist_ok=True)
    for j in range(a.large):
        with open(os.path.join(a.dir, "big", f"large-{j}.bin"), "wb") as f:
            for k in range(a.large_mb):
                if k % 2:
                    f.write(rng.randbytes(1 << 20))
                else:
                    f.write(b"".join(pool[rng.randrange(len(pool))] for _ in range(128)))


if __name__ == "__main__":
    main()
