//! Access profiles (DESIGN §8): what builds read of a cache, learned from
//! the builds themselves. A mount records its reads ([`record`]); when it
//! ends, they are merged into the key's profile ([`merge`]) and written to
//! `PREFIX/profiles/<escaped key>` ([`format`]); the next mount prefetches
//! the profile's entries (`cache::replay`), the next `save` lays them out
//! first, and `report` says what builds never read ([`usage`]).
//!
//! A profile is untrusted input and a hint only: reading one that is
//! missing, oversized or damaged gives an error the caller logs and goes on
//! without; writing one is best effort.

pub mod format;
pub mod merge;
pub mod record;
pub mod usage;

pub use format::{Profile, ProfileEntry};
pub use merge::merge;
pub use record::{Read, Recorder};

use crate::store::layout::{self, KeyError};
use crate::store::{ObjectStore, PutSource, StoreError};

/// Why a key's profile could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the access profile {object} is unusable: {error}")]
    Format {
        object: String,
        error: format::FormatError,
    },
}

/// The profile of `key`, `None` when it has none. Its length is checked
/// (HEAD) before a byte is read.
pub async fn load<S: ObjectStore>(store: &S, key: &str) -> Result<Option<Profile>, ProfileError> {
    let object = layout::profile_key(store, key)?;
    let meta = match store.head(&object).await {
        Ok(m) => m,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |error| ProfileError::Format {
        object: object.clone(),
        error,
    };
    if meta.size > format::MAX_PROFILE_LEN {
        return Err(bad(format::FormatError::TooLong(meta.size)));
    }
    let bytes = match store
        .get_range(&object, 0..meta.size, Some(&meta.version))
        .await
    {
        Ok(b) => b,
        // Replaced or removed since the HEAD: another build's profile; skip it.
        Err(StoreError::NotFound(_) | StoreError::PreconditionFailed(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Profile::parse(&bytes).map(Some).map_err(bad)
}

/// The first profile there is of `keys`, in order (a mount's or a save's
/// own key, then the key it was mounted from); unusable ones are logged and
/// passed over.
pub async fn load_first<S: ObjectStore>(store: &S, keys: &[&str]) -> Option<(String, Profile)> {
    for key in keys {
        match load(store, key).await {
            Ok(Some(p)) => return Some((key.to_string(), p)),
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the access profile of key {key:?}: {e}"),
        }
    }
    None
}

/// Writes `profile` as the profile of `key` (atomically, last writer wins).
pub async fn store<S: ObjectStore>(
    store: &S,
    key: &str,
    profile: &Profile,
) -> Result<(), ProfileError> {
    let object = layout::profile_key(store, key)?;
    store
        .put(&object, PutSource::Bytes(profile.encode().into()))
        .await?;
    Ok(())
}
