//! The store layout (DESIGN §2), the same on every [`ObjectStore`]:
//!
//! - `blobs/sha256/<hex>` — archives, content-addressed;
//! - `keys/<escaped key>` — a small JSON [`KeyPointer`] to a blob, written only
//!   after the blob is complete, so readers never see a half-written cache and
//!   concurrent saves of one key are harmless (last writer wins).
//!
//! Cache keys are percent-escaped into one object name, so that any string is a
//! valid key on every store and a *prefix* of a key escapes to a prefix of the
//! escaped key — which is what lets `--fallback PREFIX` be a plain listing.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{NameTooLong, ObjectStore, PutSource, StoreError};

/// Key pointers live under this prefix.
pub const KEYS_PREFIX: &str = "keys/";
/// Access profiles live under this prefix, one per key (beside `keys/`).
pub const PROFILES_PREFIX: &str = "profiles/";
/// The longest cache key, in bytes (GitHub's cache has the same limit).
pub const MAX_KEY_LEN: usize = 512;
/// Escaped keys are cut into path segments of this many bytes, so no file name
/// exceeds a local file system's 255-byte limit. Each segment but the last is
/// followed by `+/` (`+` never occurs unescaped), which keeps a key distinct from
/// the keys it is a prefix of and keeps the escaping reversible.
const SEGMENT_LEN: usize = 200;
/// Pointers read at once when resolving a fallback prefix.
const POINTER_READ_CONCURRENCY: usize = 16;

/// The object key of the archive whose SHA-256 is `hex`.
pub fn blob_key(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the cache key is empty: give --key a value")]
    Empty,
    #[error("the cache key is {len} bytes long; at most {MAX_KEY_LEN} are allowed: use a shorter key (a hash of the long part)")]
    TooLong { len: usize },
    #[error("{0:?} is not an escaped cache key")]
    BadEscape(String),
    /// The key (or a fallback prefix) is valid but its pointer's name does not fit the store.
    #[error("the {what} ({len} bytes) cannot be used with {store}: its pointer's name would be {limit}; use a shorter one (every byte outside [A-Za-z0-9._-] is escaped as three)")]
    TooLongForStore {
        /// "cache key" or "key prefix".
        what: &'static str,
        len: usize,
        store: String,
        limit: NameTooLong,
    },
}

/// Percent-escapes everything but `[A-Za-z0-9._-]` (and a leading `.`, so no
/// escaped key is `.`, `..` or a hidden file). Accepts an empty string, which is
/// the prefix of every key; [`pointer_key`] refuses empty keys.
pub fn escape_key(key: &str) -> Result<String, KeyError> {
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: key.len() });
    }
    let mut flat = String::with_capacity(key.len());
    for b in key.bytes() {
        // A `.` never starts a segment (no `.`, `..` or hidden file names).
        let dot_ok = b == b'.' && !flat.len().is_multiple_of(SEGMENT_LEN);
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || dot_ok {
            flat.push(b as char);
        } else {
            flat.push_str(&format!("%{b:02X}"));
        }
    }
    // Only ASCII in `flat`, so cutting at byte offsets is safe.
    let segments: Vec<&str> = flat
        .as_bytes()
        .chunks(SEGMENT_LEN)
        .map(|c| std::str::from_utf8(c).expect("ASCII"))
        .collect();
    Ok(segments.join("+/"))
}

/// Inverts [`escape_key`].
pub fn unescape_key(escaped: &str) -> Result<String, KeyError> {
    let bad = || KeyError::BadEscape(escaped.to_string());
    let flat = escaped.replace("+/", "");
    let mut bytes = Vec::with_capacity(flat.len());
    let mut rest = flat.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            bytes.push(b);
            rest = tail;
        } else {
            return Err(bad());
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The object key of the pointer for cache key `key`.
pub fn pointer_key(key: &str) -> Result<String, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(format!("{KEYS_PREFIX}{}", escape_key(key)?))
}

/// The object key of the access profile of cache key `key`, checked against
/// `store`'s limits on object names (`profiles/` is no longer than `keys/`,
/// but a store may say otherwise).
pub fn profile_key<S: ObjectStore>(store: &S, key: &str) -> Result<String, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    let object = format!("{PROFILES_PREFIX}{}", escape_key(key)?);
    fits(store, "cache key", key, object)
}

/// [`pointer_key`], checked against `store`'s limits on object names: what
/// every read and write of a pointer uses, and what `save` checks before it
/// uploads anything.
pub fn checked_pointer_key<S: ObjectStore>(store: &S, key: &str) -> Result<String, KeyError> {
    let object = pointer_key(key)?;
    fits(store, "cache key", key, object)
}

/// `object` (the pointer name made from `key`, a `what`) if `store` can hold a name that long.
fn fits<S: ObjectStore>(
    store: &S,
    what: &'static str,
    key: &str,
    object: String,
) -> Result<String, KeyError> {
    match store.check_name(&object) {
        Ok(()) => Ok(object),
        Err(limit) => Err(KeyError::TooLongForStore {
            what,
            len: key.len(),
            store: store.describe(),
            limit,
        }),
    }
}

/// What `keys/<escaped key>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPointer {
    /// SHA-256 (hex) naming the blob: `blobs/sha256/<digest>`.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// When the save finished, in seconds since the Unix epoch; fallback
    /// resolution takes the newest.
    pub created: u64,
    /// The path specs the cache was saved from, as given on the command line.
    pub paths: Vec<String>,
    /// Version of the archive format the blob was written with.
    pub format_version: u32,
    /// Where the blob's stored index lies (what its EOCD comment says), so
    /// that a mount fetches it alongside the tail instead of after it.
    /// Absent in pointers written before it existed. Only a hint: the index
    /// is used only if it hashes to the digest the tail's comment names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexLocation>,
}

/// A byte range of a blob, as a key pointer records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexLocation {
    pub offset: u64,
    pub len: u64,
}

/// The largest index a pointer's hint may fetch: a larger one (millions of
/// entries) is read the ordinary way, after the tail.
const MAX_HINTED_INDEX_LEN: u64 = 64 << 20;

/// A key pointer object larger than this is refused unread (it is a few
/// hundred bytes; a huge one is garbage, not something to hold in memory).
pub const MAX_POINTER_LEN: u64 = 1 << 20;

impl KeyPointer {
    /// The blob this pointer names.
    pub fn blob_key(&self) -> String {
        blob_key(&self.digest)
    }

    /// The range of the blob its index hint names, when one is worth a GET
    /// of its own: not within the tail that every open reads anyway, and
    /// plausible, inside the blob and at most [`MAX_HINTED_INDEX_LEN`] long
    /// (the pointer is store input; it must not make a mount fetch gigabytes).
    pub fn index_hint(&self) -> Option<std::ops::Range<u64>> {
        let IndexLocation { offset, len } = self.index?;
        let end = offset.checked_add(len)?;
        let tail_start = self.size.saturating_sub(crate::archive::reader::TAIL_LEN);
        (len > 0 && len <= MAX_HINTED_INDEX_LEN && end <= self.size && offset < tail_start)
            .then_some(offset..end)
    }

    /// Parses a pointer object's bytes, accepting only a digest that is a
    /// SHA-256 in hex (it becomes an object key). The error says why not.
    pub fn parse(bytes: &[u8]) -> Result<KeyPointer, String> {
        let pointer: KeyPointer = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if pointer.digest.len() != 64 || !pointer.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "digest {:?} is not a SHA-256 in hex",
                pointer.digest
            ));
        }
        Ok(pointer)
    }
}

/// Seconds since the epoch, for [`KeyPointer::created`].
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("no cache for key {key:?}{}", tried_fallbacks(.fallbacks))]
    NoMatch { key: String, fallbacks: Vec<String> },
    #[error("the pointer for key {key:?} is unreadable: {message}")]
    BadPointer { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn tried_fallbacks(fallbacks: &[String]) -> String {
    if fallbacks.is_empty() {
        String::new()
    } else {
        format!(" and none under the fallback prefixes {fallbacks:?}")
    }
}

/// Writes the pointer for `key`. Call only once the blob is completely stored.
pub async fn write_pointer<S: ObjectStore>(
    store: &S,
    key: &str,
    pointer: &KeyPointer,
) -> Result<(), LayoutError> {
    let json = serde_json::to_vec_pretty(pointer).expect("a KeyPointer always serialises");
    store
        .put(
            &checked_pointer_key(store, key)?,
            PutSource::Bytes(json.into()),
        )
        .await?;
    Ok(())
}

/// Reads the pointer for `key`; a missing one is [`StoreError::NotFound`].
pub async fn read_pointer<S: ObjectStore>(store: &S, key: &str) -> Result<KeyPointer, LayoutError> {
    read_pointer_at(store, key, &checked_pointer_key(store, key)?).await
}

async fn read_pointer_at<S: ObjectStore>(
    store: &S,
    key: &str,
    object: &str,
) -> Result<KeyPointer, LayoutError> {
    let bad = |message: String| LayoutError::BadPointer {
        key: key.to_string(),
        message,
    };
    // One request: a pointer longer than the bound is refused by its size,
    // having read no more than the bound.
    let (meta, body) = store.get_tail(object, MAX_POINTER_LEN).await?;
    if meta.size > MAX_POINTER_LEN {
        return Err(bad(format!(
            "{} bytes long, more than a pointer can be",
            meta.size
        )));
    }
    KeyPointer::parse(&body).map_err(bad)
}

/// A key resolved to its pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The key that matched: the requested one, or one found under a fallback prefix.
    pub key: String,
    pub pointer: KeyPointer,
}

/// Finds the cache for `key`: the exact key first, then, for each fallback
/// prefix in order, the newest key starting with it (by `created`, ties by the
/// pointer's modification time). Like `restore-keys` of GitHub's cache.
pub async fn resolve<S: ObjectStore>(
    store: &S,
    key: &str,
    fallbacks: &[String],
) -> Result<Resolved, LayoutError> {
    match read_pointer(store, key).await {
        Ok(pointer) => {
            return Ok(Resolved {
                key: key.to_string(),
                pointer,
            })
        }
        Err(LayoutError::Store(StoreError::NotFound(_))) => {}
        Err(e) => return Err(e),
    }
    for prefix in fallbacks {
        let mut entries = list_keys(store, prefix).await?;
        entries.sort_by_key(|e| std::cmp::Reverse((e.pointer.created, e.last_modified)));
        if let Some(newest) = entries.into_iter().next() {
            return Ok(Resolved {
                key: newest.key,
                pointer: newest.pointer,
            });
        }
    }
    Err(LayoutError::NoMatch {
        key: key.to_string(),
        fallbacks: fallbacks.to_vec(),
    })
}

/// One cache key in the store, for `cachemount keys` and fallback resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub key: String,
    pub pointer: KeyPointer,
    /// When the pointer object was last written.
    pub last_modified: SystemTime,
}

/// Every readable key starting with `prefix` (empty: all keys), sorted by key.
/// Pointers that vanish while listing or cannot be parsed are skipped (with a
/// warning): one bad pointer must not hide every other cache.
pub async fn list_keys<S: ObjectStore>(
    store: &S,
    prefix: &str,
) -> Result<Vec<KeyEntry>, LayoutError> {
    // A prefix no pointer's name can start with is a mistake to report, not an empty list.
    let listing = fits(
        store,
        "key prefix",
        prefix,
        format!("{KEYS_PREFIX}{}", escape_key(prefix)?),
    )?;
    let listed = store.list(&listing).await?;
    let reads = listed.into_iter().filter_map(|object| {
        let escaped = object.key.strip_prefix(KEYS_PREFIX)?;
        let Ok(key) = unescape_key(escaped) else {
            tracing::warn!(object = %object.key, "ignoring an object under keys/ that is not an escaped key");
            return None;
        };
        Some(async move {
            match read_pointer_at(store, &key, &object.key).await {
                Ok(pointer) => Ok(Some(KeyEntry { key, pointer, last_modified: object.last_modified })),
                Err(LayoutError::Store(StoreError::NotFound(_) | StoreError::PreconditionFailed(_))) => Ok(None),
                Err(LayoutError::BadPointer { key, message }) => {
                    tracing::warn!(%key, %message, "ignoring an unreadable key pointer");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
    });
    let mut entries: Vec<KeyEntry> = futures::stream::iter(reads)
        .buffer_unordered(POINTER_READ_CONCURRENCY)
        .try_filter_map(|entry| async move { Ok(entry) })
        .try_collect()
        .await?;
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn pointer(digest_byte: char, created: u64) -> KeyPointer {
        KeyPointer {
            digest: digest_byte.to_string().repeat(64),
            size: 10,
            created,
            paths: vec!["node_modules".into(), "~/.npm".into()],
            format_version: 1,
            index: None,
        }
    }

    #[test]
    fn an_index_hint_is_used_only_when_plausible_and_outside_the_tail() {
        let tail = crate::archive::reader::TAIL_LEN;
        let with = |size: u64, offset: u64, len: u64| KeyPointer {
            size,
            index: Some(IndexLocation { offset, len }),
            ..pointer('a', 1)
        };
        assert_eq!(
            with(10 * tail, tail, 100).index_hint(),
            Some(tail..tail + 100)
        );
        // Within the tail that every open reads anyway.
        assert_eq!(with(10 * tail, 9 * tail + 1, 100).index_hint(), None);
        // Past the blob's end, overflowing, empty, or huge.
        assert_eq!(with(10 * tail, 9 * tail, 2 * tail).index_hint(), None);
        assert_eq!(with(10 * tail, u64::MAX, 2).index_hint(), None);
        assert_eq!(with(10 * tail, 0, 0).index_hint(), None);
        assert_eq!(with(u64::MAX, 0, 1 << 40).index_hint(), None);
        // Pointers written before the hint existed parse without it.
        let old = br#"{"digest":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":1,"created":1,"paths":["a"],"format_version":1}"#;
        assert_eq!(KeyPointer::parse(old).unwrap().index, None);
    }

    #[test]
    fn escaping_round_trips_and_keeps_safe_characters() {
        for key in [
            "node-abc123",
            "a/b c",
            "..",
            ".hidden",
            "ünï+%",
            "x".repeat(512).as_str(),
            "+/".repeat(200).as_str(),
        ] {
            let escaped = escape_key(key).unwrap();
            assert_eq!(unescape_key(&escaped).unwrap(), key, "{escaped}");
            assert!(escaped
                .split('/')
                .all(|s| !s.is_empty() && s.len() <= SEGMENT_LEN + 1 && !s.starts_with('.')));
        }
        assert_eq!(escape_key("node-1.2_x").unwrap(), "node-1.2_x");
        assert_eq!(escape_key("a/b").unwrap(), "a%2Fb");
        assert!(matches!(unescape_key("a%2"), Err(KeyError::BadEscape(_))));
        assert!(matches!(unescape_key("a b"), Err(KeyError::BadEscape(_))));
    }

    #[test]
    fn pointer_parse_checks_the_digest() {
        let json = serde_json::to_vec(&pointer('a', 1)).unwrap();
        assert_eq!(KeyPointer::parse(&json).unwrap(), pointer('a', 1));
        let mut evil = pointer('a', 1);
        evil.digest = "../".repeat(21) + "x";
        let json = serde_json::to_vec(&evil).unwrap();
        assert!(KeyPointer::parse(&json).unwrap_err().contains("SHA-256"));
        assert!(KeyPointer::parse(b"{").is_err());
        assert!(KeyPointer::parse(b"").is_err());
    }

    #[test]
    fn key_limits() {
        assert_eq!(pointer_key(""), Err(KeyError::Empty));
        assert_eq!(
            pointer_key(&"k".repeat(513)),
            Err(KeyError::TooLong { len: 513 })
        );
        assert_eq!(pointer_key("node-1").unwrap(), "keys/node-1");
        assert_eq!(blob_key("ab"), "blobs/sha256/ab");
    }

    #[test]
    fn a_prefix_escapes_to_a_prefix() {
        let key = format!("{}/tail/ü{}", "p".repeat(199), "q".repeat(300));
        let escaped = escape_key(&key).unwrap();
        for (i, _) in key.char_indices() {
            assert!(
                escaped.starts_with(&escape_key(&key[..i]).unwrap()),
                "prefix of {i} bytes"
            );
        }
    }

    #[tokio::test]
    async fn resolve_prefers_the_exact_key_then_the_newest_under_each_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        write_pointer(&store, "node-old", &pointer('a', 100))
            .await
            .unwrap();
        write_pointer(&store, "node-new", &pointer('b', 200))
            .await
            .unwrap();
        write_pointer(&store, "py-1", &pointer('c', 300))
            .await
            .unwrap();
        write_pointer(&store, "node-exact", &pointer('d', 50))
            .await
            .unwrap();

        let exact = resolve(&store, "node-exact", &["node-".into()])
            .await
            .unwrap();
        assert_eq!(
            (exact.key.as_str(), exact.pointer.created),
            ("node-exact", 50)
        );
        let fallback = resolve(
            &store,
            "node-missing",
            &["nothing-".into(), "node-n".into(), "py-".into()],
        )
        .await
        .unwrap();
        assert_eq!(fallback.key, "node-new");
        let any = resolve(&store, "missing", &["".into()]).await.unwrap();
        assert_eq!(any.key, "py-1");

        let err = resolve(&store, "go-1", &["go-".into(), "rust-".into()])
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, LayoutError::NoMatch { .. })
                && msg.contains("go-1")
                && msg.contains("rust-"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn bad_pointers_are_errors_for_the_exact_key_and_skipped_when_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .put("keys/k-bad", PutSource::Bytes("{not json".into()))
            .await
            .unwrap();
        write_pointer(&store, "k-good", &pointer('e', 1))
            .await
            .unwrap();
        let mut evil = pointer('f', 2);
        evil.digest = "../../etc/passwd".into();
        write_pointer(&store, "k-evil", &evil).await.unwrap();

        assert!(matches!(
            read_pointer(&store, "k-bad").await,
            Err(LayoutError::BadPointer { .. })
        ));
        assert!(matches!(
            read_pointer(&store, "k-evil").await,
            Err(LayoutError::BadPointer { .. })
        ));
        let keys: Vec<_> = list_keys(&store, "k-")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["k-good"]);
        assert_eq!(
            resolve(&store, "k-none", &["k-".into()]).await.unwrap().key,
            "k-good"
        );
    }

    #[test]
    fn no_segment_of_an_escaped_key_starts_with_a_dot() {
        // Found by fuzzing: a `.` at a segment boundary made a hidden (or
        // `.`/`..`) file name in a local store.
        for key in [
            format!("{}.x", "a".repeat(SEGMENT_LEN)),
            format!("{}..", "a".repeat(SEGMENT_LEN)),
            format!("{}.", "b".repeat(2 * SEGMENT_LEN)),
        ] {
            let escaped = escape_key(&key).unwrap();
            assert!(
                escaped.split("+/").all(|seg| !seg.starts_with('.')),
                "{escaped}"
            );
            assert_eq!(unescape_key(&escaped).unwrap(), key);
        }
    }

    #[tokio::test]
    async fn long_keys_work_on_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let long = format!("{}{}", "n".repeat(400), "/".repeat(112));
        write_pointer(&store, &long, &pointer('a', 1))
            .await
            .unwrap();
        write_pointer(&store, &long[..200], &pointer('b', 2))
            .await
            .unwrap();
        assert_eq!(read_pointer(&store, &long).await.unwrap().created, 1);
        let keys: Vec<_> = list_keys(&store, &long[..150])
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, [long[..200].to_string(), long.clone()]);
    }
}
