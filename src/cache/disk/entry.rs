//! One cache entry on disk: how it is named (content keys and version keys),
//! where it lives, the checksum kept beside it, and the check that every
//! read of it passes first.
//!
//! An entry is one file's whole decompressed content, byte for byte, so the
//! kernel can read it directly (FUSE passthrough). The checksum cannot be in
//! the file, so it is an extended attribute set on the temporary file before
//! it is renamed into place: the name, the bytes and the checksum appear
//! together or not at all.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::archive::Entry;
use crate::cache::version::Version;
use crate::store::ObjectVersion;

/// The attribute holding an entry's checksum: CRC-32 then length (LE).
const SUM_XATTR: &str = "user.cachemount.sum";
/// Bytes read at a time when checking an entry.
const CHECK_CHUNK: usize = 1 << 20;

/// The name of an entry: a SHA-256, printed as its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryKey(pub [u8; 32]);

impl EntryKey {
    /// The key of entry `i` of `v`. A cachemount entry is keyed by its
    /// content hash (and size), so any version or archive holding the same
    /// content shares it; the bytes filed under it were checked against that
    /// hash when they were written ([`content_hash`]). A foreign entry has
    /// no content hash: it is keyed by the pinned object version itself.
    /// Both are scoped by `namespace` (the store), so an archive can name
    /// only bytes that an archive of the same store put there.
    pub fn of(namespace: &str, v: &Version, i: u32) -> EntryKey {
        EntryKey::of_entry(namespace, &v.key, &v.pin, v.size, i, v.entry(i))
    }

    /// [`EntryKey::of`] for entry `i` of the archive `key` pinned to `pin`
    /// (`size` bytes), where no [`Version`] is open (restore).
    pub fn of_entry(
        namespace: &str,
        key: &str,
        pin: &ObjectVersion,
        size: u64,
        i: u32,
        e: &Entry,
    ) -> EntryKey {
        let mut h = Sha256::new();
        h.update(b"cachemount-disk-v1\0");
        h.update(namespace.as_bytes());
        h.update(b"\0");
        match e.content_hash {
            Some(hash) => {
                h.update(b"content\0");
                h.update(hash);
            }
            None => {
                h.update(b"version\0");
                for part in [key, &pin.etag] {
                    h.update(part.as_bytes());
                    h.update(b"\0");
                }
                h.update(pin.version_id.as_deref().unwrap_or("").as_bytes());
                h.update(b"\0");
                h.update(size.to_le_bytes());
                h.update(i.to_le_bytes());
            }
        }
        h.update(e.size.to_le_bytes());
        EntryKey(h.finalize().into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Where the entry lives below the cache's root: 256 directories by
    /// the first byte, so no directory grows past a few thousand names.
    pub fn path(&self, root: &Path) -> PathBuf {
        let hex = self.hex();
        root.join(&hex[..2]).join(hex)
    }
}

/// Whether `name` is an entry's file name (64 hex digits): what eviction and
/// `cache clear` may delete, and nothing else.
pub fn is_entry_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The content hash a cachemount index records, computed the way the writer
/// does: the SHA-256 over the SHA-256s of the blocks (frames) in order.
pub fn content_hash<'a>(block_sums: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in block_sums {
        h.update(s);
    }
    h.finalize().into()
}

/// Whether bytes with these block sums may be filed under `e`'s key: a
/// cachemount entry's content must hash to the index's content hash (else
/// the archive lies about it, and its bytes must not be shared); a foreign
/// entry's bytes were verified against its CRC-32 before they got here.
pub fn may_file(e: &Entry, block_sums: &[[u8; 32]]) -> bool {
    match e.content_hash {
        Some(expected) => content_hash(block_sums) == expected,
        None => true,
    }
}

/// Sets the checksum attribute of a filled entry (before it is renamed in).
pub fn set_sum(file: &File, crc: u32, len: u64) -> io::Result<()> {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&crc.to_le_bytes());
    v[4..].copy_from_slice(&len.to_le_bytes());
    rustix::fs::fsetxattr(file, SUM_XATTR, &v, rustix::fs::XattrFlags::empty())?;
    Ok(())
}

/// The identity of an entry file that passed its check, so that this
/// process checks it again only when it was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    dev: u64,
    ino: u64,
    ctime_ns: i128,
}

impl Checked {
    pub fn of(meta: &std::fs::Metadata) -> Checked {
        Checked {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Why an entry on disk is not served.
#[derive(Debug)]
pub enum Bad {
    /// No such entry (or it cannot be opened): a miss.
    Missing,
    /// The entry is damaged (size, checksum or attribute wrong): dropped.
    Damaged(String),
}

/// Checks an opened entry against `size` and the checksum beside it, reading
/// every byte. Bounded: the expected size comes from the index (bounded
/// when it was decoded), and the file must have exactly that size.
pub fn check(file: &File, size: u64) -> Result<(), Bad> {
    let meta = file.metadata().map_err(|_| Bad::Missing)?;
    if !meta.is_file() || meta.len() != size {
        return Err(Bad::Damaged(format!(
            "size {} instead of {size}",
            meta.len()
        )));
    }
    let mut sum = [0u8; 12];
    match rustix::fs::fgetxattr(file, SUM_XATTR, &mut sum) {
        Ok(12) => {}
        _ => return Err(Bad::Damaged("no checksum beside it".into())),
    }
    let crc = u32::from_le_bytes(sum[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(sum[4..].try_into().expect("8 bytes"));
    if len != size {
        return Err(Bad::Damaged(format!("checksum is of {len} bytes")));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHECK_CHUNK.min(size as usize).max(1)];
    let mut pos = 0u64;
    while pos < size {
        let want = buf.len().min((size - pos) as usize);
        let n = file
            .read_at(&mut buf[..want], pos)
            .map_err(|e| Bad::Damaged(format!("read failed: {e}")))?;
        if n == 0 {
            return Err(Bad::Damaged("shorter than its size".into()));
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    if hasher.finalize() != crc {
        return Err(Bad::Damaged("CRC-32 does not match".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_matches_the_writer_for_one_frame() {
        let content = b"hello";
        let frame: [u8; 32] = Sha256::digest(content).into();
        let writer: [u8; 32] = Sha256::digest(frame).into();
        assert_eq!(content_hash([&frame]), writer);
    }

    #[test]
    fn entry_names_are_exactly_64_hex_digits() {
        assert!(is_entry_name(&"ab".repeat(32)));
        assert!(!is_entry_name("lock"));
        assert!(!is_entry_name(&"g".repeat(64)));
        assert!(!is_entry_name(&format!("{}.tmp", "a".repeat(64))));
    }
}
