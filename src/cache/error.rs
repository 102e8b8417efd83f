//! Why a read of an archive entry failed ([`FetchError`]), shared by the
//! fetcher and the verification state ([`super::verify`]) without either
//! importing the other.

use std::ops::Range;
use std::sync::Arc;

use crate::store::StoreError;

/// Why a read failed. Cloneable: one failed fetch fails every read that
/// joined it, so the store error is shared (`Arc`), not copied into text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The object is no longer the pinned version (HTTP 412 on If-Match).
    #[error("{object} changed in the store since it was mounted")]
    Changed {
        object: String,
        #[source]
        cause: Arc<StoreError>,
    },
    /// The mount moved to a new version while the entry was read (its
    /// verification state went with the old one): retried like a 412.
    #[error("{key} was reopened while {name} was read")]
    Reopened { key: String, name: String },
    #[error("{0}")]
    Store(#[source] Arc<StoreError>),
    /// The store answered a range GET with fewer bytes than asked for.
    #[error("{key}: short read of {range:?} ({got} bytes)")]
    ShortRead {
        key: String,
        range: Range<u64>,
        got: usize,
    },
    /// The task fetching the data ended without an answer (the runtime is
    /// shutting down).
    #[error("the fetch was abandoned")]
    Abandoned,
    /// The data failed its checksum or does not decode.
    #[error("{0}")]
    Corrupt(String),
    /// The entry was found damaged before (its data failed its check twice):
    /// every read of it fails at once, without another fetch or log line.
    #[error("{0}")]
    Damaged(String),
}

impl FetchError {
    /// The object changed under the read: the layer above reopens it and
    /// retries ([`crate::fs::reopen`]).
    pub fn is_changed(&self) -> bool {
        matches!(
            self,
            FetchError::Changed { .. } | FetchError::Reopened { .. }
        )
    }
}
