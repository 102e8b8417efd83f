#!/usr/bin/env python3
"""Generates a seeded benchmark tree: the same arguments give the same bytes.

usage: gen-tree.py DIR --small N [--large COUNT --large-mb MB] [--seed S]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--small", type=int, default=50000)
    ap.add_argument("--large", type=int, default=3)
    ap.add_argument("--large-mb", type=int, default=120)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
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
