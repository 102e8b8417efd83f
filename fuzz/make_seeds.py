#!/usr/bin/env python3
"""Writes seed inputs for every fuzz target into fuzz/seeds/<target>/ (the
committed corpus in fuzz/corpus/ is these seeds merged with what fuzzing
found, minimised with -merge=1; see scripts/fuzz.sh --seed).

Usage: make_seeds.py CACHEMOUNT_BINARY OUT_DIR

Sources: archives saved by cachemount itself (small tree with a symlink, an
xattr, an empty file, a directory; a multi-frame file with a seek table), zips
made by Python's zipfile (stored, deflate, zip64 extras, a Buildkite manifest),
and each parser's slice of those (EOCD tail, central directory, local header,
index, seek table, manifest, key pointer, entry data).
"""
import io, json, os, struct, subprocess, sys, tempfile, zipfile, zlib

binary, out = sys.argv[1], sys.argv[2]
seeds = {}


def add(target, name, data):
    seeds.setdefault(target, {})[name] = bytes(data)


def zstd(data, *args):
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, capture_output=True, check=True).stdout


def unzstd(data):
    return subprocess.run(["zstd", "-q", "-d", "-c"], input=data, capture_output=True, check=True).stdout


def eocd(buf):
    pos = buf.rindex(b"PK\x05\x06")
    _, _, _, _, n, cd_size, cd_off, clen = struct.unpack_from("<IHHHHIIH", buf, pos)
    return pos, n, cd_size, cd_off, buf[pos + 22 : pos + 22 + clen]


def slices(tag, buf):
    """Adds the per-parser slices of one archive."""
    add("open", tag, buf)
    add("eocd", tag, struct.pack("<Q", 0) + buf[-(65535 + 22) :])
    add("eocd", tag + "-short", struct.pack("<Q", len(buf) - 30) + buf[-30:])
    pos, n, cd_size, cd_off, comment = eocd(buf)
    loc = buf.rfind(b"PK\x06\x07", 0, pos)
    if loc >= 0:
        (z64,) = struct.unpack_from("<Q", buf, loc + 8)
        add("eocd", tag + "-zip64", struct.pack("<Q", 0) + buf[z64:])
        _, _, _, _, _, _, n, cd_size, cd_off = struct.unpack_from("<IQHHIIQQQQ", buf, z64)
    add("central_directory", tag, struct.pack("<Q", n) + buf[cd_off : cd_off + cd_size])
    add("local_header", tag, buf[:200])
    if comment.startswith(b"cachemount:index:v1:"):
        off, ln, _ = comment[len(b"cachemount:index:v1:") :].split(b":")
        stored = buf[int(off) : int(off) + int(ln)]
        add("index", tag + "-stored", b"\x01" + stored)
        add("index", tag + "-raw", b"\x00" + unzstd(stored))
    i = buf.find(b"\x5e\x2a\x4d\x18")
    while i >= 0:
        (plen,) = struct.unpack_from("<I", buf, i + 4)
        add("seek_table", f"{tag}-{i}", buf[i : i + 8 + plen])
        i = buf.find(b"\x5e\x2a\x4d\x18", i + 1)


# Archives cachemount writes.
with tempfile.TemporaryDirectory() as tmp:
    t1, t2, store = (os.path.join(tmp, d) for d in ("t1", "t2", "store"))
    os.makedirs(os.path.join(t1, "d", "e"))
    os.makedirs(t2)
    open(os.path.join(t1, "a.txt"), "w").write("hello\n")
    open(os.path.join(t1, "empty"), "w").close()
    open(os.path.join(t1, "d", "e", "f"), "w").write("x" * 300)
    os.symlink("a.txt", os.path.join(t1, "link"))
    try:
        os.setxattr(os.path.join(t1, "a.txt"), "user.k", b"v")
    except OSError:
        pass  # a file system without user xattrs
    # Larger than one 1 MiB frame, but compresses to ~1 KiB: a frame table and seek table.
    open(os.path.join(t2, "big"), "wb").write((b"0123456789abcdef" * 1000 + b"\n") * 170)
    open(os.path.join(t2, "small"), "wb").write(b"small")
    for key, tree in (("k1", t1), ("k2", t2)):
        subprocess.run([binary, "save", "-q", "--store", store, "--key", key, tree], check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        add("key_pointer", key, open(os.path.join(store, "keys", key), "rb").read())
        digest = json.load(open(os.path.join(store, "keys", key)))["digest"]
        slices("cachemount-" + key, open(os.path.join(store, "blobs", "sha256", digest), "rb").read())

# An access profile (profiles/<key>), laid out as src/profile/format.rs says.
def profile(builds, entries):
    body = b"cachemount-profile\n" + struct.pack("<III", 1, builds, len(entries))
    for name, seen, start, end in entries:
        body += struct.pack("<H", len(name)) + name + struct.pack("<BII", seen, start, end)
    return body + struct.pack("<I", zlib.crc32(body))


add("profile", "two-entries", profile(2, [(b"_0/a.txt", 3, 0, 1), (b"_0/d/e/f", 1, 0, 16)]))
add("profile", "empty", profile(0, []))

# Foreign zips.
manifest = b'{"version":2,"mappings":{"_0":".","_1":"~"}}'
for name, method, z64 in (
    ("stored", zipfile.ZIP_STORED, False),
    ("deflate", zipfile.ZIP_DEFLATED, False),
    ("zip64", zipfile.ZIP_DEFLATED, True),
):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", method) as z:
        z.writestr(".buildkite/cache-manifest.json", manifest)
        z.writestr("_0/dir/", b"")
        with z.open("_0/dir/file.txt", "w", force_zip64=z64) as f:
            f.write(b"some file content\n" * 20)
        info = zipfile.ZipInfo("_1/exec.sh", (2024, 1, 1, 0, 0, 0))
        info.external_attr = (0o100755 << 16)
        info.create_system = 3
        z.writestr(info, b"#!/bin/sh\necho hi\n")
    slices("zipfile-" + name, b.getvalue())

for i, m in enumerate([manifest, b'{"version":2,"mappings":{}}', b'{"version":2,"mappings":{"_0":"/"}}']):
    add("manifest", f"m{i}", m)

# Entry decoders: kind, size, crc32 | frame_size << 32, [frame lengths], data.
content = b"some file content\n" * 20
crc = zlib.crc32(content)
header = lambda kind, fs=0: bytes([kind]) + struct.pack("<QQ", len(content), crc | fs << 32)
add("decode", "stored", header(0) + content)
add("decode", "deflate", header(1) + zlib.compress(content)[2:-4])
add("decode", "zstd", header(2) + zstd(content, "--check"))
frames = [zstd(content[i : i + 100], "--check") for i in range(0, len(content), 100)]
add("decode", "frames", header(3, 100) + b"".join(struct.pack("<H", len(f)) for f in frames) + b"".join(frames))

for target, files in seeds.items():
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        open(os.path.join(d, "seed-" + name), "wb").write(data)
    print(f"{target}: {len(files)} seeds")
