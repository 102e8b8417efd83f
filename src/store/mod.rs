//! Object stores: the one trait between cachemount and where archives live.
//!
//! Everything above this module (save, restore, the mount) speaks [`ObjectStore`];
//! the two implementations are a local directory ([`local::LocalStore`], the
//! embedded default) and S3 ([`s3::S3Store`]). Keys are relative to the store's
//! prefix (`blobs/sha256/<hex>`, `keys/<escaped key>`, or a raw object's name).
//!
//! Reads can be pinned to one version of an object ([`ObjectVersion`]): the
//! store then answers [`StoreError::PreconditionFailed`] instead of returning
//! bytes of another version, which is what lets a reader never mix versions.
//!
//! A new object can also be composed from the start of an existing one and a
//! local file ([`ObjectStore::compose`]): an incremental save reuses an old
//! archive's bytes inside the store and sends only what changed. Every handle
//! counts what it moves ([`TransferCounts`]) so callers can report, and tests
//! can check, that reused bytes were copied rather than sent.

mod any;
pub mod layout;
pub mod local;
pub mod s3;
pub mod url;

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use futures::Stream;

pub use any::AnyStore;
pub use url::StoreUrl;

/// What a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub version: ObjectVersion,
    pub last_modified: SystemTime,
}

/// Identifies one version of an object: the ETag (quotes stripped), and the
/// version id when the bucket is versioned (which pins exactly).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    pub etag: String,
    pub version_id: Option<String>,
}

/// One object found by [`ObjectStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Key relative to the store prefix.
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

/// What to upload.
#[derive(Debug, Clone)]
pub enum PutSource {
    /// Small bodies (key pointers).
    Bytes(Bytes),
    /// A file on local disk (archives); large ones go up as concurrent multipart parts.
    /// The local store may take the file over (hard link, whose mtime it then
    /// sets to now): do not change it afterwards.
    File(PathBuf),
}

/// A new object made of the first `prefix_len` bytes of an existing object
/// followed by the bytes of a local file.
#[derive(Debug, Clone)]
pub struct Composition {
    /// The object whose first `prefix_len` bytes start the new object.
    pub base_key: String,
    /// The version of the base the prefix must come from (If-Match / versionId).
    pub base_version: ObjectVersion,
    pub prefix_len: u64,
    /// Appended after the prefix.
    pub tail: PathBuf,
}

/// Bytes this store handle has moved, counted where they cross the wire (or the disk for the local store).
///
/// Counted once per request that succeeded (an attempt the SDK retried is not
/// counted twice), except GET bodies, which count every byte received. The
/// local store counts a put's whole size as uploaded, also when it takes the
/// file over with a hard link. Clones of a handle share its counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferCounts {
    /// Bytes sent as request bodies (PutObject, UploadPart; local: bytes written).
    pub uploaded: u64,
    /// Bytes the store copied server-side (CopyObject, UploadPartCopy; local: bytes copied from the base).
    pub copied: u64,
    /// Bytes received in GET bodies (local: bytes read by get_range).
    pub downloaded: u64,
}

impl TransferCounts {
    /// What was moved between `before` and `self` (a later snapshot).
    pub fn since(self, before: TransferCounts) -> TransferCounts {
        TransferCounts {
            uploaded: self.uploaded - before.uploaded,
            copied: self.copied - before.copied,
            downloaded: self.downloaded - before.downloaded,
        }
    }
}

/// The live counters behind [`TransferCounts`], shared (in an `Arc`) by the
/// clones of a store handle: the local store clones itself into every blocking
/// task, and callers clone handles freely.
#[derive(Debug, Default)]
struct TransferCounters {
    uploaded: AtomicU64,
    copied: AtomicU64,
    downloaded: AtomicU64,
}

impl TransferCounters {
    fn uploaded(&self, bytes: u64) {
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    fn copied(&self, bytes: u64) {
        self.copied.fetch_add(bytes, Ordering::Relaxed);
    }

    fn downloaded(&self, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
    }

    fn snapshot(&self) -> TransferCounts {
        TransferCounts {
            uploaded: self.uploaded.load(Ordering::Relaxed),
            copied: self.copied.load(Ordering::Relaxed),
            downloaded: self.downloaded.load(Ordering::Relaxed),
        }
    }
}

/// Result of a lifetime refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The object was rewritten (its LastModified is now).
    Refreshed,
    /// The object was modified more recently than the threshold; nothing done.
    StillFresh,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no object at {0}")]
    NotFound(String),
    #[error(
        "{0} changed while being read (precondition failed: its ETag is no longer the pinned one)"
    )]
    PreconditionFailed(String),
    #[error("bucket {0:?} does not exist (create it, or check --store and --endpoint-url)")]
    NoSuchBucket(String),
    #[error("no usable AWS credentials: {0} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a host with an instance role)")]
    Credentials(String),
    #[error("access denied to {0}: check the credentials' permissions on the bucket")]
    AccessDenied(String),
    #[error("cannot reach the store at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("invalid range {range:?} for {key} (object has {size} bytes)")]
    InvalidRange {
        key: String,
        range: Range<u64>,
        size: u64,
    },
    /// The cause is part of the message (not a `source`): store errors are
    /// often shown alone, with `Display`, in logs and in EIO explanations.
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("store error on {key}: {message}")]
    Other { key: String, message: String },
}

impl StoreError {
    /// [`StoreError::Other`]: what went wrong (`message`) with the object at
    /// `key` (a location the user can look up: `s3://…`, a path).
    pub fn other(key: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Other {
            key: key.into(),
            message: message.into(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An object name longer than a limit of the store: S3's 1,024-byte object
/// keys, a local file name's 255 bytes or a local path's 4,095. Checked
/// before anything is uploaded ([`ObjectStore::check_name`]), so a save
/// that cannot write its key pointer uploads no blob either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes long, over {limit} of {max} bytes")]
pub struct NameTooLong {
    /// Which limit, as a user would look it up ("S3's object key limit").
    pub limit: &'static str,
    pub len: usize,
    pub max: usize,
}

/// [`ObjectStore::get_tail`] as two requests, a HEAD and a read pinned to
/// the version it names: the default, and S3's way when a suffix range
/// does not do.
pub async fn head_then_read_tail<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    max_len: u64,
) -> StoreResult<(ObjectMeta, Bytes)> {
    let meta = store.head(key).await?;
    let start = meta.size.saturating_sub(max_len);
    let bytes = store
        .get_range(key, start..meta.size, Some(&meta.version))
        .await?;
    Ok((meta, bytes))
}

/// A GET's body as it arrives ([`ObjectStore::get_range_pieces`]).
pub type Pieces = std::pin::Pin<Box<dyn Stream<Item = StoreResult<Bytes>> + Send>>;

/// The operations cachemount needs from a place that holds archives.
///
/// Implementations must be cheap to share (`Send + Sync`); callers hold them in
/// an `Arc`. Methods return `Send` futures so they can run on the tokio runtime.
pub trait ObjectStore: Send + Sync + 'static {
    /// A human-readable URL of the store (`s3://bucket/prefix`, `file:///dir`), for messages.
    fn describe(&self) -> String;

    /// Whether this store can hold an object named `key` (relative to its
    /// prefix), checked without a request: the limits are the store's, the
    /// names are the layout's.
    fn check_name(&self, key: &str) -> Result<(), NameTooLong>;

    /// Size, version and modification time of `key`.
    fn head(&self, key: &str) -> impl Future<Output = StoreResult<ObjectMeta>> + Send;

    /// The bytes in `range` of `key`. With `pin`, fails with
    /// [`StoreError::PreconditionFailed`] if the object is no longer that version.
    fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        pin: Option<&ObjectVersion>,
    ) -> impl Future<Output = StoreResult<Bytes>> + Send;

    /// The bytes in `range` of `key`, unpinned, in pieces as they arrive: for
    /// a reader that puts them to work before the last one lands (a mount
    /// decodes its index during the download). One attempt, not resumed: a
    /// piece that fails ends the stream with the error, and the caller reads
    /// the range the ordinary way. By default one piece, [`ObjectStore::get_range`]'s.
    fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> impl Future<Output = StoreResult<Pieces>> + Send {
        async move {
            let bytes = self.get_range(key, range, None).await?;
            Ok(Box::pin(futures::stream::once(std::future::ready(Ok(bytes)))) as Pieces)
        }
    }

    /// The last `max_len` bytes of `key` (all of it when it is shorter),
    /// with the size, version and modification time of the version they are
    /// of: what a HEAD and a read of the tail give, as one request where
    /// the store can (S3: a suffix-range GET). An archive's tail and a small
    /// object (a key pointer, a profile) are read this way, so a mount's
    /// start-up waits on one round trip for each, not two.
    fn get_tail(
        &self,
        key: &str,
        max_len: u64,
    ) -> impl Future<Output = StoreResult<(ObjectMeta, Bytes)>> + Send {
        head_then_read_tail(self, key, max_len)
    }

    /// Writes `key` atomically: readers see the old object or the whole new one.
    fn put(
        &self,
        key: &str,
        source: PutSource,
    ) -> impl Future<Output = StoreResult<ObjectMeta>> + Send;

    /// Rewrites `key` in place (server-side) to reset its age for lifecycle
    /// expiry, if it was last modified before `older_than`. Best effort for callers.
    fn refresh(
        &self,
        key: &str,
        older_than: SystemTime,
    ) -> impl Future<Output = StoreResult<RefreshOutcome>> + Send;

    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> impl Future<Output = StoreResult<Vec<ListedObject>>> + Send;

    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = StoreResult<()>> + Send;

    /// Writes `key` atomically as `composition` describes, copying the prefix inside the store where it can
    /// (S3 UploadPartCopy) so that only the tail is sent. Fails with PreconditionFailed if the base is no longer `base_version`.
    ///
    /// A prefix longer than the base fails with [`StoreError::InvalidRange`], a
    /// base that is gone with [`StoreError::NotFound`] (PreconditionFailed when
    /// pinned by version id, as for reads); a failed composition leaves `key` as it was.
    fn compose(
        &self,
        key: &str,
        composition: Composition,
    ) -> impl Future<Output = StoreResult<ObjectMeta>> + Send;

    /// What this handle has transferred so far.
    fn transfer_counts(&self) -> TransferCounts;

    /// The object as an open local file, when the store is on local disk, so
    /// a restore reads it in place instead of copying it first. The open file
    /// is one version for as long as it is held.
    fn open_local(&self, _key: &str) -> Option<StoreResult<(std::fs::File, ObjectMeta)>> {
        None
    }
}
